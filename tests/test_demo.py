"""The demo's building blocks and a short run of `dowser demo --model tiny`."""

import pytest
import torch

from dowser.finetune import hscore
from dowser.tasks import CIPHER, CharTokenizer, cipher_examples, collate, upstream_texts


def test_upstream_splits_are_disjoint_prose():
    ev, pr = upstream_texts("eval"), upstream_texts("probe")
    assert len(ev) > 50 and len(pr) > 50 and not set(ev) & set(pr)
    assert all("::=" not in t for t in ev)
    with pytest.raises(ValueError, match="split"):
        upstream_texts("train")


def test_cipher_examples_are_reproducible_and_labelled():
    tok = CharTokenizer()
    a, b = cipher_examples(tok, 8, seed=3, bos_id=1), cipher_examples(tok, 8, seed=3, bos_id=1)
    assert [(e.prompt, e.answer) for e in a] == [(e.prompt, e.answer) for e in b]
    text = tok.decode(a[0].prompt + a[0].answer)
    digits = text.split("cipher: ")[1].split(" =")[0].split()
    assert text.endswith(" " + " ".join(CIPHER[d] for d in digits) + "\n")
    batch = collate(a, pad_id=0)
    for i, e in enumerate(a):
        assert batch["labels"][i].ne(-100).sum() == len(e.answer)


def test_hscore():
    assert hscore(0.0, 0.0) == 0.0 and abs(hscore(0.5, 0.5) - 0.5) < 1e-12
    assert abs(hscore(1.0, 0.5) - 2 / 3) < 1e-12


def test_tiny_demo_learns_forgets_and_leaves_frozen_entries(capsys, tmp_path):
    from dowser.demo import run_demo

    pic = tmp_path / "demo.png"
    rows = run_demo("tiny", steps=15, progress=False, plot=str(pic))
    zero, full, mask, rand = rows
    assert [r["method"].split()[0] for r in rows] == ["zero-shot", "full", "dowser", "random"]
    assert zero["A_up"] > 0.2  # the built-in model was pre-trained: there is something to forget
    assert zero["A_down_exact"] == 0.0 and zero["dA_up"] == 0.0 == zero["dCE_up"]
    # fine-tuning learned the cipher's answer tokens (exact match needs more than 15 steps)
    for r in (full, mask, rand):
        assert r["A_down"] > zero["A_down"] + 0.05, r["method"]
        assert len(r["A_down_curve"]) == 4 and r["A_down_curve"][-1] == r["A_down"]
        assert r["dA_up"] == r["A_up"] - zero["A_up"] and r["dCE_up"] == r["CE_up"] - zero["CE_up"]
        assert 0.0 <= r["H"] <= max(r["A_up"], r["A_down"])
    # the masks trained exactly their k entries each: same count for dowser and random, nothing
    # frozen moved, and fewer entries than full fine-tuning
    assert mask["frozen_changed"] == 0 and rand["frozen_changed"] == 0
    assert mask["trainable"] == rand["trainable"] < full["trainable"]
    out = capsys.readouterr().out
    assert "dA_up" in out and "dCE_up" in out and "frozen entries changed by fine-tuning: 0" in out
    # the forgetting meter: 0 for the base, a drift for every fine-tune (docs/forgetting.md)
    assert zero["meter_kl"] == 0.0 and "meter KL" in out
    assert all(r["meter_kl"] != 0.0 and r["meter_kl_se"] > 0 for r in (full, mask, rand))
    pytest.importorskip("matplotlib")
    assert pic.exists() and pic.stat().st_size > 0
