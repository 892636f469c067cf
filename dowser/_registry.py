"""Op declarations (torch.library) and the choice of backend per device.

The bitsandbytes way: each op is declared once, in ``dowser/_ops/<op>.py`` (`define`: its
schema, its fake kernel for torch.compile / meta tensors, and its plain-PyTorch reference from
dowser/reference.py); each backend registers its kernel per device in
``dowser/_ops/backends/<backend>.py`` (`register`). Backends: ``cpp`` (dowser._C on CPU),
``cuda`` (dowser._C built with CUDA), ``triton`` (dowser.kernels) and ``reference`` (every
device; the fallback).

Per device type, one kernel is registered with `torch.library.register_kernel`: it runs the
first available backend of the device's preference order (`DOWSER_BACKEND` forces one), so a
missing extension or a CPU-only Triton falls back instead of failing. Every other device runs
the reference (CompositeExplicitAutograd). Tests and benchmarks enumerate the backends from
here (`backends`, `implementations`), never from hand-written lists.

C++/CUDA kernels either are pybind11 functions of dowser._C (`cpp_symbol=`) or register
themselves with ``TORCH_LIBRARY_FRAGMENT(dowser_C, m)`` in their own source file
(`cpp_op="dowser_C::name"`, called as ``torch.ops.dowser_C.name``): a new C++ kernel then
needs no edit of csrc/dowser.h or csrc/ops.cpp.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

# First available wins. Triton on CPU only runs in interpreter mode: tests use it, users don't.
PREFERENCE: dict[str, tuple[str, ...]] = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpp", "reference"),
}
BACKENDS = ("cuda", "triton", "cpp", "reference")
DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class Impl:
    op: str
    backend: str
    fn: Callable
    devices: tuple[str, ...]
    # Returns None when usable, else the reason it is not.
    unavailable: Callable[[str], str | None]


@dataclass(frozen=True)
class OpDecl:
    name: str
    schema: str
    reference: Callable
    fake: Callable | None
    mutates: bool


_IMPLS: dict[str, dict[str, Impl]] = {}
OPS: dict[str, OpDecl] = {}
_LIB = torch.library.Library("dowser", "DEF")


def _cpp_unavailable(symbol: str | None, op: str | None) -> Callable[[str], str | None]:
    def check(device: str) -> str | None:
        from dowser import _ext

        mod = _ext.load()
        if mod is None:
            return f"C++ extension unavailable: {_ext.info()['reason']}"
        if device == "cuda" and not _ext.with_cuda():
            return "dowser._C was built without CUDA"
        if device == "cuda":
            why = _cuda_arch_unavailable()
            if why is not None:
                return why
        if symbol is not None and not _ext.has(symbol):
            return f"dowser._C has no {symbol}"
        if op is not None:
            ns, name = op.split("::")
            if not hasattr(getattr(torch.ops, ns), name):
                return f"dowser._C registers no {op}"
        return None

    return check


# Per visible GPU: None when dowser._C's CUDA kernels have an image for it, else why not.
_arch_verdicts: dict[int, str | None] = {}


def _cuda_arch_unavailable() -> str | None:
    """Why dowser._C's CUDA kernels cannot run on some visible GPU (an architecture the build
    has neither SASS nor PTX for: sm_70/75), or None. Asked once per device, of the CUDA
    runtime (`dowser_C::cuda_kernel_image`, csrc/cuda/device_check.cu); a build without that
    probe is judged from the architecture flags of dowser/_build_config.py."""
    from dowser import _build_config

    for i in range(torch.cuda.device_count()):
        if i not in _arch_verdicts:
            major, minor = torch.cuda.get_device_capability(i)
            if hasattr(torch.ops.dowser_C, "cuda_kernel_image"):
                err = torch.ops.dowser_C.cuda_kernel_image(i)
            else:
                err = "" if _build_config.runs_on((major, minor), _build_config.CUDA_ARCH_FLAGS) \
                    else "no kernel image is available"
            _arch_verdicts[i] = None if not err else (
                f"dowser._C cannot run on cuda:{i} (compute capability {major}.{minor}): {err} "
                "(architectures: docs/gpu.md)")
        if _arch_verdicts[i] is not None:
            return _arch_verdicts[i]
    return None


def _triton_unavailable(device: str) -> str | None:
    from dowser.kernels._availability import triton_unavailable_reason

    return triton_unavailable_reason(device)


def register(op: str, backend: str, devices: tuple[str, ...], *, cpp_symbol: str | None = None,
             cpp_op: str | None = None,
             unavailable: Callable[[str], str | None] | None = None) -> Callable:
    """Register `fn` as `backend`'s kernel of `op` on `devices` (decorator).

    cpp/cuda kernels name what they call in dowser._C: a pybind11 `cpp_symbol`, or a
    `cpp_op` ("dowser_C::name") registered by the kernel's own source file.
    """
    assert backend in BACKENDS, backend
    if unavailable is None:
        if backend in ("cpp", "cuda"):
            assert cpp_symbol or cpp_op, "cpp/cuda kernels name the dowser._C function they need"
            unavailable = _cpp_unavailable(cpp_symbol, cpp_op)
        elif backend == "triton":
            unavailable = _triton_unavailable
        else:
            unavailable = lambda device: None  # noqa: E731

    def deco(fn: Callable) -> Callable:
        _IMPLS.setdefault(op, {})[backend] = Impl(op, backend, fn, tuple(devices), unavailable)
        return fn

    return deco


def _forced() -> str | None:
    forced = os.environ.get("DOWSER_BACKEND")
    if forced and forced not in BACKENDS:
        raise ValueError(f"DOWSER_BACKEND={forced!r}: expected one of {BACKENDS}")
    return forced


def choose(op: str, device: str | torch.device) -> tuple[Impl, str]:
    """The implementation `op` uses on `device`, and why."""
    dev = torch.device(device).type
    impls = _IMPLS.get(op)
    if not impls:
        raise KeyError(f"no implementation registered for op {op!r}")
    skipped = []
    forced = _forced()
    order = (forced,) if forced else PREFERENCE.get(dev, ("reference",))
    for name in order:
        impl = impls.get(name)
        if impl is None or (dev not in impl.devices and name != "reference"):
            skipped.append(f"{name}: none registered for {dev}")
            continue
        why_not = impl.unavailable(dev)
        if why_not is None:
            why = "forced by DOWSER_BACKEND" if forced else "first available of " + "/".join(order)
            if skipped:
                why += " (" + "; ".join(skipped) + ")"
            return impl, why
        skipped.append(f"{name}: {why_not}")
    if forced:
        raise RuntimeError(f"DOWSER_BACKEND={forced} cannot run {op} on {dev}: {'; '.join(skipped)}")
    raise RuntimeError(f"no usable backend for {op} on {dev}: {'; '.join(skipped)}")


def backends(op: str) -> tuple[str, ...]:
    """Every backend with a kernel of `op` (usable here or not), in BACKENDS order."""
    have = _IMPLS.get(op, {})
    return tuple(b for b in reversed(BACKENDS) if b in have)


def implementations(op: str, device: str = "cpu") -> dict[str, Callable]:
    """Every backend of `op` usable on `device` right now (for tests and benchmarks)."""
    dev = torch.device(device).type
    return {name: impl.fn for name, impl in _IMPLS.get(op, {}).items()
            if (dev in impl.devices or name == "reference") and impl.unavailable(dev) is None}


def backend_info() -> dict[str, dict[str, dict[str, str]]]:
    """For each op and device type: {'backend': name, 'why': reason}."""
    from dowser import _ext

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    info: dict = {"_C": {"how": str(_ext.info()["how"]), "why": str(_ext.info()["reason"])}}
    cpu_path = _ext.cpu_capability()  # instruction-set path of the cpp CPU kernels (issue 13)
    if cpu_path:
        info["_C"]["cpu_capability"] = cpu_path
    for op in sorted(_IMPLS):
        info[op] = {}
        for dev in devices:
            try:
                impl, why = choose(op, dev)
                info[op][dev] = {"backend": impl.backend, "why": why}
                if dev == "cpu" and impl.backend == "cpp" and cpu_path:
                    info[op][dev]["cpu_capability"] = cpu_path
            except RuntimeError as exc:
                info[op][dev] = {"backend": "none", "why": str(exc)}
    return info


def define(op: str, schema: str, reference: Callable, fake: Callable | None = None) -> Callable:
    """Declare ``dowser::op`` once: schema, fake kernel and reference (which is also the
    `reference` backend on every device). Returns the torch op (``torch.ops.dowser.<op>``)."""
    _LIB.define(f"{op}{schema}")
    OPS[op] = OpDecl(op, schema, reference, fake, "!" in schema)
    register(op, "reference", DEVICES)(reference)

    def dispatch_for(device: str) -> Callable:
        def run(*args, **kwargs):
            impl, _ = choose(op, device)
            return impl.fn(*args, **kwargs)

        run.__name__ = f"{op}_{device}"
        return run

    for device in DEVICES:
        torch.library.register_kernel(f"dowser::{op}", device, dispatch_for(device), lib=_LIB)
    _LIB.impl(op, lambda *a, **k: _IMPLS[op]["reference"].fn(*a, **k), "CompositeExplicitAutograd")
    if fake is not None:
        torch.library.register_fake(f"dowser::{op}", fake, lib=_LIB)
    return getattr(torch.ops.dowser, op)
