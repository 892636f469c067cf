"""MaskedAdamW(nonfinite="skip"): the single-pass step that leaves NaN/Inf entries untouched."""

from __future__ import annotations

import pytest
import torch

import dowser
from dowser import reference
from dowser.ops import pack_mask
from tests.conftest import backend_fn

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Awkward sizes: empty, single, around one word, around a 16-word sub-block (512) and a
# 256-word block (8192), plus a 2-D one.
SIZES = [(0,), (1,), (31,), (33,), (513,), (67, 45), (8193,), (20011,)]


def _bits(t):
    return t.detach().cpu().contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


def _case(dtype, rho, compact, device, seed=5, poison=True):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in SIZES]
    gs = [(torch.randn(s, generator=g) * 3).to(device=device, dtype=dtype) for s in SIZES]
    ms = [pack_mask(torch.rand(s, generator=g) < rho).to(device) for s in SIZES]
    ms[1] = None  # an unmasked tensor in the same call
    gs[-1].view(-1)[7] = 0.0
    if poison:  # NaN/Inf/-Inf in trainable and in frozen entries, and ties of bad values
        for i, (grad, mask) in enumerate(zip(gs, ms)):
            n = grad.numel()
            if n == 0:
                continue
            flat = grad.view(-1)
            for j, val in zip(torch.randint(0, n, (6,), generator=g).tolist(),
                              [float("nan"), float("inf"), float("-inf")] * 2):
                flat[j] = val
    offs = [reference.word_offsets(m) if (compact and m is not None) else None for m in ms]

    def state(i, which=0):
        """Tensor i's state: which=0 exp_avg, 1 exp_avg_sq; seeded apart so that reading one
        for the other shows."""
        n = ps[i].numel() if offs[i] is None else reference.count_trainable(ms[i])
        return torch.rand(n, generator=torch.Generator().manual_seed(2 * i + which)).to(device)

    return ps, gs, ms, offs, state


def _expected_bad(gs, ms):
    out = []
    for grad, mask in zip(gs, ms):
        flat = grad.reshape(-1).float()
        sel = flat if mask is None else flat[reference.unpack_mask(mask, flat.numel())]
        out.append(int((~torch.isfinite(sel)).sum()))
    return out


@pytest.mark.parametrize("backend", ["cpp", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rho", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("compact", [True, False])
def test_skip_kernel_equals_reference_bitwise(backend, dtype, rho, compact, device):
    fn = backend_fn("masked_adamw_step", backend, device)
    ps, gs, ms, offs, state = _case(dtype, rho, compact, device)
    args = dict(masks=ms, offsets=offs, steps=[3.0] * len(SIZES), lr=1e-2, beta1=0.9, beta2=0.99,
                eps=1e-8, weight_decay=0.1, maximize=False, skip_nonfinite=True)
    outs = []
    for f in (reference.masked_adamw_, fn):
        p = [t.clone() for t in ps]
        m = [state(i) for i in range(len(SIZES))]
        v = [state(i, 1) for i in range(len(SIZES))]
        bad = f(p, gs, m, v, **args)
        assert bad.cpu().tolist() == _expected_bad(gs, ms)
        outs.append((p, m, v))
    for a, b in zip(outs[0], outs[1]):
        for x, y in zip(a, b):
            assert torch.equal(_bits(x), _bits(y))
    # Frozen entries and entries with a NaN/Inf gradient keep their exact bits.
    for p0, p1, grad, mask in zip(ps, outs[1][0], gs, ms):
        keep = ~torch.isfinite(grad.reshape(-1).float())
        if mask is not None:
            keep |= ~reference.unpack_mask(mask, p0.numel())
        assert torch.equal(_bits(p0).view(-1)[keep], _bits(p1).view(-1)[keep])


@pytest.mark.parametrize("backend", ["cpp", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_skip_without_nonfinite_equals_check_mode(backend, dtype, device):
    fn = backend_fn("masked_adamw_step", backend, device)
    ps, gs, ms, offs, state = _case(dtype, 0.3, True, device, poison=False)
    outs = []
    for skip in (False, True):
        p = [t.clone() for t in ps]
        m = [state(i) for i in range(len(SIZES))]
        v = [state(i, 1) for i in range(len(SIZES))]
        bad = fn(p, gs, m, v, ms, offs, [2.0] * len(SIZES), 1e-3, 0.9, 0.999, 1e-8, 0.01, True,
                 skip_nonfinite=skip)
        assert int(bad.sum()) == 0
        outs.append(p + m + v)
    for x, y in zip(*outs):
        assert torch.equal(_bits(x), _bits(y))


def _model_params(dtype, device):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(33, 47, generator=g)
    b = torch.randn(29, 21, generator=g).t()  # non-contiguous parameter
    c = torch.randn(13, generator=g)  # unmasked
    return [torch.nn.Parameter(t.to(device=device, dtype=dtype)) for t in (a, b, c)]


@pytest.mark.parametrize("backend", ["reference", "cpp", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_optimizer_skip_mode_updates_the_rest_then_raises(backend, dtype, monkeypatch, device):
    backend_fn("masked_adamw_step", backend, device)
    monkeypatch.setenv("DOWSER_BACKEND", backend)
    params = _model_params(dtype, device)
    g = torch.Generator().manual_seed(1)
    masks = {p: pack_mask(torch.rand(p.shape, generator=g) < 0.4).to(device) for p in params[:2]}
    # Two groups: the step must reach the second group before it raises.
    groups = [{"params": params[:1]}, {"params": params[1:], "lr": 2e-2}]
    opt = dowser.MaskedAdamW(groups, masks, lr=1e-2, weight_decay=0.1, nonfinite="skip")
    grads = [torch.randn(p.shape, generator=g).to(device=device, dtype=dtype) for p in params]
    for p, gr in zip(params, grads):
        p.grad = gr.clone()
    opt.step()  # a clean step first: state exists
    before = [p.detach().clone() for p in params]
    state = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in params}
    p0, p2 = params[0], params[2]
    train = reference.unpack_mask(masks[p0].cpu(), p0.numel())
    first, frozen = int(train.nonzero()[0]), int((~train).nonzero()[0])
    p0.grad.view(-1)[first] = float("nan")
    p0.grad.view(-1)[frozen] = float("inf")  # frozen: neither counted nor written
    p2.grad[3] = float("-inf")
    with pytest.raises(ValueError, match=r"NOT atomic") as err:
        opt.step()
    msg = str(err.value)
    assert "(33, 47) (1)" in msg and "param_groups[1]['params'][1] (1)" in msg
    # Every parameter moved (the step happened), except frozen entries and the NaN/Inf ones.
    for p, b in zip(params, before):
        assert not torch.equal(_bits(p), _bits(b))
        assert int(opt.state[p]["step"]) == 2
    assert torch.equal(_bits(p0).view(-1)[first], _bits(before[0]).view(-1)[first])
    assert torch.equal(_bits(p2)[3], _bits(before[2])[3])
    assert torch.equal(_bits(p0).view(-1)[~train.to(device)], _bits(before[0]).view(-1)[~train.to(device)])
    mask1 = reference.unpack_mask(masks[params[1]].cpu(), params[1].numel()).to(device)
    assert torch.equal(_bits(params[1]).view(-1)[~mask1], _bits(before[1]).view(-1)[~mask1])
    # The NaN entry's compact state is untouched; the unmasked param's -inf entry too.
    j = int(train[:first].sum())
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(opt.state[p0][key][j], state[p0][key][j])
        assert torch.equal(opt.state[p2][key][3], state[p2][key][3])


def test_nonfinite_argument_is_validated():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="nonfinite"):
        dowser.MaskedAdamW([p], {}, nonfinite="ignore")


def test_skip_mode_step_in_backward_raises_from_the_hook():
    lin = torch.nn.Linear(4, 3)
    mask = pack_mask(torch.ones(3, 4, dtype=torch.bool))
    opt = dowser.MaskedAdamW(lin.parameters(), {lin.weight: mask}, lr=1e-2, nonfinite="skip",
                             step_in_backward=True)
    out = lin(torch.tensor([[float("nan"), 1.0, 1.0, 1.0]])).sum()
    with pytest.raises(ValueError, match="NOT atomic"):
        out.backward()
    opt.remove_hooks()


_SCALAR_SCRIPT = """
import torch
from dowser import _ext, reference
from dowser._registry import implementations
from tests.test_optim_skip import _case, SIZES, _bits
fn = implementations("masked_adamw_step", "cpu")["cpp"]
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for compact in (True, False):
        ps, gs, ms, offs, state = _case(dtype, 0.3, compact, "cpu")
        outs = []
        for f in (reference.masked_adamw_, fn):
            p = [t.clone() for t in ps]
            m = [state(i) for i in range(len(SIZES))]
            v = [state(i, 1) for i in range(len(SIZES))]
            b = f(p, gs, m, v, ms, offs, [3.0] * len(SIZES), 1e-2, 0.9, 0.99, 1e-8, 0.1, False,
                  skip_nonfinite=True)
            outs.append([b] + p + m + v)
        for x, y in zip(*outs):
            assert torch.equal(_bits(x) if x.dtype != torch.int64 else x,
                               _bits(y) if y.dtype != torch.int64 else y)
print("path", _ext.cpu_capability())
print("ok")
"""


@pytest.mark.parametrize("env", [{"DOWSER_NO_AVX512": "1"}, {"DOWSER_CPU_CAPABILITY": "default"}])
def test_skip_scalar_fallback_equals_reference(env):
    """The C++ paths other than AVX-512 in skip mode, bit-identical to the reference, in a fresh
    process (both variables are read when dowser._C loads): DOWSER_NO_AVX512=1 (the best of
    the rest, AVX2 on x86) and the scalar path forced; the child reports the path it ran."""
    import os
    import subprocess
    import sys

    backend_fn("masked_adamw_step", "cpp", "cpu")
    out = subprocess.run([sys.executable, "-c", _SCALAR_SCRIPT], capture_output=True, text=True,
                         env=dict(os.environ, **env), timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
    path = [ln.split()[1] for ln in out.stdout.splitlines() if ln.startswith("path ")]
    if "DOWSER_CPU_CAPABILITY" in env:
        assert path == [env["DOWSER_CPU_CAPABILITY"]], out.stdout
    else:
        assert path and path[0] not in ("avx512", "None"), out.stdout
