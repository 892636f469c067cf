"""torch.library.opcheck for every dowser op on CPU (the in-place optimizer steps included):
schema and alias annotations, fake kernels, and tracing through AOT dispatch."""

from __future__ import annotations

import importlib

import pytest
import torch

import dowser  # noqa: F401  (declares the ops)
from dowser import _registry

# The module (dowser.selfcheck the attribute is the function).
selfcheck = importlib.import_module("dowser.selfcheck")

OPS = sorted(_registry.OPS)


def test_every_declared_op_has_selfcheck_inputs():
    assert set(OPS) == set(selfcheck.CASES)
    assert {"pack_mask", "unpack_mask", "scores", "select_mask", "select_masks_global",
            "count_nonfinite", "masked_adamw_step", "masked_sgd_step"} <= set(OPS)


@pytest.mark.parametrize("op", OPS)
def test_opcheck(op):
    args = selfcheck.inputs(op, "cpu")
    torch.library.opcheck(getattr(torch.ops.dowser, op), args)


@pytest.mark.parametrize("op", OPS)
def test_every_backend_runs_under_the_op(op, monkeypatch):
    """Each usable CPU backend, forced through torch.ops.dowser, gives the reference result."""
    case = selfcheck.CASES[op]
    want = None
    for backend in _registry.implementations(op, "cpu"):
        monkeypatch.setenv("DOWSER_BACKEND", backend)
        args = selfcheck.inputs(op, "cpu")
        ret = getattr(torch.ops.dowser, op)(*args)
        got = case.outputs(args, ret) if case.outputs else ret
        if want is None:
            want = got
        assert case.same(got, want), backend


# ---- opcheck on the calls the public API really makes (issue 30) ------------------------------
# Hand-written argument lists miss what callers really pass (a None master in a mutable list
# broke functionalization while the cases above passed). These record the torch.ops.dowser.*
# calls of the optimizers, probing and mask building, and opcheck each distinct one.

import torch._inductor.config as inductor_config  # noqa: E402

from dowser import MaskedAdamW, MaskedSGD, build_masks, mask_gradients, ops, probe  # noqa: E402
from tests.models import tiny_llama  # noqa: E402
from tests.recorder import distinct, record_dowser_calls  # noqa: E402

# Every test utility opcheck has (its default), named so a run says which one failed.
ALL_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor",
             "test_aot_dispatch_dynamic")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _param(shape, dtype=torch.float32, seed=0):
    return torch.nn.Parameter((torch.randn(shape, generator=_gen(seed)) * 0.1).to(dtype))


def _mask(shape, rho=0.3, seed=1):
    return ops.pack_mask(torch.rand(shape, generator=_gen(seed)) < rho)


def _grads(params, seed=2):
    for i, p in enumerate(params):
        p.grad = torch.randn(p.shape, generator=_gen(seed + i)).to(p.dtype)


def _adamw_fp32_mask_and_1d():
    """The issue's case: an fp32 matrix with a mask plus a 1-D parameter, one group."""
    w, b = _param((8, 40)), _param((8,), seed=1)
    opt = MaskedAdamW([w, b], {w: _mask(w.shape)}, weight_decay=0.1)
    _grads([w, b])
    opt.step()


def _adamw_fp32_no_masks():
    w, b = _param((8, 40)), _param((8,), seed=1)
    opt = MaskedAdamW([w, b], {})
    _grads([w, b])
    opt.step()
    opt.step()


def _adamw_bf16_masters(compact_state=True):
    """bf16/fp16 parameters with fp32 masters next to an fp32 one in the same call (has_master
    True/False mixed), masked and dense."""
    w, v = _param((8, 40), torch.bfloat16), _param((12, 33), torch.float16, seed=3)
    b, f = _param((8,), torch.bfloat16, seed=1), _param((5, 7), seed=4)
    opt = MaskedAdamW([w, v, b, f], {w: _mask(w.shape), v: _mask(v.shape, 0.5, 5)},
                      lr=1e-3, compact_state=compact_state)
    for s in range(2):
        _grads([w, v, b, f], seed=10 * s)
        opt.step()


def _adamw_mixed_groups():
    """Two groups (the atomic NaN/Inf pre-pass over both: count_nonfinite), one with masters."""
    w, b = _param((8, 40)), _param((8,), torch.bfloat16, seed=1)
    w2, f = _param((6, 35), torch.bfloat16, seed=2), _param((9,), seed=3)
    opt = MaskedAdamW([{"params": [w, b]}, {"params": [w2, f], "lr": 1e-2, "weight_decay": 0.0}],
                      {w: _mask(w.shape), w2: _mask(w2.shape, 0.2, 7)})
    _grads([w, b, w2, f])
    opt.step()
    f.grad = None  # a parameter without a gradient drops out of its group's call
    opt.step()


def _adamw_one_pass_modes():
    """nonfinite="skip" (one NaN in a trainable entry: stepped, then ValueError) and
    grads_finite=True: the op's one-pass mode, with a master."""
    w, b = _param((8, 40), torch.bfloat16), _param((8,), seed=1)
    mask = _mask(w.shape)
    opt = MaskedAdamW([w, b], {w: mask}, nonfinite="skip")
    _grads([w, b])
    w.grad.view(-1)[int(ops.unpack_mask(mask, w.shape).view(-1).nonzero()[0])] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        opt.step()
    opt2 = MaskedAdamW([w, b], {w: mask})
    _grads([w, b], seed=5)
    opt2.step(grads_finite=True)


def _adamw_step_in_backward():
    """step_in_backward: the op runs per parameter from its post-accumulate-grad hook."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.Tanh(),
                                torch.nn.Linear(10, 4)).to(torch.bfloat16)
    w = model[0].weight
    opt = MaskedAdamW(model.parameters(), {w: _mask(w.shape)}, step_in_backward=True)
    x = torch.randn(6, 12, generator=_gen(3)).to(torch.bfloat16)
    model(x).float().pow(2).mean().backward()
    opt.step()


def _sgd():
    """MaskedSGD: momentum (compact buffers, masters, Nesterov) and plain (no buffers, two groups)."""
    w, b = _param((8, 40), torch.bfloat16), _param((8,), seed=1)
    opt = MaskedSGD([w, b], {w: _mask(w.shape)}, lr=1e-2, momentum=0.9, nesterov=True,
                    weight_decay=0.01)
    for s in range(2):
        _grads([w, b], seed=s)
        opt.step()
    w2, f = _param((7, 9)), _param((4,), torch.float16, seed=2)
    plain = MaskedSGD([{"params": [w2]}, {"params": [f], "lr": 0.1}], {w2: _mask(w2.shape)},
                      lr=1e-2, compact_state=False)
    _grads([w2, f])
    plain.step()


def _optimizer_state_and_hooks():
    """State-dict round trips across layouts (unpack_mask) and mask_gradients hooks."""
    w, b = _param((8, 40), torch.bfloat16), _param((8,), seed=1)
    masks = {w: _mask(w.shape)}
    opt = MaskedAdamW([w, b], masks, compact_state=False)
    _grads([w, b])
    opt.step()
    compact = MaskedAdamW([w, b], masks)
    compact.load_state_dict(opt.state_dict())
    model = torch.nn.Linear(40, 8)
    handle = mask_gradients(model, {"weight": _mask((8, 40))})
    model(torch.randn(3, 40, generator=_gen(4))).sum().backward()
    handle.remove()


def _probe_and_build_masks():
    """Probing, then every scoring rule and both scopes of build_masks."""
    model = tiny_llama()
    stats = probe(model, layers=1, n_samples=2, batch_size=2, n_rademacher=2, seq_len=10,
                  progress=False)
    for method in ("dowser", "magnitude", "wanda", "random"):
        build_masks(model, stats, 0.25, method=method)
    build_masks(model, stats, 0.25, scope="global")
    build_masks(model, stats, 0.25, select="highest")


def _public_ops():
    w = torch.randn(24, 40, generator=_gen(0)).to(torch.bfloat16)
    psi, a = torch.rand(3, 24, generator=_gen(1)), torch.rand(3, 40, generator=_gen(2))
    ops.unpack_mask(ops.pack_mask(torch.rand(5, 7, generator=_gen(3)) < 0.5), (5, 7))
    ops.scores(w, psi, a)
    ops.build_mask(w, psi, a, 0.1)
    ops.score_threshold(w, psi, a, 0.1)
    ops.build_masks_global([(w, psi, a), (w.float().t(), a, psi)], 0.2)


SCENARIOS = {f.__name__.lstrip("_"): f for f in (
    _adamw_fp32_mask_and_1d, _adamw_fp32_no_masks, _adamw_bf16_masters,
    lambda: _adamw_bf16_masters(compact_state=False), _adamw_mixed_groups, _adamw_one_pass_modes,
    _adamw_step_in_backward, _sgd, _optimizer_state_and_hooks, _probe_and_build_masks,
    _public_ops)}
SCENARIOS["adamw_bf16_masters_dense_state"] = SCENARIOS.pop("<lambda>")
_RECORDED: dict[str, list] = {}


def _recorded(name: str) -> list:
    if name not in _RECORDED:
        with record_dowser_calls() as calls:
            SCENARIOS[name]()
        _RECORDED[name] = calls
    return _RECORDED[name]


def test_recorded_calls_cover_every_op():
    """The scenarios reach every declared op (so each is opchecked with real arguments), and
    the step calls carry the masters arguments as the optimizers pass them."""
    seen = {c.name for name in SCENARIOS for c in _recorded(name)}
    assert seen == set(OPS), sorted(set(OPS) - seen)
    steps = [c for name in SCENARIOS for c in _recorded(name) if c.name.startswith("masked_")]
    flags = {tuple(c.args[-1]) for c in steps if isinstance(c.args[-1], list)
             and c.args[-1] and isinstance(c.args[-1][0], bool)}
    assert any(True in f and False in f for f in flags), flags  # mixed masters in one call


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_opcheck_recorded_public_api_calls(name):
    calls = distinct(_recorded(name))
    assert calls, f"{name} made no dowser op call"
    for call in calls:
        mutable = "!" in str(call.op._schema)
        # auto_functionalized v2 (torch.compile's default) and v1 (what torch.export and
        # older torch use) functionalize mutable ops differently: check both.
        for v2 in ((True, False) if mutable else (True,)):
            args, kwargs = call.fresh()
            with inductor_config.patch(enable_auto_functionalized_v2=v2):
                result = torch.library.opcheck(call.op, args, kwargs, test_utils=ALL_UTILS)
            assert set(result) == set(ALL_UTILS), result
            assert all(v == "SUCCESS" for v in result.values()), (call.name, v2, result)


def test_all_utils_are_opchecks_default():
    from torch.testing._internal.optests.generate_tests import DEFAULT_TEST_UTILS

    assert set(ALL_UTILS) == set(DEFAULT_TEST_UTILS)
