"""fp32 master weights of bf16/fp16 parameters (issue 16): updates below half an ulp are kept,
frozen entries stay bit-identical, the master is optimizer state like the moments."""

from __future__ import annotations

import math

import pytest
import torch

import dowser
from dowser import reference
from dowser._checks import master_args
from dowser.distributed import load_optimizer_state_dict, optimizer_state_dict
from dowser.ops import pack_mask
from tests.conftest import backend_fn

BACKENDS = ["reference", "cpp", "cuda"]
LOW = [torch.bfloat16, torch.float16]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu().contiguous()
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


# ---- the headline: lr 2e-5 on a bf16 weight of ~0.02 ------------------------------------------

def _train(dtype, master_weights, steps, device="cpu", opt_cls="adamw", lr=2e-5):
    """A linear regression y = x W^T with |W| in [0.016, 0.031) (typical LLM weights, one
    binade: a bf16 ulp of 1.2e-4 there, so an update of 2e-5 is below half an ulp), the start
    bf16-representable so every run starts from the same values, 30% of W trainable, NaN
    gradients at frozen entries. The gradient depends on W, so the runs may drift apart.
    Returns (W0, W, mask, opt)."""
    g = _gen(0)
    mag = 0.016 + 0.015 * torch.rand(40, 72, generator=g)
    sign = torch.where(torch.rand(40, 72, generator=g) < 0.5, -1.0, 1.0)
    w0 = (mag * sign).to(torch.bfloat16).float()
    x = torch.randn(256, 72, generator=g)
    target = x @ (torch.randn(40, 72, generator=g) * 0.02).t()
    train = torch.rand(40, 72, generator=g) < 0.3
    w = torch.nn.Parameter(w0.to(device=device, dtype=dtype, copy=True))
    mask = pack_mask(train).to(device)
    if opt_cls == "adamw":
        opt = dowser.MaskedAdamW([w], {w: mask}, lr=lr, weight_decay=0.1,
                                 master_weights=master_weights)
    else:
        opt = dowser.MaskedSGD([w], {w: mask}, lr=lr * 50, momentum=0.9, weight_decay=0.1,
                               master_weights=master_weights)
    xd, td = x.to(device), target.to(device)
    for _ in range(steps):
        w.grad = None
        loss = ((xd.to(dtype) @ w.t()).float() - td).pow(2).mean()
        loss.backward()
        w.grad[~train.to(device)] = float("nan")  # frozen: never read, never written
        opt.step()
    return w0, w.detach().float().cpu(), train, opt


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt_cls", ["adamw", "sgd"])
def test_bf16_updates_lost_without_master_kept_with(backend, opt_cls, use_backend, device):
    """60 steps at lr 2e-5 (SGD: lr 1e-2, momentum 0.9, moves of the same size): without a
    master the bf16 weights move far less than their fp32 twin (most updates are below half an
    ulp and vanish); with the master (default) the bf16 run follows the fp32 run: L2 error of
    the displacement of the trainable entries < 10% (the bf16 rounding of the final value is
    most of it), the master itself < 1%, every bf16 value = its master rounded to nearest."""
    use_backend(backend, device)
    steps = 60
    w0, w32, train, _ = _train(torch.float32, None, steps, device, opt_cls)
    _, plain, _, opt_plain = _train(torch.bfloat16, False, steps, device, opt_cls)
    _, kept, _, opt = _train(torch.bfloat16, None, steps, device, opt_cls)
    d32 = (w32 - w0)[train]
    norm = d32.norm()
    assert norm > 0
    assert "master" not in opt_plain.state[opt_plain.param_groups[0]["params"][0]]
    lost = (plain - w0)[train].norm() / norm
    assert lost < 0.5, f"plain bf16 moved {lost:.2f} of the fp32 distance: nothing was lost?"
    err = ((kept - w0)[train] - d32).norm() / norm
    assert err < 0.10, f"bf16 + master: displacement error {err:.3f} of the fp32 displacement"
    p = opt.param_groups[0]["params"][0]
    master = opt.state[p]["master"].cpu()
    assert master.dtype == torch.float32 and master.shape == (int(train.sum()),)
    assert ((master - w0[train]) - d32).norm() / norm < 0.01
    assert torch.equal(_bits(p.detach()[train.to(p.device)]), _bits(master.to(torch.bfloat16)))
    for w in (plain, kept):  # frozen entries bit-identical (NaN gradients there)
        assert torch.equal(_bits(w[~train].to(torch.bfloat16)), _bits(w0[~train].to(torch.bfloat16)))


def test_master_is_auto_for_low_precision_only():
    p32 = torch.nn.Parameter(torch.randn(8, 40))
    pbf = torch.nn.Parameter(torch.randn(8, 40).bfloat16())
    p16 = torch.nn.Parameter(torch.randn(8, 40).half())
    m = {p: pack_mask(torch.rand(8, 40, generator=_gen(1)) < 0.5) for p in (p32, pbf, p16)}
    opt = dowser.MaskedAdamW([p32, pbf, p16], m)
    for p in (p32, pbf, p16):
        p.grad = torch.randn(8, 40, generator=_gen(2)).to(p.dtype)
    opt.step()
    assert "master" not in opt.state[p32]
    for p in (pbf, p16):
        assert opt.state[p]["master"].shape == opt.state[p]["exp_avg"].shape
    assert dowser.MaskedAdamW([pbf], {pbf: m[pbf]}, master_weights=False).uses_master(pbf) is False
    with pytest.raises(ValueError, match="master_weights"):
        dowser.MaskedSGD([pbf], {pbf: m[pbf]}, lr=0.1, master_weights="yes")


# ---- the op: every backend against the reference, and the reference against torch ----------

def _op_case(dtype, compact, device, seed=5):
    sizes = [(1,), (31,), (33,), (67, 45), (4099,)]
    g = _gen(seed)
    ps = [(torch.randn(s, generator=g) * 0.02).to(device=device, dtype=dtype) for s in sizes]
    ps[3] = ps[3].t().contiguous().t()  # non-contiguous parameter
    gs = [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in sizes]
    gs[-1][:9] = 0.0  # zeros
    ms = [pack_mask(torch.rand(s, generator=g) < 0.4).to(device) for s in sizes]
    ms[0] = None  # unmasked
    offs = [reference.word_offsets(m) if (compact and m is not None) else None for m in ms]
    idx = [None if m is None else reference.unpack_mask(m, p.numel()) for p, m in zip(ps, ms)]

    def state_like(i, fn):
        n = ps[i].numel() if offs[i] is None else int(idx[i].sum())
        return fn(n, i).to(device)

    ms_state = [state_like(i, lambda n, i: torch.rand(n, generator=_gen(10 + i)) * 1e-3)
                for i in range(len(sizes))]
    # masters: not equal to the parameter (they carry the sub-ulp part)
    masters = []
    for i, p in enumerate(ps):
        flat = p.reshape(-1).float()
        sel = flat if offs[i] is None else flat[idx[i].to(device)]
        masters.append((sel + torch.randn(sel.shape, generator=_gen(20 + i)).to(device) * 1e-5).contiguous())
    masters[2] = None  # a low-precision parameter without a master in the same call
    return ps, gs, ms, offs, idx, ms_state, masters


def _assert_follows_torch(kind, out, ps, gs, ms, offs, idx, state0, w0, skip=False, momentum=0.0):
    """The op's results against torch.optim.AdamW (lr 1e-3, betas (0.9, 0.99), eps 1e-8, wd 0.1,
    step 3) or SGD (lr 1e-2, dampening 0.1, wd 0.01, an existing momentum buffer) run on fp32
    copies that start from the master (or the parameter without one), the trainable entries
    compared: the new master and the moments to a few fp32 ulps (torch's math order differs in
    the last bits), a parameter without master to one ulp of its dtype. Skipped (NaN) entries
    get a zero gradient in torch and are left out (the callers check they keep their bits)."""
    p_out, st_out, w_out = out[0], out[1:-1], out[-1]
    w_iter = iter(w_out)
    for i, p in enumerate(ps):
        n = p.numel()
        train = torch.ones(n, dtype=torch.bool) if idx[i] is None else idx[i].cpu()
        compact = offs[i] is not None

        def dense(t, fill=0.0):  # a state laid out like exp_avgs[i] -> n entries
            t = t.detach().float().cpu().reshape(-1)
            if not compact:
                return t.clone()
            full = torch.full((n,), fill)
            full[train] = t
            return full

        x = p.detach().float().cpu().reshape(-1).clone()
        if w0[i] is not None:
            x = torch.where(train, dense(w0[i]), x)
        gr = gs[i].detach().float().cpu().reshape(-1)
        ok = train & torch.isfinite(gr)
        x = torch.nn.Parameter(x)
        x.grad = torch.where(ok, gr, torch.zeros(()))
        if kind == "adamw":
            m, v = dense(state0[i]), dense(state0[i] * 1e-3)
            opt = torch.optim.AdamW([x], lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1,
                                    foreach=False)
            opt.state[x] = {"step": torch.tensor(2.0), "exp_avg": m, "exp_avg_sq": v}
            want_state = ["exp_avg", "exp_avg_sq"]
        else:
            opt = torch.optim.SGD([x], lr=1e-2, momentum=momentum, dampening=0.1,
                                  weight_decay=0.01, foreach=False)
            if momentum:
                opt.state[x] = {"momentum_buffer": dense(state0[i])}
            want_state = ["momentum_buffer"] if momentum else []
        opt.step()
        want = x.detach()[ok]
        for key, st in zip(want_state, st_out):
            got = st[i]
            torch.testing.assert_close(dense(got)[ok], opt.state[x][key][ok], rtol=1e-6, atol=1e-12,
                                       msg=lambda s: f"{kind} tensor {i} {key}: {s}")
        if w0[i] is not None:
            got_w = dense(next(w_iter))[ok]
            torch.testing.assert_close(got_w, want, rtol=1e-6, atol=1e-8,
                                       msg=lambda s: f"{kind} tensor {i} master: {s}")
        else:
            got_p = p_out[i].detach().float().cpu().reshape(-1)[ok]
            torch.testing.assert_close(got_p, want.to(p.dtype).float(), rtol=2 ** -7, atol=0.0,
                                       msg=lambda s: f"{kind} tensor {i} param: {s}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("skip", [False, True])
def test_op_with_masters_matches_reference(backend, dtype, compact, skip, device):
    fn = backend_fn("masked_adamw_step", backend, device)
    ps, gs, ms, offs, idx, m0, w0 = _op_case(dtype, compact, device)
    if skip:
        gs[3].view(-1)[idx[3].nonzero()[:5, 0]] = float("nan")  # trainable NaN: skipped there
    outs = []
    for f in (reference.masked_adamw_, fn):
        p = [t.clone() for t in ps]
        m = [t.clone() for t in m0]
        v = [t.clone() * 1e-3 for t in m0]
        w = [None if t is None else t.clone() for t in w0]
        bad = f(p, gs, m, v, ms, offs, [3.0] * len(ps), 1e-3, 0.9, 0.99, 1e-8, 0.1, False, skip,
                *master_args(w))
        assert int(bad.sum()) == (5 if skip else 0)
        outs.append((p, m, v, [t for t in w if t is not None]))
    if backend != "reference":  # the kernel against the reference, bit for bit
        for a, b in zip(outs[0], outs[1]):
            for x, y in zip(a, b):
                assert torch.equal(_bits(x), _bits(y))
    # and both against torch.optim.AdamW on fp32 copies (not the reference against itself)
    _assert_follows_torch("adamw", outs[1], ps, gs, ms, offs, idx, m0, w0, skip=skip)
    p, m, v, w = outs[0]
    masters_left = [i for i, t in enumerate(w0) if t is not None]
    for j, i in enumerate(masters_left):
        flat = p[i].reshape(-1)
        sel = flat if idx[i] is None else flat[idx[i].to(device)]
        new = w[j] if offs[i] is not None or idx[i] is None else w[j][idx[i].to(device)]
        if skip and i == 3:  # skipped entries keep their old (unrelated) param and master bits
            sel, new = sel[5:], new[5:]
        assert torch.equal(_bits(sel), _bits(new.to(dtype)))  # param = master rounded
        if idx[i] is not None:  # frozen entries untouched (param, and a dense master)
            assert torch.equal(_bits(p[i].reshape(-1)[~idx[i]]), _bits(ps[i].reshape(-1)[~idx[i]]))
            if offs[i] is None:
                assert torch.equal(w[j][~idx[i]], w0[i][~idx[i]])
    if skip:  # the skipped entries keep their param and master bits
        sk = idx[3].nonzero()[:5, 0]
        j = masters_left.index(3)
        assert torch.equal(_bits(p[3].reshape(-1)[sk]), _bits(ps[3].reshape(-1)[sk]))
        pos = torch.arange(5) if compact else sk
        assert torch.equal(w[j][pos], w0[3][pos])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_op_with_masters_matches_reference(backend, compact, momentum, device):
    fn = backend_fn("masked_sgd_step", backend, device)
    ps, gs, ms, offs, idx, b0, w0 = _op_case(torch.bfloat16, compact, device, seed=8)
    outs = []
    for f in (reference.masked_sgd_, fn):
        p = [t.clone() for t in ps]
        b = [t.clone() for t in b0] if momentum else []  # no momentum: no buffers at all
        w = [None if t is None else t.clone() for t in w0]
        bad = f(p, gs, b, ms, offs, [False] * len(ps), 1e-2, momentum, 0.1, 0.01, False, False,
                *master_args(w))
        assert int(bad.sum()) == 0
        outs.append((p, b, [t for t in w if t is not None]))
    if backend != "reference":
        for a, c in zip(outs[0], outs[1]):
            for x, y in zip(a, c):
                assert torch.equal(_bits(x), _bits(y))
    _assert_follows_torch("sgd", outs[1], ps, gs, ms, offs, idx, b0, w0, momentum=momentum)


@pytest.mark.parametrize("dtype", LOW)
def test_reference_master_follows_torch_adamw(dtype):
    """The oracle itself: with a master, the master follows torch.optim.AdamW on fp32 copies
    (same gradients) to fp32 rounding, and the parameter is the master rounded."""
    g = _gen(3)
    w0 = (torch.randn(50, 37, generator=g) * 0.02).to(dtype)
    train = torch.rand(50, 37, generator=g) < 0.25
    p = torch.nn.Parameter(w0.clone())
    ref = torch.nn.Parameter(w0.float().clone())
    kw = dict(lr=2e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    opt = dowser.MaskedAdamW([p], {p: pack_mask(train)}, **kw)
    tref = torch.optim.AdamW([ref], **kw)
    for s in range(50):
        gr = torch.randn(50, 37, generator=g).to(dtype)
        p.grad = gr.clone()
        ref.grad = gr.float() * train  # zero grads at frozen entries: torch still decays them
        opt.step()
        tref.step()
    master = opt.state[p]["master"]
    torch.testing.assert_close(master, ref.detach()[train], rtol=1e-6, atol=1e-9)
    assert torch.equal(_bits(p.detach()[train]), _bits(master.to(dtype)))
    assert torch.equal(_bits(p.detach()[~train]), _bits(w0[~train]))


def test_op_master_arguments_are_optional():
    """Old callers (no masters argument, or an empty list) keep working."""
    p = [torch.randn(70).bfloat16()]
    g = [torch.randn(70).bfloat16()]
    m, v = [torch.zeros(70)], [torch.zeros(70)]
    torch.ops.dowser.masked_adamw_step(p, g, m, v, [None], [None], [1.0], 1e-3, 0.9, 0.99, 1e-8,
                                       0.0, False)
    torch.ops.dowser.masked_adamw_step(p, g, m, v, [None], [None], [2.0], 1e-3, 0.9, 0.99, 1e-8,
                                       0.0, False, False, None)
    with pytest.raises(ValueError, match="masters has 2 entries"):
        reference.masked_adamw_(p, g, m, v, [None], [None], [3.0], 1e-3, 0.9, 0.99, 1e-8, 0.0,
                                False, False, [None, None])


# ---- state: state_dict, resume (both layouts), distributed checkpoint view ---------------------

def _model_and_masks(dtype=torch.bfloat16):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(37, 29), torch.nn.Linear(29, 11)).to(dtype)
    masks = {n: pack_mask(torch.rand(p.shape, generator=_gen(i)) < 0.3)
             for i, (n, p) in enumerate(model.named_parameters()) if p.dim() == 2}
    return model, masks


def _steps(model, opt, n, seed):
    g = _gen(seed)
    for _ in range(n):
        x = torch.randn(16, 37, generator=g).to(next(model.parameters()).dtype)
        opt.zero_grad()
        model(x).float().pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("save_compact,load_compact", [(True, True), (True, False), (False, True)])
def test_resume_is_bit_identical(save_compact, load_compact):
    import io

    model, masks = _model_and_masks()
    opt = dowser.MaskedAdamW(model.parameters(), masks, model=model, lr=1e-3,
                             compact_state=save_compact)
    _steps(model, opt, 3, seed=1)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _steps(model, opt, 4, seed=2)  # the uninterrupted run

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2, _ = _model_and_masks()
    model2.load_state_dict(saved["model"])
    opt2 = dowser.MaskedAdamW(model2.parameters(), masks, model=model2, lr=1e-3,
                              compact_state=load_compact)
    opt2.load_state_dict(saved["opt"])
    for p in model2.parameters():
        assert opt2.state[p]["master"].dtype == torch.float32
        assert opt2.state[p]["master"].shape == opt2.state[p]["exp_avg"].shape
    _steps(model2, opt2, 4, seed=2)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(_bits(a), _bits(b))
    for a, b in zip(model.parameters(), model2.parameters()):
        ma, mb = opt.state[a]["master"], opt2.state[b]["master"]
        if ma.shape != mb.shape:
            ma, mb = opt._dense_state(a, ma), opt2._dense_state(b, mb)
            if a.dim() == 2:  # a dense master's frozen entries are never read: compare trainable
                t = reference.unpack_mask(masks[[n for n, q in model.named_parameters() if q is a][0]],
                                          a.numel()).view(a.shape)
                ma, mb = ma[t], mb[t]
        assert torch.equal(ma, mb)


def test_resume_without_saved_master_starts_it_from_the_parameter():
    model, masks = _model_and_masks()
    opt = dowser.MaskedAdamW(model.parameters(), masks, model=model, master_weights=False)
    _steps(model, opt, 2, seed=1)
    sd = opt.state_dict()
    assert all("master" not in st for st in sd["state"].values())
    opt2 = dowser.MaskedAdamW(model.parameters(), masks, model=model)
    opt2.load_state_dict(sd)
    before = [p.detach().clone() for p in model.parameters()]
    _steps(model, opt2, 1, seed=3)
    for p, p0 in zip(model.parameters(), before):
        assert "master" in opt2.state[p]
        assert not torch.equal(p.detach(), p0)
    # and the other way: a master in the file, master_weights=False here: dropped
    opt3 = dowser.MaskedAdamW(model.parameters(), masks, model=model, master_weights=False)
    opt3.load_state_dict(opt2.state_dict())
    assert all("master" not in opt3.state[p] for p in model.parameters())


def test_distributed_checkpoint_view_round_trips_masters():
    """dowser.distributed.optimizer_state_dict lays the master out densely like the moments
    (the layout dcp saves, sharded like the parameter under FSDP2); loading compacts it."""
    model, masks = _model_and_masks()
    opt = dowser.MaskedAdamW(model.parameters(), masks, model=model, lr=1e-3)
    template = optimizer_state_dict(opt, model)  # before any step: zeros, the dcp.load template
    assert all("master" in e for e in template["state"].values())
    _steps(model, opt, 2, seed=1)
    view = optimizer_state_dict(opt, model)
    for name, p in model.named_parameters():
        assert view["state"][name]["master"].shape == p.shape
    opt2 = dowser.MaskedAdamW(model.parameters(), masks, model=model, lr=1e-3)
    load_optimizer_state_dict(opt2, model, view)
    for p in model.parameters():
        assert torch.equal(opt2.state[p]["master"], opt.state[p]["master"])
    fp32 = torch.nn.Linear(5, 3)
    opt32 = dowser.MaskedAdamW(fp32.parameters(), {}, model=fp32)
    assert all("master" not in e for e in optimizer_state_dict(opt32, fp32)["state"].values())


def test_refresh_master_weights_after_an_outside_write():
    model, masks = _model_and_masks()
    opt = dowser.MaskedAdamW(model.parameters(), masks, model=model, lr=1e-3)
    _steps(model, opt, 1, seed=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # e.g. loading other weights
    written = [p.detach().float().clone() for p in model.parameters()]
    opt.refresh_master_weights()
    _steps(model, opt, 1, seed=2)
    # One step at lr 1e-3 moves an entry by about 1e-3 (at most a bf16 ulp, 8e-3 near 1); a stale
    # master would pull each trainable entry back by about 1.0, 2-D and 1-D parameters alike.
    for (name, p), w in zip(model.named_parameters(), written):
        err = (p.detach().float() - w).abs().max()
        assert err < 1e-2, f"{name}: the outside write was undone (max change {err:.3f})"


# ---- bytes --------------------------------------------------------------------------------

def test_state_bytes_per_param_with_master():
    """Compact AdamW state of a bf16 parameter at rho = 0.1: exp_avg + exp_avg_sq + master
    (12 bytes per trainable entry) + the prefix sums (4 bytes per 32 entries) = 12*rho + 0.125
    = 1.325 bytes per parameter, against 8 for torch AdamW (fp32 state) and 16 for torch AdamW
    with a dense fp32 master copy (mixed precision)."""
    n_out, n_in = 1024, 1000
    n = n_out * n_in
    p = torch.nn.Parameter(torch.zeros(n_out, n_in, dtype=torch.bfloat16))
    train = torch.zeros(n, dtype=torch.bool)
    train[torch.randperm(n, generator=_gen(0))[: round(0.1 * n)]] = True
    opt = dowser.MaskedAdamW([p], {p: pack_mask(train.view(n_out, n_in))})
    p.grad = torch.randn(p.shape, generator=_gen(1)).bfloat16()
    opt.step()
    state = sum(t.numel() * t.element_size() for t in opt.state[p].values() if t.dim())
    state += opt._offsets[p].numel() * opt._offsets[p].element_size()
    per_param = state / n
    assert math.isclose(per_param, 12 * 0.1 + 4 / 32, rel_tol=1e-3), per_param
    master = opt.state[p]["master"]
    assert master.numel() * master.element_size() / n == pytest.approx(0.4, rel=1e-3)
    print(f"\ncompact AdamW state incl. master, rho=0.1, bf16: {per_param:.3f} B/param")
