"""One declaration per op (torch.library) and the choice of backend per device.

Every op has a plain-PyTorch reference (dowser/reference.py) and may have faster kernels:
``cpp`` (dowser._C, CPU), ``cuda`` (dowser._C built with CUDA) and ``triton`` (dowser.kernels).
Kernels register here with a device list and an availability check; the torch.library op
routes each call to the first available backend of the device's preference order. Tests call
every available backend directly through `implementations`.
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


@dataclass(frozen=True)
class Impl:
    op: str
    backend: str
    fn: Callable
    devices: tuple[str, ...]
    # Returns None when usable, else the reason it is not.
    unavailable: Callable[[str], str | None]


_IMPLS: dict[str, dict[str, Impl]] = {}
_LIB = torch.library.Library("dowser", "DEF")


def _cpp_unavailable(symbol: str) -> Callable[[str], str | None]:
    def check(device: str) -> str | None:
        from dowser import _ext

        if _ext.load() is None:
            return f"C++ extension unavailable: {_ext.info()['reason']}"
        if not _ext.has(symbol):
            return f"dowser._C has no {symbol}"
        if device == "cuda" and not _ext.with_cuda():
            return "dowser._C was built without CUDA"
        return None

    return check


def _triton_unavailable(device: str) -> str | None:
    from dowser.kernels import triton_unavailable_reason

    return triton_unavailable_reason(device)


def register(op: str, backend: str, devices: tuple[str, ...], *, cpp_symbol: str | None = None,
             unavailable: Callable[[str], str | None] | None = None) -> Callable:
    """Register `fn` as `backend`'s kernel of `op` on `devices` (decorator)."""
    assert backend in BACKENDS, backend
    if unavailable is None:
        if backend in ("cpp", "cuda"):
            assert cpp_symbol, "cpp/cuda kernels name the dowser._C symbol they need"
            unavailable = _cpp_unavailable(cpp_symbol)
        elif backend == "triton":
            unavailable = _triton_unavailable
        else:
            unavailable = lambda device: None  # noqa: E731

    def deco(fn: Callable) -> Callable:
        _IMPLS.setdefault(op, {})[backend] = Impl(op, backend, fn, devices, unavailable)
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


def define(op: str, schema: str, fake: Callable | None = None) -> Callable:
    """Declare `dowser::op` once and route CPU/CUDA (and any other device) to `choose`.

    Returns the torch op (``torch.ops.dowser.<op>``).
    """
    _LIB.define(f"{op}{schema}")

    def dispatch_for(device: str) -> Callable:
        def run(*args, **kwargs):
            impl, _ = choose(op, device)
            return impl.fn(*args, **kwargs)

        return run

    _LIB.impl(op, dispatch_for("cpu"), "CPU")
    _LIB.impl(op, dispatch_for("cuda"), "CUDA")
    _LIB.impl(op, lambda *a, **k: _IMPLS[op]["reference"].fn(*a, **k), "CompositeExplicitAutograd")
    if fake is not None:
        torch.library.register_fake(f"dowser::{op}", fake, lib=_LIB)
    return getattr(torch.ops.dowser, op)
