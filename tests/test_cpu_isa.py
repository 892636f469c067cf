"""Every CPU instruction-set path of dowser._C (issue 13), forced through DOWSER_CPU_CAPABILITY,
against the plain-PyTorch reference bit for bit; fp32 master weights in the masked steps
(issue 16); the build configuration's pinned rounding (no FMA contraction)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from dowser import _build_config, _ext, reference

ROOT = Path(__file__).resolve().parent.parent
CAPS = ["default", "avx2", "avx512", "neon"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _ext_or_skip():
    mod = _ext.load()
    if mod is None or not hasattr(mod, "cpu_capability"):
        pytest.skip("dowser._C (with instruction-set dispatch) is not available")
    return mod


@pytest.fixture(params=CAPS)
def cap(request, monkeypatch):
    """Force one instruction-set path (skipping those this CPU cannot run)."""
    mod = _ext_or_skip()
    if request.param not in mod.cpu_capabilities().split(","):
        pytest.skip(f"this CPU does not run the {request.param} path ({mod.cpu_capabilities()})")
    monkeypatch.setenv("DOWSER_CPU_CAPABILITY", request.param)
    assert mod.cpu_capability() == request.param
    return mod


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(INT_VIEW[a.dtype]), b.view(INT_VIEW[b.dtype]))


def _problem(dtype, seed, nan=False):
    """Tensors spanning several 8192-entry blocks (and a partial last word): a random mask, an
    all-ones mask (the in-place path), a sparse mask with empty words, and an unmasked 1-D."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(97, 211), (75, 130), (131, 67), (37,)]
    rho = [0.3, 1.0, 0.03, None]
    params, grads, masks = [], [], []
    for shape, r in zip(shapes, rho):
        p = torch.randn(shape, generator=g).to(dtype)
        gr = (torch.randn(shape, generator=g) * 3).to(dtype)
        gr.view(-1)[::97] = 0.0  # zeros and ties
        if nan:
            gr.view(-1)[5::1013] = float("nan")
            gr.view(-1)[11::2039] = float("inf")
        params.append(p)
        grads.append(gr)
        masks.append(None if r is None else reference.pack_mask(torch.rand(shape, generator=g) < r))
    return params, grads, masks


def _state(params, masks, compact, gen):
    exp_avgs, exp_avg_sqs, offsets = [], [], []
    for p, m in zip(params, masks):
        off = reference.word_offsets(m) if (compact and m is not None) else None
        n = reference.count_trainable(m, off) if off is not None else p.numel()
        exp_avgs.append(torch.randn(n, generator=gen) * 0.1)
        exp_avg_sqs.append(torch.rand(n, generator=gen) * 0.01)
        offsets.append(off)
    return exp_avgs, exp_avg_sqs, offsets


def _e(ts):
    empty = torch.empty(0, dtype=torch.int32)
    return [empty if t is None else t for t in ts]


def _clone(ts):
    return [t.clone() for t in ts]


ADAM_HP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.05)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("mode", ["check", "skip", "skip-nan", "check-nan", "maximize"])
def test_adamw_every_path_matches_reference(cap, dtype, compact, mode):
    params, grads, masks = _problem(dtype, 0, nan=mode.endswith("nan"))
    m, v, offs = _state(params, masks, compact, torch.Generator().manual_seed(1))
    steps = [3.0, 1.0, 7.0, 2.0]
    skip, maximize = mode.startswith("skip"), mode == "maximize"
    want_p, want_m, want_v = _clone(params), _clone(m), _clone(v)
    want = reference.masked_adamw_(want_p, grads, want_m, want_v, masks, offs, steps,
                                   maximize=maximize, skip_nonfinite=skip, **ADAM_HP)
    got_p, got_m, got_v = _clone(params), _clone(m), _clone(v)
    got = cap.masked_adamw_cpu(got_p, grads, got_m, got_v, _e(masks), _e(offs), steps, ADAM_HP["lr"],
                               ADAM_HP["beta1"], ADAM_HP["beta2"], ADAM_HP["eps"],
                               ADAM_HP["weight_decay"], maximize, skip, _e([None] * 4))
    assert torch.equal(got, want)
    if mode == "check-nan":
        assert int(got.sum()) > 0  # nothing written
    for a, b in zip(got_p + got_m + got_v, want_p + want_m + want_v):
        assert _bits_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum,nesterov,first", [(0.0, False, False), (0.9, False, True),
                                                     (0.9, True, False)])
def test_sgd_every_path_matches_reference(cap, dtype, momentum, nesterov, first):
    params, grads, masks = _problem(dtype, 2)
    bufs, _, offs = _state(params, masks, True, torch.Generator().manual_seed(3))
    bufs = bufs if momentum else []
    hp = (1e-2, momentum, 0.1, 0.01, nesterov, False)
    want_p, want_b = _clone(params), _clone(bufs)
    reference.masked_sgd_(want_p, grads, want_b, masks, offs, [first] * 4, *hp)
    got_p, got_b = _clone(params), _clone(bufs)
    cap.masked_sgd_cpu(got_p, grads, got_b, _e(masks), _e(offs), [first] * 4, *hp, _e([None] * 4))
    for a, b in zip(got_p + got_b, want_p + want_b):
        assert _bits_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_count_pack_unpack_every_path(cap, dtype):
    _, grads, masks = _problem(dtype, 4, nan=True)
    assert torch.equal(cap.count_nonfinite_cpu(grads, _e(masks)), reference.count_nonfinite(grads, masks))
    gen = torch.Generator().manual_seed(5)
    for n in (0, 1, 31, 33, 4096 * 33 + 7):
        keep = torch.rand(n, generator=gen) < 0.4
        packed = cap.pack_mask_cpu(keep)
        assert torch.equal(packed, reference.pack_mask(keep))
        assert torch.equal(cap.unpack_mask_cpu(packed, n), keep)


@pytest.mark.parametrize("dtype", DTYPES)
def test_count_finds_each_single_nonfinite(cap, dtype):
    """One NaN/Inf at a time, trainable or frozen, at positions across the count pass's layout
    (interleaved streams of 8-word groups, the words after the last full group, a partial last
    word, an empty mask word): counted exactly when trainable, never when frozen."""
    n = 8192 * 2 + 32 * 37 + 13  # two full tasks, a task of 37 words (not a multiple of 8) + 13
    gen = torch.Generator().manual_seed(7)
    keep = torch.rand(n, generator=gen) < 0.5
    keep[32 * 5:32 * 6] = False  # an empty word
    mask = reference.pack_mask(keep)
    base = torch.randn(n, generator=gen).to(dtype)
    positions = [0, 31, 32 * 5 + 3, 255, 256, 2047, 2048, 4100, 8191, 8192, 12345, 16383, 16384,
                 16384 + 32 * 36 + 5, n - 13, n - 1]
    for i in positions:
        for bad in (float("nan"), float("inf"), float("-inf")):
            g = base.clone()
            g[i] = bad
            want = int(keep[i])
            assert cap.count_nonfinite_cpu([g], [mask]).tolist() == [want], (i, bad)
            assert cap.count_nonfinite_cpu([g], [torch.empty(0, dtype=torch.int32)]).tolist() == [1]


@pytest.mark.parametrize("k", [1, 2000, 4000])
def test_select_same_bits_on_every_path(cap, k):
    """Every path against the plain-PyTorch reference (not against the default path, which
    would compare the default path with itself): the scores |W| * (Psi A) of an fp64
    computation to fp32 rounding, the masks exactly the k lowest of the path's own scores
    (ties by matrix, then flat index: reference.select_from_scores), the stats alike."""
    gen = torch.Generator().manual_seed(6)
    ws = [torch.randn(67, 301, generator=gen), torch.randn(130, 45, generator=gen).to(torch.bfloat16)]
    ps = [torch.rand(w.shape[0], 5, generator=gen) for w in ws]
    as_ = [torch.rand(5, w.shape[1], generator=gen) for w in ws]
    own = [cap.scores_cpu(w, p, a) for w, p, a in zip(ws, ps, as_)]
    for w, p, a, s in zip(ws, ps, as_, own):
        want = w.double().abs() * (p.double() @ a.double())
        torch.testing.assert_close(s.double(), want, rtol=2e-7, atol=0.0)
    masks, stats = cap.select_masks_cpu(ws, ps, as_, k)
    ref_masks, ref_stats = reference.select_from_scores(own, k)
    assert all(torch.equal(a, b) for a, b in zip(masks, ref_masks))
    assert torch.equal(stats, ref_stats)
    assert sum(int(reference.unpack_mask(m, w.numel()).sum()) for m, w in zip(masks, ws)) == k


def test_override_errors():
    mod = _ext_or_skip()
    supported = mod.cpu_capabilities().split(",")
    os.environ["DOWSER_CPU_CAPABILITY"] = "sse9"
    try:
        with pytest.raises(RuntimeError, match="unknown"):
            mod.cpu_capability()
        with pytest.raises(RuntimeError, match="DOWSER_CPU_CAPABILITY=sse9"):
            mod.pack_mask_cpu(torch.ones(3, dtype=torch.bool))
        other = "neon" if platform.machine() in ("x86_64", "AMD64") else "avx2"
        os.environ["DOWSER_CPU_CAPABILITY"] = other
        with pytest.raises(RuntimeError, match=other):
            mod.cpu_capability()
    finally:
        del os.environ["DOWSER_CPU_CAPABILITY"]
    assert mod.cpu_capability() == supported[-1] or os.environ.get("DOWSER_NO_AVX512")


def test_backend_info_names_the_path():
    import dowser

    _ext_or_skip()
    info = dowser.backend_info()
    assert info["_C"]["cpu_capability"] == _ext.load().cpu_capability()
    assert info["masked_adamw_step"]["cpu"].get("cpu_capability") == _ext.load().cpu_capability()


# ---- fp32 master weights (issue 16, kernel side) ---------------------------------------------

def _master_reference(param, grad, m, v, mask, off, master, step, skip):
    """The master is updated like an fp32 parameter; the param becomes master.to(dtype) on the
    trainable entries it updated (frozen and skipped entries keep their bits)."""
    full = param.float().reshape(-1).clone()
    idx = None if mask is None else reference.unpack_mask(mask, param.numel())
    if off is not None:
        full[idx] = master
    else:
        full.copy_(master)
    before = full.clone()
    reference.masked_adamw_([full], [grad.float().reshape(-1)], [m], [v], [mask], [off], [step],
                            skip_nonfinite=skip, maximize=False, **ADAM_HP)
    new_master = full[idx] if off is not None else full
    changed = full.view(torch.int32) != before.view(torch.int32)
    p = param.reshape(-1).clone()
    if idx is not None:
        changed &= idx
    if skip:
        changed &= torch.isfinite(grad.float().reshape(-1))
    p[changed] = full[changed].to(param.dtype)
    return p.view(param.shape), new_master, m, v


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("skip", [False, True])
def test_adamw_master_weights(cap, dtype, compact, skip):
    """Param, master AND moments bit for bit on every path (the tensors span several 8192-entry
    tasks), compact and dense state, check and skip mode."""
    params, grads, masks = _problem(dtype, 7, nan=skip)
    gen = torch.Generator().manual_seed(8)
    m, v, offs = _state(params, masks, compact, gen)
    masters = []
    for p, mask, off in zip(params, masks, offs):
        flat = p.float().reshape(-1) + torch.randn(p.numel(), generator=gen) * 1e-3  # off-grid
        masters.append(flat[reference.unpack_mask(mask, p.numel())].clone() if off is not None else flat)
    want = [_master_reference(p, g, mi.clone(), vi.clone(), mk, off, w.clone(), 4.0, skip)
            for p, g, mi, vi, mk, off, w in zip(params, grads, m, v, masks, offs, masters)]
    got_p, got_w, got_m, got_v = _clone(params), _clone(masters), _clone(m), _clone(v)
    cap.masked_adamw_cpu(got_p, grads, got_m, got_v, _e(masks), _e(offs), [4.0] * 4,
                         ADAM_HP["lr"], ADAM_HP["beta1"], ADAM_HP["beta2"], ADAM_HP["eps"],
                         ADAM_HP["weight_decay"], False, skip, got_w)
    assert max(p.numel() for p in params) > 2 * 8192  # past one task
    for i, (gp, gw, gm, gv, (wp, ww, wm, wv)) in enumerate(zip(got_p, got_w, got_m, got_v, want)):
        assert _bits_equal(gw, ww), f"tensor {i}: master"
        assert _bits_equal(gp, wp), f"tensor {i}: param"
        assert _bits_equal(gm, wm), f"tensor {i}: exp_avg"
        assert _bits_equal(gv, wv), f"tensor {i}: exp_avg_sq"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sgd_master_weights(cap, dtype):
    params, grads, masks = _problem(dtype, 9)
    bufs, _, offs = _state(params, masks, True, torch.Generator().manual_seed(10))
    masters = [p.float().reshape(-1)[reference.unpack_mask(mk, p.numel())].clone() if off is not None
               else p.float().reshape(-1).clone() for p, mk, off in zip(params, masks, offs)]
    hp = (1e-2, 0.9, 0.0, 0.01, False, False)
    # reference: the same step on fp32 copies, then rounded
    full = [p.float().clone() for p in params]
    want_b = _clone(bufs)
    reference.masked_sgd_(full, [g.float() for g in grads], want_b, masks, offs, [False] * 4, *hp)
    got_p, got_b, got_w = _clone(params), _clone(bufs), _clone(masters)
    cap.masked_sgd_cpu(got_p, grads, got_b, _e(masks), _e(offs), [False] * 4, *hp, got_w)
    for p, f, mk, off, gp, gw in zip(params, full, masks, offs, got_p, got_w):
        idx = reference.unpack_mask(mk, p.numel()) if mk is not None else torch.ones(p.numel(), dtype=torch.bool)
        assert _bits_equal(gw, f.reshape(-1)[idx] if off is not None else f.reshape(-1))
        want_p = p.reshape(-1).clone()
        want_p[idx] = f.reshape(-1)[idx].to(p.dtype)
        assert _bits_equal(gp.reshape(-1), want_p)
    for a, b in zip(got_b, want_b):
        assert _bits_equal(a, b)


def test_master_weights_bad_input():
    mod = _ext_or_skip()
    p32 = torch.zeros(40)
    g = torch.zeros(40)
    s = [torch.zeros(40)]
    e = torch.empty(0, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="float32 params take no master weights"):
        mod.masked_adamw_cpu([p32], [g], s, [torch.zeros(40)], [e], [e], [1.0], 1e-3, 0.9, 0.999, 1e-8,
                             0.0, False, False, [torch.zeros(40)])
    pb = torch.zeros(40, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="master weights have 39 entries"):
        mod.masked_adamw_cpu([pb], [pb.clone()], s, [torch.zeros(40)], [e], [e], [1.0], 1e-3, 0.9, 0.999,
                             1e-8, 0.0, False, False, [torch.zeros(39)])
    with pytest.raises(RuntimeError, match="contiguous float32"):
        mod.masked_sgd_cpu([pb], [pb.clone()], [], [e], [e], [False], 1e-3, 0.0, 0.0, 0.0, False, False,
                           [torch.zeros(40, dtype=torch.float64)])


# ---- pinned rounding: no FMA contraction ----------------------------------------------------

def test_build_config_pins_no_contraction():
    for with_cuda in (False, True):
        _build_config.check_flags(_build_config.cxx_flags(with_cuda))
    assert "--fmad=false" in _build_config.nvcc_flags()
    with pytest.raises(ValueError, match="-ffp-contract=fast"):
        _build_config.check_flags(_build_config.cxx_flags(False) + ["-ffp-contract=fast"])
    with pytest.raises(ValueError, match="-ffp-contract=off"):
        _build_config.check_flags(["-O3"])
    with pytest.raises(ValueError, match="march=native"):
        _build_config.check_flags(["-march=native"] + _build_config.cxx_flags(False))
    env = {"CFLAGS": "-O2 -march=native -g", "CXXFLAGS": "-ffast-math"}
    assert len(_build_config.sanitize_env(env)) == 2 and env == {"CFLAGS": "-O2 -g", "CXXFLAGS": ""}
    # setup.py and the JIT build both take their flags from the shared configuration
    if (ROOT / "setup.py").is_file():  # the source tree (not an installed package)
        assert "_build_config" in (ROOT / "setup.py").read_text()
    assert "_build_config" in Path(_ext.__file__).read_text()


PROBE = r"""
#include <cstdio>
#include <cstdlib>
#include "dowser/update_math.h"
int main(int argc, char** argv) {
  // a*b is inexact: separately rounded, a*b + c is 0; fused it is the product's rounding error.
  const float a = std::strtof(argv[1], nullptr), c = std::strtof(argv[2], nullptr);
  float m = 0.1f, v = 0.2f, p = 1.0f;
  dowser::math::AdamScalars s{1.0f, 0.1f, 0.999f, 0.001f, 1e-8f, 0.01f, 0.5f};
  dowser::math::adamw_entry(c, p, m, v, s);  // the real update math under the same flags
  std::printf("%a %a %a %a\n", dowser::math::add(dowser::math::mul(a, a), c), p, m, v);
  return 0;
}
"""


def _csrc_include() -> Path:
    """csrc/include of the source tree, or the copy an installed package ships (dowser/_csrc)."""
    src = _ext._csrc_dir()
    if src is None:
        pytest.skip("this install ships no C++ sources")
    return src / "include"


def _probe(tmp_path, extra):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    src = tmp_path / "probe.cpp"
    src.write_text(PROBE)
    exe = tmp_path / f"probe{len(extra)}"
    arch = ["-march=x86-64-v3"] if platform.machine() == "x86_64" else []  # has FMA
    flags = [f for f in _build_config.cxx_flags(False) if f != "-fopenmp"]
    subprocess.run([cxx, *arch, *flags, *extra, f"-I{_csrc_include()}", str(src), "-o", str(exe)],
                   check=True, capture_output=True)
    a = 1.0 + 2.0**-12
    out = subprocess.run([str(exe), repr(a), repr(-(1.0 + 2.0**-11))], check=True, capture_output=True,
                         text=True).stdout.split()
    return [float.fromhex(x) for x in out]


def test_fma_contraction_is_caught(tmp_path):
    if platform.machine() == "x86_64" and "fma" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("this CPU has no FMA")
    pinned = _probe(tmp_path, [])
    assert pinned[0] == 0.0  # the shared build flags: every operation rounded on its own
    # the real update math under those flags: each float32 operation rounded, in fused-AdamW order
    f = np.float32
    g, p, m, v = f(-(1.0 + 2.0**-11)), f(1.0), f(0.1), f(0.2)
    decay, w1, beta2, omb2, eps, step_size, bc2 = map(f, (1.0, 0.1, 0.999, 0.001, 1e-8, 0.01, 0.5))
    pt = p * decay
    mt = m + w1 * (g - m)
    vt = beta2 * v + omb2 * (g * g)
    denom = np.sqrt(vt) / bc2 + eps
    want = [float(pt - (step_size * mt) / denom), float(mt), float(vt)]
    assert pinned[1:] == want, (pinned[1:], want)
    fused = _probe(tmp_path, ["-ffp-contract=fast"])
    assert fused[0] == 2.0**-24  # the probe sees contraction when it sneaks in ...
    with pytest.raises(ValueError):  # ... and the configuration check refuses such flags
        _build_config.check_flags(_build_config.cxx_flags(False) + ["-ffp-contract=fast"])
