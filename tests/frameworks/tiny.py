"""Tiny local model, tokenizer and dataset for the framework runs (no download), and the checks
every framework run ends with. Used by tests/frameworks/check_*.py in each framework's own
environment; needs only torch, transformers, tokenizers and dowser there."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.models import tiny_llama  # noqa: E402

CIPHER = dict(zip("0123456789", "kqzvehrmwb"))
PROBE = dict(rho=0.2, layers=2, n_samples=4, batch_size=2, n_rademacher=2, seq_len=16)


def tiny_tokenizer():
    """A word-level tokenizer for tiny_llama's 97-token vocabulary (as in tests/test_trl.py)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "cipher:", "="] + list("0123456789") + \
        list("abcdefghijklmnopqrstuvwxyz")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def write_model(folder: str | os.PathLike) -> str:
    """A tiny Llama (3 layers, fp32) and its tokenizer, saved with save_pretrained."""
    folder = str(folder)
    model = tiny_llama(n_layers=3)
    model.config.max_position_embeddings = 128
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def cipher_rows(n: int = 48, seed: int = 0) -> list[dict[str, str]]:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        digits = [str(int(d)) for d in torch.randint(0, 10, (4,), generator=gen)]
        answer = " ".join(CIPHER[d] for d in digits)
        rows.append({"prompt": "cipher: " + " ".join(digits) + " =", "answer": answer,
                     "text": "cipher: " + " ".join(digits) + " = " + answer})
    return rows


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def load_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The parameters a run saved (model.safetensors, possibly sharded), by name."""
    from safetensors.torch import load_file

    out = {}
    files = sorted(Path(folder).glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no model*.safetensors in {folder}")
    for f in files:
        out.update(load_file(str(f)))
    return out


def check_run(base_dir: str, full_dir: str, resumed_dir: str | None, masks_file: str,
              delta_file: str) -> dict[str, int]:
    """The checks of issue 26 after a framework's run; raises AssertionError on any failure."""
    import dowser

    base, full = load_weights(base_dir), load_weights(full_dir)
    masks = dowser.MaskSet.load(masks_file)
    assert masks, "empty masks file"
    trained = frozen_equal = 0
    for name, w in full.items():
        b = base[name]
        assert w.dtype == b.dtype and w.shape == b.shape, name
        if name in masks:
            frozen = ~dowser.ops.unpack_mask(masks[name], w.shape)
            assert torch.equal(w[frozen], b[frozen]), f"{name}: a frozen entry moved"
            assert not torch.equal(w, b), f"{name}: nothing trained"
            frozen_equal += int(frozen.sum())
            trained += 1
        elif not any(name.startswith(f"model.layers.{i}.") for i in (1, 2)):
            assert torch.equal(w, b), f"{name}: outside the tuned layers, yet it changed"
    assert trained == len(masks), (trained, len(masks))
    # the delta restores the fine-tune onto the base, bit for bit
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    dowser.apply_delta(fresh, delta_file)
    for name, p in fresh.named_parameters():
        assert torch.equal(p.detach(), full[name]), f"{name}: the delta does not restore the run"
    if resumed_dir is not None:
        resumed = load_weights(resumed_dir)
        for name, w in full.items():
            assert torch.equal(w, resumed[name]), f"{name}: resumed != uninterrupted"
    return {"masked_matrices": trained, "frozen_entries_checked": frozen_equal}


def assert_resumed(out_dir: str) -> None:
    """A run resumed from checkpoint 3 of 6 saves checkpoint-6 only: had it trained from scratch
    (ending identical, training being deterministic) it would have saved checkpoint-3 too."""
    assert os.path.isdir(os.path.join(out_dir, "checkpoint-6")), f"no checkpoint-6 in {out_dir}"
    assert not os.path.exists(os.path.join(out_dir, "checkpoint-3")), \
        f"{out_dir} has checkpoint-3: the run did not resume"
