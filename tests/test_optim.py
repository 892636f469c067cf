"""MaskedAdamW / MaskedSGD / mask_gradients and the masked step ops, on every backend."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

import pytest
import torch

import dowser
from dowser import _registry
from dowser import reference
from dowser.ops import pack_mask
from tests.conftest import backend_fn

BACKENDS = _registry.backends("masked_adamw_step")  # every registered backend
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Relative tolerance vs torch's dense optimizer. dowser does fp32 math with fp32 state and
# rounds bf16/fp16 parameters once per step; the dense oracle is torch's optimizer on an fp32
# copy rounded to the parameter dtype after every step (torch on bf16 parameters keeps bf16
# state and is far less accurate). Rounding may then differ by one ulp of the dtype.
RTOL = {torch.float32: 1e-6, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


CPU_BLOCK = 8192  # entries per work block of the C++ step (csrc/cpu/masked_adamw.cpp)


def _params(dtype, seed=0, device="cpu", big=False):
    """Awkward shapes (not multiples of 32 or 16), one non-contiguous, one 1-D unmasked; with
    `big`, one more parameter spanning several CPU blocks (5.2 of them, split over threads)."""
    g = _gen(seed)
    a = torch.randn(33, 47, generator=g)
    b = torch.randn(29, 21, generator=g).t()  # non-contiguous parameter
    c = torch.randn(13, generator=g)  # no mask: trains densely
    d = torch.randn(3, 5, 7, generator=g)
    extra = (torch.randn(61, 701, generator=g),) if big else ()
    return [torch.nn.Parameter(t.to(device=device, dtype=dtype)) for t in (a, b, c, d) + extra]


def _masks(params, rho, seed=1):
    g = _gen(seed)
    out = {}
    for i, p in enumerate(params):
        if p.dim() == 1:
            continue
        out[p] = pack_mask((torch.rand(p.shape, generator=g) < rho).to(p.device))
    return out


def _grads(params, steps, seed=2):
    g = _gen(seed)
    res = []
    for _ in range(steps):
        step = []
        for p in params:
            t = torch.randn(p.shape, generator=g).to(device=p.device, dtype=p.dtype)
            if p.dim() == 2 and not p.is_contiguous():
                t = t.t().contiguous().t()  # non-contiguous gradient as well
            step.append(t)
        res.append(step)
    return res


def _bits(t):
    return t.detach().cpu().contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


def _dense(params):
    """fp32 copies for the dense torch oracle (see RTOL)."""
    return [torch.nn.Parameter(p.detach().float().clone()) for p in params]


def _run(opt, params, grads, nan_frozen=None, round_to=None):
    for step in grads:
        for p, g in zip(params, step):
            g = g.clone().to(p.dtype)
            if nan_frozen is not None and p in nan_frozen:
                frozen = ~reference.unpack_mask(nan_frozen[p].cpu(), p.numel()).view(p.shape)
                g[frozen.to(g.device)] = float("nan")  # never written: not even NaN
            p.grad = g
        opt.step()
        if round_to is not None:
            with torch.no_grad():
                for p in params:
                    p.copy_(p.to(round_to).float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ones_mask_matches_torch_adamw(backend, use_backend, device):
    use_backend(backend, device)
    params = _params(torch.float32, device=device)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    masks = {p: pack_mask(torch.ones(p.shape, dtype=torch.bool, device=device)) for p in params}
    grads = _grads(params, 20)
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    _run(dowser.MaskedAdamW(params, masks, **kw), params, grads)
    _run(torch.optim.AdamW(ref, **kw), ref, grads)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("compact", [True, False])
def test_random_mask_trainable_match_frozen_untouched(backend, dtype, compact, use_backend, device):
    use_backend(backend, device)
    params = _params(dtype, device=device)
    init = [p.detach().clone() for p in params]
    ref = _dense(params)
    masks = _masks(params, 0.3)
    grads = _grads(params, 20)
    kw = dict(lr=1e-2, weight_decay=0.1)
    # master_weights=False: the round-every-step path (tests/test_master.py covers masters)
    opt = dowser.MaskedAdamW(params, masks, compact_state=compact, master_weights=False, **kw)
    _run(opt, params, grads, nan_frozen=masks)
    _run(torch.optim.AdamW(ref, **kw), ref, grads, round_to=dtype)
    for p, r, p0 in zip(params, ref, init):
        if p in masks:
            train = reference.unpack_mask(masks[p].cpu(), p.numel()).view(p.shape).to(device)
            assert torch.equal(_bits(p[~train]), _bits(p0[~train])), "a frozen entry moved"
            assert not torch.equal(p[train], p0[train])
            torch.testing.assert_close(p[train].float(), r[train].float(), rtol=RTOL[dtype],
                                       atol=RTOL[dtype] * 1e-2)
            k = int(train.sum())
            want = (k,) if compact else tuple(p.shape)
            assert tuple(opt.state[p]["exp_avg"].shape) == want
        else:
            torch.testing.assert_close(p.float(), r.float(), rtol=RTOL[dtype], atol=RTOL[dtype] * 1e-2)
        assert opt.state[p]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("backend", ["cpp", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rho", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("compact", [True, False])
def test_kernel_equals_reference_bitwise(backend, dtype, rho, compact, device):
    """The C++/CUDA kernels round exactly as the plain-PyTorch reference (no FMA contraction)."""
    fn = backend_fn("masked_adamw_step", backend, device)
    sizes = [(0,), (1,), (31,), (33,), (67, 45), (1000,), (4099,), (CPU_BLOCK + 1,), (70, 403)]
    g = _gen(5)
    ps = [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in sizes]
    gs = [torch.randn(s, generator=g).to(device=device, dtype=dtype) * 3 for s in sizes]
    gs[-1][7] = 0.0  # zeros
    ms = [pack_mask(torch.rand(s, generator=g) < rho).to(device) for s in sizes]
    ms[1] = None  # an unmasked tensor in the same call
    offs = [reference.word_offsets(m) if (compact and m is not None) else None for m in ms]

    def state(i):
        n = ps[i].numel() if offs[i] is None else reference.count_trainable(ms[i])
        return torch.rand(n, generator=_gen(i)).to(device)

    args = dict(masks=ms, offsets=offs, steps=[3.0] * len(sizes), lr=1e-2, beta1=0.9, beta2=0.99,
                eps=1e-8, weight_decay=0.1, maximize=False)
    outs = []
    for f in (reference.masked_adamw_, fn):
        p = [t.clone() for t in ps]
        m = [state(i) for i in range(len(sizes))]
        v = [state(i) for i in range(len(sizes))]
        bad = f(p, gs, m, v, **args)
        assert int(bad.sum()) == 0
        outs.append((p, m, v))
    for a, b in zip(outs[0], outs[1]):
        for x, y in zip(a, b):
            assert torch.equal(_bits(x), _bits(y))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad_value,where", [(float("nan"), "first"), (float("inf"), "first"),
                                             (float("nan"), "last block"),
                                             (float("-inf"), "middle block")])
def test_nonfinite_trainable_gradient_raises_and_writes_nothing(backend, bad_value, where,
                                                                use_backend, device):
    use_backend(backend, device)
    params = _params(torch.float32, device=device, big=True)
    masks = _masks(params, 0.5)
    opt = dowser.MaskedAdamW(params, masks, lr=1e-2)
    _run(opt, params, _grads(params, 2))
    before = [p.detach().clone() for p in params]
    state = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in params}
    # the first trainable entry of the first parameter, or one in a later block of the big one
    p = params[0] if where == "first" else params[-1]
    assert p.numel() > 5 * CPU_BLOCK or where == "first"
    train = reference.unpack_mask(masks[p].cpu(), p.numel()).nonzero().flatten()
    at = (train[0] if where == "first" else train[-1] if where == "last block"
          else train[train >= 2 * CPU_BLOCK + 5][0])
    for q, g in zip(params, _grads(params, 1, seed=9)[0]):
        q.grad = g
    p.grad.view(-1)[int(at)] = bad_value
    with pytest.raises(ValueError, match=r"NaN/Inf gradient in trainable entries"):
        opt.step()
    for q, q0 in zip(params, before):
        assert torch.equal(_bits(q), _bits(q0))
        for k, v in opt.state[q].items():
            assert torch.equal(v, state[q][k]), k


def test_compact_state_bytes_per_param():
    n = 4096 * 1000
    p = torch.nn.Parameter(torch.zeros(4096, 1000))
    mask = pack_mask(torch.rand(p.shape, generator=_gen(0)) < 0.1)
    opt = dowser.MaskedAdamW([p], {p: mask})
    p.grad = torch.randn(p.shape, generator=_gen(1))
    opt.step()
    state_bytes = sum(t.numel() * t.element_size() for t in opt.state[p].values() if t.dim())
    offsets = opt._offsets[p]
    total = state_bytes + offsets.numel() * offsets.element_size()
    assert total / n <= 1.1, total / n
    dense = dowser.MaskedAdamW([p], {p: mask}, compact_state=False)
    dense.step()
    dense_bytes = sum(t.numel() * t.element_size() for t in dense.state[p].values() if t.dim())
    assert dense_bytes / n == 8


_PEAK_SCRIPT = textwrap.dedent("""
    import torch, dowser
    from dowser.ops import pack_mask
    from dowser.profiling import peak_memory

    def make(rows, cols, seed):
        torch.manual_seed(seed)
        p = torch.nn.Parameter(torch.randn(rows, cols))
        p.grad = torch.randn(rows, cols)
        mask = pack_mask(torch.rand(rows, cols) < 0.1)
        if "{kind}" == "dowser":
            return p, dowser.MaskedAdamW([p], {{p: mask}}, lr=1e-3)
        return p, torch.optim.AdamW([p], lr=1e-3, fused=True)

    small = make(300, 500, 0)  # warm-up (threads, lazy init); kept alive so that no freed
    small[1].step()            # memory is recycled into the measured steps
    rows, cols = 4096, 4000
    p, opt = make(rows, cols, 1)
    _, peak = peak_memory(lambda: [opt.step() for _ in range(2)])
    print(peak / (rows * cols))
""")


@pytest.mark.parametrize("kind,limit", [("dowser", 1.1), ("torch", None)])
def test_peak_memory_per_param(kind, limit):
    """First steps (state allocation + update), peak RSS in a fresh process, on the C++ kernel
    (the plain-PyTorch reference is an oracle, not memory-lean)."""
    import os

    backend_fn("masked_adamw_step", "cpp", "cpu")
    env = {k: v for k, v in os.environ.items() if k != "DOWSER_BACKEND"}
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT.format(kind=kind)], capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    per_param = float(out.stdout.strip().splitlines()[-1])
    if limit is not None:
        assert per_param <= limit, per_param
    else:
        assert per_param >= 7.5, per_param  # torch AdamW: 8 bytes of state per parameter


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_resume_bit_exact(backend, compact, dtype, use_backend, device):
    use_backend(backend, device)
    params = _params(dtype, device=device)
    masks = _masks(params, 0.2)
    grads = _grads(params, 8)
    opt = dowser.MaskedAdamW(params, masks, lr=1e-2, compact_state=compact)
    _run(opt, params, grads[:4])
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    snapshot = [p.detach().clone() for p in params]
    _run(opt, params, grads[4:])

    resumed = [torch.nn.Parameter(s.clone()) for s in snapshot]
    masks2 = {resumed[i]: masks[params[i]] for i in range(len(params)) if params[i] in masks}
    for layout in (compact, not compact):  # same layout, and converted from the other one
        res = [torch.nn.Parameter(s.clone()) for s in snapshot]
        m2 = {res[i]: masks[params[i]] for i in range(len(params)) if params[i] in masks}
        opt2 = dowser.MaskedAdamW(res, m2, lr=1e-2, compact_state=layout)
        buf.seek(0)
        opt2.load_state_dict(torch.load(buf, weights_only=True))
        _run(opt2, res, grads[4:])
        for p, r in zip(params, res):
            assert torch.equal(_bits(p), _bits(r))
            assert opt2.state[r]["exp_avg"].dtype == torch.float32
        if layout == compact:
            for p, r in zip(params, res):
                for k in ("exp_avg", "exp_avg_sq", "step"):
                    assert torch.equal(opt.state[p][k], opt2.state[r][k])
    assert masks2  # noqa: the masks map onto the new parameters


def test_state_dict_from_another_mask_is_refused():
    params = _params(torch.float32)
    opt = dowser.MaskedAdamW(params, _masks(params, 0.2))
    _run(opt, params, _grads(params, 1))
    other = dowser.MaskedAdamW(params, _masks(params, 0.6, seed=7))
    with pytest.raises(ValueError, match="saved with another mask"):
        other.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hyper", [dict(), dict(momentum=0.9, dampening=0.1, weight_decay=0.01),
                                   dict(momentum=0.9, nesterov=True, maximize=True)])
def test_sgd_matches_torch_sgd(backend, dtype, hyper, use_backend, device):
    use_backend(backend, device)
    params = _params(dtype, device=device)
    init = [p.detach().clone() for p in params]
    ref = _dense(params)
    masks = _masks(params, 0.3)
    grads = _grads(params, 10)
    _run(dowser.MaskedSGD(params, masks, lr=1e-2, master_weights=False, **hyper), params, grads,
         nan_frozen=masks)
    _run(torch.optim.SGD(ref, lr=1e-2, **hyper), ref, grads, round_to=dtype)
    for p, r, p0 in zip(params, ref, init):
        train = (reference.unpack_mask(masks[p].cpu(), p.numel()).view(p.shape).to(device)
                 if p in masks else torch.ones(p.shape, dtype=torch.bool, device=device))
        assert torch.equal(_bits(p[~train]), _bits(p0[~train]))
        torch.testing.assert_close(p[train].float(), r[train].float(), rtol=RTOL[dtype],
                                   atol=RTOL[dtype] * 1e-2)


def test_sgd_all_ones_fp32_close():
    params = _params(torch.float32)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    masks = {p: pack_mask(torch.ones(p.shape, dtype=torch.bool)) for p in params}
    grads = _grads(params, 20)
    hyper = dict(lr=1e-2, momentum=0.9, weight_decay=0.1)
    _run(dowser.MaskedSGD(params, masks, **hyper), params, grads)
    _run(torch.optim.SGD(ref, **hyper), ref, grads)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)


def _linear_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(37, 29), torch.nn.ReLU(), torch.nn.Linear(29, 3))


def _name_masks(model, rho=0.2):
    return {n: pack_mask(torch.rand(p.shape, generator=_gen(3)) < rho)
            for n, p in model.named_parameters() if p.dim() == 2}


def test_mask_gradients_zeroes_frozen_and_plain_optimizers_keep_them():
    model = _linear_model()
    masks = _name_masks(model)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    handle = dowser.mask_gradients(model, masks, optimizer=opt)
    assert len(handle) == 2
    x = torch.randn(16, 37, generator=_gen(4))
    for _ in range(5):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        for n, p in model.named_parameters():
            if n in masks:
                frozen = ~reference.unpack_mask(masks[n], p.numel()).view(p.shape)
                assert bool((p.grad[frozen] == 0).all())
        opt.step()
    for n, p in model.named_parameters():
        if n in masks:
            frozen = ~reference.unpack_mask(masks[n], p.numel()).view(p.shape)
            assert torch.equal(p[frozen], init[n][frozen])
            assert not torch.equal(p[~frozen], init[n][~frozen])
    handle.remove()
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    w = dict(model.named_parameters())["0.weight"]
    assert bool((w.grad != 0).sum() > (reference.unpack_mask(masks["0.weight"], w.numel())).sum())


def test_mask_gradients_zeroes_nan_at_frozen_entries():
    p = torch.nn.Parameter(torch.ones(40))
    mask = pack_mask(torch.arange(40) < 10)
    model = torch.nn.Module()
    model.w = p
    with dowser.mask_gradients(model, {"w": mask}):
        (p * torch.where(torch.arange(40) < 10, 1.0, float("nan"))).sum().backward()
    assert torch.equal(p.grad, torch.cat([torch.ones(10), torch.zeros(30)]))


def test_mask_gradients_refuses_weight_decay_and_momentum_state():
    model = _linear_model()
    masks = _name_masks(model)
    with pytest.raises(ValueError, match="MaskedAdamW"):
        dowser.mask_gradients(model, masks, optimizer=torch.optim.AdamW(model.parameters()))
    with pytest.raises(ValueError, match="weight_decay"):
        dowser.mask_gradients(model, masks, optimizer=torch.optim.SGD(model.parameters(), lr=0.1,
                                                                      weight_decay=1e-4))
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 37)).sum().backward()
    sgd.step()  # momentum buffers now non-zero everywhere
    with pytest.raises(ValueError, match="momentum"):
        dowser.mask_gradients(model, masks, optimizer=sgd)
    ok = dowser.mask_gradients(model, masks, optimizer=dowser.MaskedAdamW(
        model.parameters(), masks, model=model))
    ok.remove()


def test_bad_input_is_refused_with_the_argument_named():
    model = _linear_model()
    w = model[0].weight
    good = pack_mask(torch.ones(w.shape, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"masks\['0.weight'\] has shape"):
        dowser.MaskedAdamW(model.parameters(), {"0.weight": good[:-1]}, model=model)
    with pytest.raises(ValueError, match="int32"):
        dowser.MaskedAdamW(model.parameters(), {w: good.to(torch.int64)})
    with pytest.raises(ValueError, match="pass model="):
        dowser.MaskedAdamW(model.parameters(), {"0.weight": good})
    with pytest.raises(ValueError, match="no parameter of that name"):
        dowser.MaskedAdamW(model.parameters(), {"nope": good}, model=model)
    with pytest.raises(ValueError, match="not among the optimizer's params"):
        dowser.MaskedAdamW([model[2].weight], {w: good})
    tail = w.numel() % 32
    assert tail
    padded = good.clone()
    padded[-1] = -1  # padding bits set: a mask made for a larger tensor
    with pytest.raises(ValueError, match="padding bits"):
        dowser.MaskedAdamW([w], {w: padded})
    with pytest.raises(ValueError, match="lr"):
        dowser.MaskedAdamW([w], {}, lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        dowser.MaskedAdamW([w], {}, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="nesterov"):
        dowser.MaskedSGD([w], {}, lr=0.1, nesterov=True)
    with pytest.raises(TypeError, match="Mapping"):
        dowser.MaskedAdamW([w], [good])


@pytest.mark.parametrize("compact", [True, False])
def test_step_in_backward_equals_step(compact):
    model_a, model_b = _linear_model(), _linear_model()
    masks_a, masks_b = _name_masks(model_a), _name_masks(model_b)
    opt_a = dowser.MaskedAdamW(model_a.parameters(), masks_a, lr=1e-2, model=model_a,
                               compact_state=compact)
    opt_b = dowser.MaskedAdamW(model_b.parameters(), masks_b, lr=1e-2, model=model_b,
                               compact_state=compact, step_in_backward=True)
    x = torch.randn(8, 37, generator=_gen(6))
    for _ in range(4):
        opt_a.zero_grad()
        model_a(x).pow(2).mean().backward()
        opt_a.step()
        model_b(x).pow(2).mean().backward()
        assert all(p.grad is None for p in model_b.parameters())  # freed in the hook
        opt_b.step()
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)


def test_grad_scaler_skips_nonfinite_steps():
    model = _linear_model()
    masks = _name_masks(model)
    opt = dowser.MaskedAdamW(model.parameters(), masks, model=model, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(torch.full((2, 37), float("inf"))).sum()
    scaler.scale(loss).backward()
    scaler.step(opt)  # found_inf: skipped, not raised, nothing written
    scaler.update()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    opt.zero_grad()
    scaler.scale(model(torch.randn(2, 37)).sum()).backward()
    scaler.step(opt)
    assert not torch.equal(model[0].weight, before[0])


def test_word_offsets_and_count():
    for n in (0, 1, 31, 32, 33, 1000, 70001):
        mask = torch.rand(n, generator=_gen(n)) < 0.37
        packed = pack_mask(mask)
        offs = reference.word_offsets(packed)
        counts = [int(mask[i:i + 32].sum()) for i in range(0, n, 32)]
        expect = torch.tensor([sum(counts[:i]) for i in range(len(counts))], dtype=torch.int32)
        assert torch.equal(offs, expect)
        assert reference.count_trainable(packed) == int(mask.sum())


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_tiny_llama_training_loop(backend, use_backend):
    from tests.models import tiny_llama

    use_backend(backend)
    model = tiny_llama().train()
    tuned = [f"model.layers.1.{m}" for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj",
                                             "mlp.down_proj")]
    for name, p in model.named_parameters():
        p.requires_grad_(any(name.startswith(t) for t in tuned) or name == "model.layers.1.post_attention_layernorm.weight")
    masks = {f"{t}.weight": pack_mask(torch.rand(dict(model.named_parameters())[f"{t}.weight"].shape,
                                                 generator=_gen(i)) < 0.1)
             for i, t in enumerate(tuned)}
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = dowser.MaskedAdamW(trainable, masks, model=model, lr=2e-2, weight_decay=0.1)
    ids = torch.randint(3, 97, (4, 24), generator=_gen(7))
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.05, losses
    for n, p in model.named_parameters():
        if n in masks:
            frozen = ~reference.unpack_mask(masks[n], p.numel()).view(p.shape)
            assert torch.equal(p[frozen], init[n][frozen])
            assert not torch.equal(p[~frozen], init[n][~frozen])
        elif not p.requires_grad:
            assert torch.equal(p, init[n])


_SCALAR_SCRIPT = textwrap.dedent("""
    import torch
    from dowser import reference, _registry
    from dowser.ops import pack_mask
    fn = _registry.implementations("masked_adamw_step", "cpu")["cpp"]
    sgd = _registry.implementations("masked_sgd_step", "cpu")["cpp"]
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        sizes = [(0,), (33,), (67, 45), (4099,)]
        ps = [torch.randn(s, generator=g).to(dtype) for s in sizes]
        gs = [torch.randn(s, generator=g).to(dtype) for s in sizes]
        ms = [pack_mask(torch.rand(s, generator=g) < 0.3) for s in sizes]
        ms[1] = None
        offs = [None if m is None else reference.word_offsets(m) for m in ms]
        outs = []
        for f in (reference.masked_adamw_, fn):
            p = [t.clone() for t in ps]
            st = [torch.ones(t.numel() if o is None else reference.count_trainable(m)) * 0.5
                  for t, m, o in zip(ps, ms, offs)]
            m1 = [t.clone() for t in st]; m2 = [t.clone() for t in st]
            f(p, gs, m1, m2, ms, offs, [2.0] * 4, 1e-2, 0.9, 0.99, 1e-8, 0.1, True)
            outs.append(p + m1 + m2)
        for f in (reference.masked_sgd_, sgd):
            p = [t.clone() for t in ps]
            b = [torch.ones(t.numel() if o is None else reference.count_trainable(m)) * 0.5
                 for t, m, o in zip(ps, ms, offs)]
            f(p, gs, b, ms, offs, [False] * 4, 1e-2, 0.9, 0.1, 0.01, False, False)
            outs.append(p + b)
        for a, c in zip(outs[0], outs[1]):
            assert torch.equal(a, c), "adamw"
        for a, c in zip(outs[2], outs[3]):
            assert torch.equal(a, c), "sgd"
    print("ok")
""")


def run_without_avx512(script: str) -> None:
    """Run `script` in a fresh interpreter with the C++ step's non-AVX-512 path forced
    (DOWSER_NO_AVX512=1, read when dowser._C loads); it must print "ok" last."""
    import os

    backend_fn("masked_adamw_step", "cpp", "cpu")
    env = dict(os.environ, DOWSER_NO_AVX512="1")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_scalar_fallback_equals_reference():
    """The non-AVX-512 C++ path (forced with DOWSER_NO_AVX512=1) is bit-identical as well."""
    run_without_avx512(_SCALAR_SCRIPT)


def test_error_names_the_parameter_and_add_param_group_trains_densely():
    model = _linear_model()
    masks = _name_masks(model)
    opt = dowser.MaskedAdamW([model[0].weight], masks and {"0.weight": masks["0.weight"]}, model=model)
    extra = torch.nn.Parameter(torch.zeros(5))
    opt.add_param_group({"params": [extra], "lr": 0.1})
    model[0].weight.grad = torch.zeros_like(model[0].weight)
    extra.grad = torch.ones(5)
    opt.step()
    assert bool((extra < 0).all())  # dense AdamW step on the unmasked parameter
    train = reference.unpack_mask(masks["0.weight"], model[0].weight.numel())
    model[0].weight.grad.view(-1)[int(train.nonzero()[0])] = float("nan")
    with pytest.raises(ValueError, match=r"0\.weight \(1\)"):
        opt.step()


# ---- the read-only NaN/Inf pass alone, and atomic steps over several groups ----------------------

@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rho", [0.0, 0.1, 1.0, None])
def test_count_nonfinite_equals_reference(backend, dtype, rho):
    fn = backend_fn("count_nonfinite", backend)
    params = _params(dtype, big=True)
    grads = _grads(params, 1)[0]  # one of them non-contiguous
    masks = [None if rho is None or p.dim() == 1 else m
             for p, m in zip(params, [_masks(params, rho or 0.0).get(p) for p in params])]
    g = _gen(5)
    for t in grads:  # NaN/Inf at random entries: trainable ones count, frozen ones do not
        flat = t.view(-1) if t.is_contiguous() else t.t().view(-1)
        idx = torch.randint(0, t.numel(), (7,), generator=g)
        flat[idx[:4]] = float("nan")
        flat[idx[4:]] = float("-inf")
    want = reference.count_nonfinite(grads, masks)
    assert torch.equal(fn(grads, masks), want)
    if rho is None:
        assert want.tolist() == [int((~torch.isfinite(t)).sum()) for t in grads]
    if rho == 0.0:
        assert want[:2].tolist() == [0, 0] and int(want[3]) == 0 and int(want[4]) == 0


def test_count_nonfinite_refuses_a_mask_of_the_wrong_size():
    g = torch.zeros(40)
    with pytest.raises(Exception, match="2 contiguous int32 words"):
        backend_fn("count_nonfinite", "cpp")([g], [torch.zeros(3, dtype=torch.int32)])


def _two_groups(params, **hyper):
    return [{"params": params[:2], **hyper}, {"params": params[2:], "lr": 3e-2}]


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("cls", ["adamw", "sgd"])
def test_nonfinite_in_a_later_group_writes_nothing_in_any_group(backend, cls, use_backend):
    use_backend(backend)
    params = _params(torch.float32, big=True)
    masks = _masks(params, 0.5)
    opt = (dowser.MaskedAdamW(_two_groups(params), masks, lr=1e-2) if cls == "adamw" else
           dowser.MaskedSGD(_two_groups(params), masks, lr=1e-2, momentum=0.9))
    _run(opt, params, _grads(params, 2))
    before = [_bits(p).clone() for p in params]
    state = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in params}
    for q, g in zip(params, _grads(params, 1, seed=9)[0]):
        q.grad = g
    last = params[-1]  # second group, the one spanning several CPU blocks
    train = reference.unpack_mask(masks[last], last.numel())
    last.grad.view(-1)[int(train.nonzero()[-1])] = float("nan")
    with pytest.raises(ValueError, match=r"NaN/Inf gradient in trainable entries.*nothing was updated"):
        opt.step()
    for q, q0 in zip(params, before):
        assert torch.equal(_bits(q), q0)
        for k, v in opt.state[q].items():
            assert torch.equal(v, state[q][k]), k


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_checked_multi_group_step_equals_single_group_bitwise(backend, use_backend):
    """With several groups the step checks first and then runs one pass per group: the same
    bits as one group with the same hyper-parameters."""
    use_backend(backend)
    runs = []
    for groups in (False, True):
        params = _params(torch.bfloat16, big=True)
        masks = _masks(params, 0.3)
        spec = [{"params": params[:2]}, {"params": params[2:]}] if groups else params
        opt = dowser.MaskedAdamW(spec, masks, lr=1e-2, weight_decay=0.1)
        _run(opt, params, _grads(params, 3))
        runs.append([_bits(p) for p in params] + [opt.state[p]["exp_avg_sq"] for p in params])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
