"""The GPU half's classes of defect, made testable on CPU (issue 31).

- would-be host syncs on the hot paths (selection, optimizer step, step_in_backward),
  counted by tests/sync_counter.py on CPU tensors;
- device guards and one-device checks of every CUDA/Triton wrapper, with tensors on two fake
  CUDA devices and a fake CUDA runtime that records the current device at each launch;
- Triton pointer arguments 16-byte aligned (one compile per group);
- no fp32 matmul in the reference (TF32 would leak into it on a GPU);
- the CUDA architectures the build emits (SASS + PTX), and the fallback for a device it
  cannot run.
The same checks run for real on a GPU from bench/gpu_check.sh (sync debug mode "error",
two devices when present): see test_sync_debug_mode_on_gpu and test_two_gpus below.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import dowser
from dowser import _bits, _registry, reference
from dowser.ops import pack_mask
from tests.sync_counter import WouldBeSyncs

ROOT = Path(__file__).resolve().parents[1]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _triton_select():
    from tests.conftest import backend_fn

    return backend_fn("select_masks_global", "triton", "cpu")


# ---- would-be host syncs -------------------------------------------------------------------

@pytest.mark.parametrize("k_frac", [0.0, 0.3, 1.0])
def test_selection_makes_no_host_sync(k_frac):
    """The Triton selection (the GPU path) keeps its threshold state on the device: no
    device value read on the host, no host value copied into a device tensor, and every
    result is a device tensor (a host-made one would be a blocking copy on a GPU)."""
    select = _triton_select()
    g = _gen(1)
    layers = [(torch.randn(8, 64, generator=g), torch.rand(3, 8, generator=g),  # 2-D tiles
               torch.rand(3, 64, generator=g), torch.tensor([1.0, 2.0, 1.0])),
              (torch.randn(7, 33, generator=g), torch.rand(2, 7, generator=g),  # flat blocks
               torch.rand(2, 33, generator=g), torch.tensor([1.0, 1.0]))]
    n = sum(w.numel() for w, *_ in layers)
    k = int(k_frac * n)
    args = [list(x) for x in zip(*layers)]
    with WouldBeSyncs(args) as syncs:
        masks, stats = select(*args, k)
    assert syncs.count == 0, f"{syncs.count} would-be host syncs per selection:\n{syncs.report()}"
    assert all(syncs.is_device(m) for m in masks) and syncs.is_device(stats), \
        "a result was made on the host (a host-to-device copy on a GPU)"
    want, want_stats = reference.select_masks_global(*args, k)
    assert all(torch.equal(a, b) for a, b in zip(masks, want)) and torch.equal(stats, want_stats)


def test_word_offsets_makes_no_host_sync():
    """Compact-state offsets of a 262,144-word mask (8.4M entries) without a host read (the
    chunked scan used to carry its running sum through the host: 16 syncs)."""
    g = _gen(2)
    mask = torch.randint(-2**31, 2**31 - 1, (1 << 18,), dtype=torch.int32, generator=g)
    with WouldBeSyncs(mask) as syncs:
        off = _bits.word_offsets(mask)
    assert syncs.count == 0, f"{syncs.count} would-be host syncs:\n{syncs.report()}"
    counts = torch.tensor([bin(w & 0xFFFFFFFF).count("1") for w in mask[:4096].tolist()])
    assert torch.equal(off[:4096].long(), torch.cumsum(counts, 0) - counts)
    total = int(off[-1]) + bin(int(mask[-1]) & 0xFFFFFFFF).count("1")
    assert total == _bits.popcount(mask)


def _model(layers=6, width=24, dtype=torch.float32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False, dtype=dtype)
                                  for _ in range(layers)])
    g = _gen(3)
    masks = {p: pack_mask(torch.rand(p.shape, generator=g) < 0.3) for p in model.parameters()}
    return model, masks


def _backward(model, x):
    model(x).float().square().mean().backward()


def _syncs_per_step(opt, model, x, steps=3, in_backward=False):
    """Would-be syncs of each step after the first (steady state), and of the first."""
    counts = []
    for _ in range(steps):
        if not in_backward:
            _backward(model, x)
        with WouldBeSyncs(opt, model, x) as syncs:
            if in_backward:
                _backward(model, x)
            opt.step()
        counts.append((syncs.count, syncs.report()))
        opt.zero_grad(set_to_none=True)
    return counts


@pytest.mark.parametrize("kind", ["adamw-check", "adamw-skip", "adamw-grads-finite", "sgd",
                                  "adamw-2-groups", "sgd-2-groups", "adamw-bf16-master"])
def test_optimizer_step_at_most_one_sync(kind):
    """A masked optimizer step reads the NaN/Inf verdict on the host at most once (the
    default atomic mode must raise naming the parameter); step counters live on the host by
    design and do not count."""
    dtype = torch.bfloat16 if "bf16" in kind else torch.float32
    model, masks = _model(dtype=dtype)
    params = list(model.parameters())
    groups = [{"params": params[:3]}, {"params": params[3:]}] if "2-groups" in kind else params
    if kind.startswith("sgd"):
        opt = dowser.MaskedSGD(groups, masks, lr=1e-2, momentum=0.9)
    else:
        opt = dowser.MaskedAdamW(groups, masks, lr=1e-3,
                                 nonfinite="skip" if "skip" in kind else "check")
    if "grads-finite" in kind:
        step = opt.step
        opt.step = lambda: step(grads_finite=True)
    x = torch.randn(5, 24, dtype=dtype)
    counts = _syncs_per_step(opt, model, x)
    for n, report in counts[1:]:
        assert n <= 1, f"{kind}: {n} would-be host syncs per step:\n{report}"


def test_step_in_backward_one_sync_per_backward():
    """step_in_backward updates each parameter in its gradient hook; the NaN/Inf verdicts of
    all hooks are read once, at the end of the backward pass (it used to be once per
    parameter: 6 over 6 layers)."""
    model, masks = _model()
    opt = dowser.MaskedAdamW(model.parameters(), masks, lr=1e-3, step_in_backward=True)
    x = torch.randn(5, 24)
    counts = _syncs_per_step(opt, model, x, in_backward=True)
    for n, report in counts[1:]:
        assert n <= 1, f"{n} would-be host syncs per step_in_backward step:\n{report}"


@pytest.mark.parametrize("nonfinite", ["check", "skip"])
def test_step_in_backward_still_raises_on_nan(nonfinite):
    """The deferred verdict still raises from backward(), naming the parameter."""
    model, masks = _model(layers=3)
    opt = dowser.MaskedAdamW(model.parameters(), masks, lr=1e-3, step_in_backward=True,
                             nonfinite=nonfinite)
    names = {p: f"layer{i}" for i, p in enumerate(model.parameters())}
    opt._names.update(names)
    bad = list(model.parameters())[1]
    bad.register_hook(lambda g: torch.full_like(g, float("nan")))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="layer1"):
        _backward(model, torch.randn(4, 24))
    if nonfinite == "check":  # the NaN parameter's step wrote nothing
        assert torch.equal(bad.detach(), before[1])
    # and the next backward works normally (the pending verdicts were cleared)
    model2, masks2 = _model(layers=3)
    opt2 = dowser.MaskedAdamW(model2.parameters(), masks2, lr=1e-3, step_in_backward=True)
    _backward(model2, torch.randn(4, 24))
    _backward(model2, torch.randn(4, 24))
    assert all(opt2.state[p]["step"] == 2 for p in model2.parameters())


def test_counter_sees_the_defects():
    """The instrument itself: each class of sync it must catch, and host tensors it must not."""
    dev = torch.zeros(8, dtype=torch.int64)
    host_step, host_table = torch.tensor(3.0), torch.arange(3)
    with WouldBeSyncs(dev) as syncs:
        dev[2] = 21                   # host scalar copied into a device tensor
        dev[3:4].fill_(5)             # a fill is a launch: no sync
        int(dev[0])                   # device value read on the host
        dev.cpu()
        dev.tolist()
        torch.tensor([1, 2], device=dev.device)
        host_table.to(dev.device)     # a host tensor moved to the device
        dev[dev > 0]                  # boolean indexing: shape from device data
        float(host_step)              # host-resident by design: not a sync
        host_step += 1.0
        float(host_step)
    kinds = [k.split(" (")[0] for k, _ in syncs.events]
    assert kinds == ["host-to-device copy", "_local_scalar_dense", "device-to-host copy",
                     "device-to-host copy", "host-to-device copy", "host-to-device copy",
                     "index with a boolean mask"], syncs.report()
    assert syncs.host_reads == 2


# ---- device guard and one-device checks of the CUDA/Triton wrappers -------------------------

class _FakeCuda:
    """Just enough of torch.cuda for the wrappers: a current device, per-device streams,
    `torch.cuda.device(d)` as a guard; launches record the current device."""

    def __init__(self):
        self.current = 0
        self.launches: list[tuple[str, int, int | None, set]] = []

    def device(self, d):
        fake = self

        class Guard:
            def __enter__(self):
                self.prev = fake.current
                idx = torch.device(d).index if not isinstance(d, int) else d
                fake.current = fake.current if idx is None else idx
                return self

            def __exit__(self, *exc):
                fake.current = self.prev

        return Guard()

    def current_stream(self, device=None):
        idx = self.current if device is None or torch.device(device).index is None \
            else torch.device(device).index
        return types.SimpleNamespace(cuda_stream=1000 + idx)

    def record(self, name, args, stream=None):
        from torch.utils._pytree import tree_flatten

        devs = {t.device.index for t in tree_flatten(list(args))[0] if isinstance(t, torch.Tensor)}
        self.launches.append((name, self.current, stream, devs))


def _wrapper_args(op: str, device: str) -> tuple:
    """Small contiguous arguments of every op a CUDA/Triton wrapper implements."""
    d = torch.device(device)
    f32 = dict(dtype=torch.float32, device=d)
    w, psi, a, bw = (torch.empty(8, 64, **f32), torch.empty(2, 8, **f32),
                     torch.empty(2, 64, **f32), torch.empty(2, **f32))
    p = [torch.empty(40, **f32), torch.empty(6, 7, **f32)]
    g = [torch.empty(40, **f32), torch.empty(6, 7, **f32)]
    masks = [torch.empty(2, dtype=torch.int32, device=d), None]
    offs = [torch.empty(2, dtype=torch.int32, device=d), None]
    st = [torch.empty(10, **f32), torch.empty(42, **f32)]
    return {
        "pack_mask": (torch.empty(5, 40, dtype=torch.bool, device=d),),
        "unpack_mask": (torch.empty(7, dtype=torch.int32, device=d), 200),
        "scores": (w, psi, a, bw),
        "select_mask": (w, psi, a, bw, 100),
        "select_masks_global": ([w, w], [psi, psi], [a, a], [bw, bw], 100),
        "count_nonfinite": (g, masks),
        "masked_adamw_step": (p, g, st, [s.clone() for s in st], masks, offs, [1.0, 1.0], 1e-3,
                              0.9, 0.999, 1e-8, 0.0, False, False, None),
        "masked_sgd_step": (p, g, st, masks, offs, [True, True], 1e-2, 0.9, 0.0, 0.0, False,
                            False, None),
    }[op]


def _gpu_impls():
    return [(op, b, impl) for op, per in sorted(_registry._IMPLS.items())
            for b, impl in sorted(per.items()) if b in ("cuda", "triton")]


@pytest.fixture
def fake_cuda(monkeypatch):
    """Tensors on fake cuda:0/cuda:1 (FakeTensorMode: no memory, no kernels run) and a fake
    CUDA runtime; the C++ ops and the Triton launches record the current device instead."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dowser._ops.backends import _common
    from dowser._ops.backends import cuda as cuda_backend

    fake = _FakeCuda()
    monkeypatch.setattr(torch.cuda, "device", fake.device)
    monkeypatch.setattr(torch.cuda, "current_stream", fake.current_stream)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: fake.current)
    monkeypatch.setattr(_common, "_EMPTY", {})  # no fake tensors left in the cache

    def cxx(name):
        def run(*args):
            fake.record(name, args, stream=next(x for x in args if isinstance(x, int)
                                                and not isinstance(x, bool) and x >= 1000))
            params = args[0]
            return torch.zeros(len(params), dtype=torch.int64, device=params[0].device)
        return run

    monkeypatch.setattr(cuda_backend, "_c", lambda: types.SimpleNamespace(
        masked_adamw_cuda=cxx("masked_adamw_cuda"), masked_sgd_cuda=cxx("masked_sgd_cuda")))
    monkeypatch.setattr(torch.ops.dowser_C, "count_nonfinite_cuda",
                        cxx("count_nonfinite_cuda"), raising=False)
    # Triton launches: every dowser.kernels module that launches
    import dowser.kernels._launch as launch_mod
    for name in ("pack", "score", "select"):
        mod = __import__(f"dowser.kernels.{name}", fromlist=["launch"])
        monkeypatch.setattr(mod, "launch", lambda kernel, grid, *args, **kw:
                            fake.record(getattr(kernel, "__name__", str(kernel)), args))
    assert launch_mod  # (the shared launch is replaced per module, where it is bound)
    with FakeTensorMode(allow_non_fake_inputs=True):
        yield fake


@pytest.mark.parametrize("op,backend", [(op, b) for op, b, _ in _gpu_impls()])
def test_wrapper_launches_on_its_tensors_device(op, backend, fake_cuda):
    """With cuda:0 current, a call on cuda:1 tensors launches on cuda:1 (its stream), and the
    current device is restored afterwards."""
    fn = _registry._IMPLS[op][backend].fn
    fn(*_wrapper_args(op, "cuda:1"))
    assert fake_cuda.launches, f"{op}/{backend}: nothing launched"
    for name, current, stream, devs in fake_cuda.launches:
        assert devs == {1}, (name, devs)
        assert current == 1, f"{op}/{backend}: {name} launched with cuda:{current} current, " \
                             "its tensors on cuda:1 (no device guard)"
        assert stream in (None, 1001), f"{op}/{backend}: {name} got the stream of another device"
    assert fake_cuda.current == 0


@pytest.mark.parametrize("op,backend", [(op, b) for op, b, _ in _gpu_impls()])
def test_wrapper_refuses_tensors_on_two_devices(op, backend, fake_cuda):
    args = list(_wrapper_args(op, "cuda:0"))
    other = _wrapper_args(op, "cuda:1")
    if sum(isinstance(x, (torch.Tensor, list)) for x in args) < 2:
        pytest.skip(f"{op} takes one tensor: nothing to mix")
    # the last tensor argument (or list) comes from the other device
    i = max(j for j, x in enumerate(args) if isinstance(x, torch.Tensor) or
            (isinstance(x, list) and any(isinstance(t, torch.Tensor) for t in x)))
    args[i] = other[i]
    fn = _registry._IMPLS[op][backend].fn
    with pytest.raises(ValueError, match="one device"):
        fn(*args)
    assert not fake_cuda.launches, "launched before checking the devices"


def test_every_gpu_wrapper_is_covered():
    """A new CUDA/Triton wrapper needs its arguments in _wrapper_args (so it is guarded too)."""
    for op, _, _ in _gpu_impls():
        _wrapper_args(op, "cpu")


# ---- Triton: one compile per group (16-byte aligned pointers) ------------------------------

def test_selection_pointers_are_16_byte_aligned():
    """Triton specialises pointers on 16-byte alignment: a view at an odd int64 offset (the
    per-layer slices of the tie-count scan) would compile a second WRITE kernel at run time."""
    pytest.importorskip("triton")
    from dowser.kernels import _launch, select

    g = _gen(4)
    # 3 tie-count entries (7 x 33 = 231 entries: one flat block each... and 8 x 64 tiles)
    layers = [(torch.randn(7, 33, generator=g), torch.rand(2, 7, generator=g),
               torch.rand(2, 33, generator=g)),
              (torch.randn(3, 64, generator=g), torch.rand(2, 3, generator=g),
               torch.rand(2, 64, generator=g)),
              (torch.randn(5, 33, generator=g), torch.rand(2, 5, generator=g),
               torch.rand(2, 33, generator=g))]
    with _launch.record() as launches:
        select.select_masks(layers, 100)
    bad = [(l.kernel.__name__, i) for l in launches for i, x in enumerate(l.args)
           if isinstance(x, torch.Tensor) and x.data_ptr() % 16]
    assert not bad, f"unaligned pointer arguments (kernel, position): {bad}"


# ---- TF32 cannot leak into the reference -----------------------------------------------------

def test_reference_has_no_fp32_matmul(monkeypatch):
    """On a GPU an fp32 matmul follows the global TF32 switch (HF `tf32=True`), which would
    break the reference's 1e-5-versus-fp64 contract; CPU ignores the switch, so the test
    checks that the reference does no fp32 matmul at all."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Matmuls(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("mm", "bmm", "addmm", "matmul", "baddbmm", "dot",
                                                "mv", "addmv", "_scaled_mm"):
                seen.append((func.overloadpacket.__name__,
                             [a.dtype for a in args if isinstance(a, torch.Tensor)]))
            return func(*args, **(kwargs or {}))

    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # what HF tf32=True sets
    try:
        g = _gen(5)
        w, psi, a = torch.randn(9, 70, generator=g), torch.rand(4, 9, generator=g), torch.rand(4, 70, generator=g)
        bw = torch.tensor([1.0, 2.0, 1.0, 3.0])
        with Matmuls():
            s = reference.scores(w, psi, a, bw)
            reference.select_mask(w, psi, a, bw, 100)
            reference.select_masks_global([w, w], [psi, psi], [a, a], [bw, bw], 100)
    finally:
        torch.set_float32_matmul_precision(prev)
    assert seen, "the reference did no matmul: this test no longer checks anything"
    fp32 = [x for x in seen if torch.float32 in x[1]]
    assert not fp32, f"fp32 matmuls in the reference (TF32 on a GPU): {fp32}"
    s64 = reference.scores64(w, psi, a, bw)
    assert torch.allclose(s.double(), s64, rtol=1e-6, atol=0)


# ---- CUDA architectures: what the build emits, and the fallback -----------------------------

def _build_config():
    from dowser import _build_config

    return _build_config


def test_arch_policy():
    """SASS for sm_80 and sm_90 plus compute_90 PTX (JIT-compiled by the driver on newer
    GPUs, Blackwell included); sm_70/75 cannot run any of it."""
    bc = _build_config()
    sass, ptx = bc.emitted_archs(bc.CUDA_ARCH_FLAGS)
    assert sass == {80, 90} and ptx == {90}
    runs = lambda cap: bc.runs_on(cap, bc.CUDA_ARCH_FLAGS)  # noqa: E731
    assert not runs((7, 0)) and not runs((7, 5))
    assert runs((8, 0)) and runs((8, 6)) and runs((8, 9)) and runs((9, 0))
    assert runs((10, 0)) and runs((12, 0))  # through the PTX


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_build_emits_the_arch_list(tmp_path):
    """nvcc with the build's own flags must embed exactly the SASS and PTX that
    emitted_archs() promises: read from the images nvcc hands to fatbinary (and from the
    object itself with cuobjdump, where installed)."""
    bc = _build_config()
    src = tmp_path / "k.cu"
    src.write_text("__global__ void k(float* x) { x[threadIdx.x] += 1.0f; }\n")
    obj = tmp_path / "k.o"
    flags = [f for f in bc.nvcc_flags() if f != "-DDOWSER_WITH_CUDA"]
    env = {k: v for k, v in os.environ.items() if k != "TORCH_CUDA_ARCH_LIST"}
    plan = subprocess.run(["nvcc", "--dryrun", "-c", str(src), "-o", str(obj), *flags], env=env,
                          capture_output=True, text=True, check=True)
    images = re.findall(r"--image3=kind=(elf|ptx),sm=(\d+)", plan.stdout + plan.stderr)
    got = ({int(a) for k, a in images if k == "elf"}, {int(a) for k, a in images if k == "ptx"})
    assert got == bc.emitted_archs(bc.CUDA_ARCH_FLAGS), images
    if shutil.which("cuobjdump"):
        subprocess.run(["nvcc", "-c", str(src), "-o", str(obj), *flags], env=env, check=True,
                       capture_output=True)
        elf = subprocess.run(["cuobjdump", "--list-elf", str(obj)], capture_output=True,
                             text=True).stdout
        ptx = subprocess.run(["cuobjdump", "--list-ptx", str(obj)], capture_output=True,
                             text=True).stdout
        assert ({int(m) for m in re.findall(r"sm_(\d+)", elf)},
                {int(m) for m in re.findall(r"sm_(\d+)", ptx)}) == got


def test_cuda_backend_falls_back_on_a_device_it_cannot_run(monkeypatch):
    """A CUDA build on an sm_75 GPU: the cuda backend reports itself unavailable (the
    registry then picks Triton or the reference) instead of failing with 'no kernel image'."""
    from dowser import _ext

    impl = _registry._IMPLS["masked_adamw_step"]["cuda"]
    monkeypatch.setattr(_ext, "load", lambda: types.SimpleNamespace())
    monkeypatch.setattr(_ext, "with_cuda", lambda: True)
    monkeypatch.setattr(_ext, "has", lambda name: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    caps = {0: (9, 0), 1: (7, 5)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: caps[i])
    probe = lambda i: "" if caps[i] >= (8, 0) else "no kernel image is available"  # noqa: E731
    monkeypatch.setattr(torch.ops.dowser_C, "cuda_kernel_image", probe, raising=False)
    _registry._arch_verdicts.clear()
    try:
        why = impl.unavailable("cuda")
        assert why is not None and "cuda:1" in why and "7.5" in why, why
        caps[1] = (12, 0)
        probe_ok = lambda i: ""  # noqa: E731 (compute_90 PTX JIT-compiles on sm_120)
        monkeypatch.setattr(torch.ops.dowser_C, "cuda_kernel_image", probe_ok, raising=False)
        _registry._arch_verdicts.clear()
        assert impl.unavailable("cuda") is None
    finally:
        _registry._arch_verdicts.clear()


# ---- on a real GPU (bench/gpu_check.sh) -------------------------------------------------------

@pytest.mark.gpu
def test_sync_debug_mode_on_gpu():
    """The hot paths under torch.cuda.set_sync_debug_mode('error'): selection (Triton and the
    registry's choice), an optimizer step's op, word_offsets. Any synchronising CUDA call
    raises."""
    dev = torch.device("cuda")
    g = _gen(6)
    w = torch.randn(256, 512, generator=g).to(dev)
    psi, a, bw = torch.rand(4, 256, generator=g).to(dev), torch.rand(4, 512, generator=g).to(dev), \
        torch.ones(4, device=dev)
    p = torch.randn(4096, device=dev)
    grad = torch.randn(4096, device=dev)
    mask = pack_mask(torch.rand(4096, generator=g) < 0.3).to(dev)
    off = _bits.word_offsets(mask)
    k = _bits.count_trainable(mask, off)
    m, v = torch.zeros(k, device=dev), torch.zeros(k, device=dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for backend in ("triton", "cuda"):
            impl = _registry._IMPLS["select_masks_global"].get(backend)
            if impl is not None and impl.unavailable("cuda") is None:
                impl.fn([w, w], [psi, psi], [a, a], [bw, bw], 1000)
        torch.ops.dowser.select_mask(w, psi, a, bw, 1000)
        _bits.word_offsets(mask)
        torch.ops.dowser.masked_adamw_step([p], [grad], [m], [v], [mask], [off], [1.0], 1e-3, 0.9,
                                           0.999, 1e-8, 0.0, False, False, None)
        torch.ops.dowser.count_nonfinite([grad], [mask])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus():
    """Every op on cuda:1 while cuda:0 is current equals the same op on cuda:0; a step over
    tensors on two devices is refused."""
    g = _gen(7)
    w = torch.randn(64, 96, generator=g)
    psi, a, bw = torch.rand(3, 64, generator=g), torch.rand(3, 96, generator=g), torch.ones(3)
    torch.cuda.set_device(0)
    out = {}
    for d in ("cuda:0", "cuda:1"):
        args = [t.to(d) for t in (w, psi, a, bw)]
        mask, _ = torch.ops.dowser.select_mask(*args, 500)
        p = torch.randn(4096, generator=_gen(8)).to(d)
        grad = torch.randn(4096, generator=_gen(9)).to(d)
        m = pack_mask(torch.rand(4096, generator=_gen(10)) < 0.3).to(d)
        off = _bits.word_offsets(m)
        k = _bits.count_trainable(m, off)
        st = [torch.zeros(k, device=d), torch.zeros(k, device=d)]
        torch.ops.dowser.masked_adamw_step([p], [grad], [st[0]], [st[1]], [m], [off], [1.0], 1e-3,
                                           0.9, 0.999, 1e-8, 0.0, False, False, None)
        torch.cuda.synchronize(d)
        out[d] = (mask.cpu(), p.cpu(), torch.cuda.current_device())
    assert torch.equal(out["cuda:0"][0], out["cuda:1"][0])
    assert torch.equal(out["cuda:0"][1], out["cuda:1"][1])
    assert out["cuda:1"][2] == 0, "the current device changed"
    p0, p1 = torch.zeros(64, device="cuda:0"), torch.zeros(64, device="cuda:1")
    with pytest.raises((ValueError, RuntimeError), match="device"):
        torch.ops.dowser.masked_adamw_step([p0, p1], [p0.clone(), p1.clone()], [p0.clone(), p1.clone()],
                                           [p0.clone(), p1.clone()], [None, None], [None, None],
                                           [1.0, 1.0], 1e-3, 0.9, 0.999, 1e-8, 0.0, False, False,
                                           None)


@pytest.mark.gpu
def test_cuda_step_checks_its_inputs():
    """The CUDA op refuses what the CPU op refuses (csrc/cpu/masked_adamw.cpp), before any
    launch: mask and offsets dtype, contiguity, size and device."""
    from tests.conftest import backend_fn

    step = backend_fn("masked_adamw_step", "cuda", "cuda")
    d = torch.device("cuda")
    p, g = torch.zeros(100, device=d), torch.zeros(100, device=d)
    mask = pack_mask(torch.rand(100) < 0.5).to(d)
    off = _bits.word_offsets(mask)
    k = _bits.count_trainable(mask, off)

    def run(mask=mask, off=off, state=None):
        st = state if state is not None else torch.zeros(k, device=d)
        return step([p], [g], [st], [st.clone()], [mask], [off], [1.0], 1e-3, 0.9, 0.999, 1e-8,
                    0.0, False, False, None)

    run()  # valid
    bad_inputs = {
        "mask must be": dict(mask=mask.to(torch.int64)),
        "mask must be ": dict(mask=torch.stack([mask, mask], 1)[:, 0]),  # non-contiguous
        "offsets must be": dict(off=off.to(torch.int64)),
        "offsets must be ": dict(off=off.cpu()),
        "offsets must be  ": dict(off=off[:-1]),
        "mask must be  ": dict(mask=mask.cpu()),
    }
    for what, kw in bad_inputs.items():
        with pytest.raises((RuntimeError, ValueError), match=what.strip() + "|one device"):
            run(**kw)
