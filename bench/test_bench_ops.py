"""Benchmark suite, ops: the exact bottom-rho selection, mask packing and the masked AdamW
step, each against what users would otherwise run (timed in the same process). See
bench/conftest.py for the options; `pytest bench/ --benchmark-only --quick`."""

from __future__ import annotations

import pytest
import torch
from common import RHO_DEFAULT, make_mask, measure, naive_select, optim_params, select_inputs

import dowser
from dowser import ops, reference

# README's sizes (one 4096x11008 matrix, 45M entries) and the quick ones.
SELECT = {False: (4096, 11008), True: (512, 1024)}
PACK = {False: (4096, 11008), True: (1024, 2048)}
OPTIM = {False: [(4096, 11008)], True: [(512, 2048)]}
ROUNDS = {False: 5, True: 3}
# The cheap ops (ms at quick size): pytest-benchmark's calibrated rounds (see measure).
FAST_ROUNDS = {False: None, True: None}


def _shape(s) -> str:
    return "x".join(map(str, s))


# ---- score tiles + exact selection vs materialise + kthvalue ---------------------------------

@pytest.fixture(scope="module")
def select_case():
    return {}  # (quick, device) -> inputs, built once for the case's rows


def _select_layer(quick, device, cache):
    key = (quick, device)
    if key not in cache:
        cache[key] = select_inputs([SELECT[quick]], device)[0]
    return cache[key]


def test_select_naive(benchmark, quick, device, select_case):
    w, psi, a, bw = _select_layer(quick, device, select_case)
    measure(benchmark, lambda: naive_select(w, psi, a, bw, RHO_DEFAULT), device=device,
            rounds=ROUNDS[quick], group=f"select {_shape(w.shape)} rho={RHO_DEFAULT} ({device})",
            method="materialise + kthvalue", baseline=True, entries=w.numel())


def test_select_dowser(benchmark, quick, target, use_path, select_case):
    device, path = target
    use_path(path)
    w, psi, a, bw = _select_layer(quick, device, select_case)
    measure(benchmark, lambda: ops.build_mask(w, psi, a, RHO_DEFAULT, batch_weights=bw), device=device,
            rounds=ROUNDS[quick], group=f"select {_shape(w.shape)} rho={RHO_DEFAULT} ({device})",
            method="dowser build_mask", cpu_path=path, entries=w.numel())


# ---- pack / unpack ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bool_masks():
    return {}


def _bool_mask(quick, device, cache):
    if (quick, device) not in cache:
        gen = torch.Generator().manual_seed(0)
        cache[(quick, device)] = (torch.rand(PACK[quick], generator=gen) < 0.1).to(device)
    return cache[(quick, device)]


@pytest.mark.parametrize("op", ["pack", "unpack"])
def test_pack_reference(benchmark, quick, device, op, bool_masks):
    mask = _bool_mask(quick, device, bool_masks)
    packed = reference.pack_mask(mask)
    fn = (lambda: reference.pack_mask(mask)) if op == "pack" else (
        lambda: reference.unpack_mask(packed, mask.numel()))
    measure(benchmark, fn, device=device, rounds=FAST_ROUNDS[quick],
            group=f"{op} {_shape(mask.shape)} ({device})", method="plain torch (reference)",
            baseline=True, entries=mask.numel())


@pytest.mark.parametrize("op", ["pack", "unpack"])
def test_pack_dowser(benchmark, quick, target, use_path, op, bool_masks):
    device, path = target
    use_path(path)
    mask = _bool_mask(quick, device, bool_masks)
    packed = ops.pack_mask(mask)
    fn = (lambda: ops.pack_mask(mask)) if op == "pack" else (lambda: ops.unpack_mask(packed, mask.shape))
    measure(benchmark, fn, device=device, rounds=FAST_ROUNDS[quick],
            group=f"{op} {_shape(mask.shape)} ({device})", method=f"dowser {op}_mask", cpu_path=path,
            entries=mask.numel())


# ---- masked AdamW step vs torch AdamW (fused, foreach) ---------------------------------------

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.fixture(scope="module")
def optim_sets():
    return {}


def _params(quick, device, dtype, cache):
    key = (quick, device, dtype)
    if key not in cache:
        cache.clear()  # one set at a time (45M fp32 + grads is 360 MB)
        cache[key] = optim_params(OPTIM[quick], DTYPES[dtype], device)
    return cache[key]


def _optim_group(quick, device, dtype) -> str:
    n = sum(a * b for a, b in OPTIM[quick])
    masters = ", dowser with fp32 masters" if dtype == "bf16" else ""
    return f"AdamW step {n / 1e6:.3g}M {dtype}{masters} ({device})"


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_adamw_torch(benchmark, quick, device, dtype, impl, optim_sets):
    params = _params(quick, device, dtype, optim_sets)
    opt = torch.optim.AdamW(params, lr=1e-4, **{impl: True})
    opt.step()  # state allocated outside the timing
    measure(benchmark, opt.step, device=device, rounds=FAST_ROUNDS[quick],
            group=_optim_group(quick, device, dtype), method=f"torch AdamW {impl}",
            baseline=impl == "fused", entries=sum(p.numel() for p in params))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("rho", [0.1, None], ids=["rho0.1", "dense"])
@pytest.mark.parametrize("nonfinite", ["check", "skip"])
def test_adamw_dowser(benchmark, quick, target, use_path, dtype, rho, nonfinite, optim_sets):
    device, path = target
    use_path(path)
    params = _params(quick, device, dtype, optim_sets)
    gen = torch.Generator(device=device).manual_seed(1)
    masks = {} if rho is None else {p: make_mask(p.shape, rho, "random", device, gen) for p in params}
    opt = dowser.MaskedAdamW(params, masks, lr=1e-4, nonfinite=nonfinite)
    opt.step()
    if dtype == "bf16":
        assert all(opt.uses_master(p) for p in params)
    label = f"rho={rho} random mask" if rho is not None else "no mask (dense)"
    measure(benchmark, opt.step, device=device, rounds=FAST_ROUNDS[quick],
            group=_optim_group(quick, device, dtype), method=f"dowser MaskedAdamW {label}, {nonfinite}",
            cpu_path=path, entries=sum(p.numel() for p in params),
            trainable=sum(opt.trainable_count(p) for p in params))
