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


def test_tiny_demo_runs_and_leaves_frozen_entries(capsys):
    from dowser.demo import run_demo

    rows = run_demo("tiny", steps=15, progress=False)
    assert [r["method"].split()[0] for r in rows] == ["zero-shot", "full", "dowser"]
    assert rows[-1]["frozen_changed"] == 0
    assert rows[0]["A_up"] > 0.2  # the built-in model was pre-trained: there is something to forget
    assert "A_up" in capsys.readouterr().out
