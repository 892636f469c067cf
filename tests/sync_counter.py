"""Count the host synchronisations CPU code would make if its device tensors lived on a GPU.

On CPU nothing synchronises, so a sync that would stall a GPU (reading a device value on the
host, copying a host value into a device tensor) goes unnoticed until a GPU runs the code.
`WouldBeSyncs` runs the code on CPU tensors and tells device-resident tensors from
host-resident ones by provenance:

- DEVICE: the tensors the test declares (parameters, gradients, masks, optimizer state,
  weights, factors), the results of factory ops (``torch.zeros(..., device=...)``; on CPU the
  dispatcher cannot tell an explicit device from the default, so every factory counts as device),
  ``torch.tensor(..., device=...)``, and every op result with a DEVICE input.
- HOST: ``torch.tensor(data)`` without a device (lift_fresh: e.g. the optimizer's step
  counters, host-resident by design), tensors created before the mode and not declared, and
  results of ops whose inputs are all HOST. Reading those is not a sync.

Counted as would-be syncs (each with the Python line that caused it):
- ``_local_scalar_dense`` (``.item()``, ``bool()``, ``int()``, ``float()``) and ``aten.equal``
  of a DEVICE tensor;
- ``.cpu()``, ``.tolist()``, ``.numpy()`` of a DEVICE tensor;
- a copy from a HOST tensor into a DEVICE one (``t[i] = 5`` copies a host scalar),
  ``host.to(device)`` and ``torch.tensor(..., device=...)`` (blocking copies from pageable
  memory);
- ops whose output shape depends on device data (nonzero, masked_select, boolean indexing,
  unique).
Kernel launches (dowser.kernels' `launch`) run with the mode paused: on a GPU they are
asynchronous, and the Triton interpreter's own host copies are not the wrapper's.

Limitation: ``x.to("cpu")`` of a DEVICE tensor is not seen (on CPU it is indistinguishable
from a device-to-device move); hot-path code reads device values with ``.cpu()`` or not at all.
"""

from __future__ import annotations

import contextlib
import sys
import traceback
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

_SHAPE_FROM_DATA = {"nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
                    "unique_consecutive", "argwhere"}


def _where() -> str:
    """The innermost frame outside torch and this file: the line that asked for the sync."""
    for frame in reversed(traceback.extract_stack()):
        f = frame.filename
        if "/torch/" in f or f.endswith("sync_counter.py") or "/triton/" in f:
            continue
        return f"{f.rsplit('/', 2)[-2]}/{f.rsplit('/', 1)[-1]}:{frame.lineno} {frame.line}"
    return "?"


class WouldBeSyncs(TorchDispatchMode):
    """Context manager: `syncs.count` would-be host syncs, `syncs.events` (kind, where), and
    `syncs.host_reads` (reads of host-resident tensors, e.g. step counters: not syncs)."""

    def __init__(self, *device_tensors) -> None:
        super().__init__()
        self._device = WeakIdKeyDictionary()
        self.events: list[tuple[str, str]] = []
        self.host_reads = 0
        self.bytes_allocated = 0  # new storage made by the ops seen (scratch and results)
        self.device(*device_tensors)
        self._patches: contextlib.ExitStack | None = None

    # -- bookkeeping -------------------------------------------------------------------------
    def device(self, *objs) -> "WouldBeSyncs":
        """Declare tensors (or nested lists/dicts of them, optimizers, modules) device-resident."""
        for obj in objs:
            if isinstance(obj, torch.nn.Module):
                for p in obj.parameters():
                    self.device(p, p.grad)
            elif isinstance(obj, torch.optim.Optimizer):
                for p, st in obj.state.items():
                    self.device(p, p.grad)
                    self.device(*[v for k, v in st.items() if k != "step"])
                for g in obj.param_groups:
                    self.device(*[(p, p.grad) for p in g["params"]])
                for m in getattr(obj, "_masks", {}).values():
                    self.device(m)
                for o in getattr(obj, "_offsets", {}).values():
                    self.device(o)
            else:
                for t in tree_flatten(obj)[0]:
                    if isinstance(t, torch.Tensor):
                        self._device[t] = True
        return self

    def is_device(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t in self._device

    @property
    def count(self) -> int:
        return len(self.events)

    def kinds(self) -> Counter:
        return Counter(k for k, _ in self.events)

    def report(self) -> str:
        return "\n".join(f"  {kind}: {where}" for kind, where in self.events) or "  (none)"

    def reset(self) -> None:
        self.events.clear()
        self.host_reads = 0
        self.bytes_allocated = 0

    def _sync(self, kind: str) -> None:
        self.events.append((kind, _where()))

    # -- dispatch ----------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        flat_in = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_device = any(self.is_device(t) for t in flat_in)
        if name in ("_local_scalar_dense", "equal"):
            if on_device:
                self._sync(f"{name} (device value read on the host)")
            else:
                self.host_reads += 1
        elif name in _SHAPE_FROM_DATA and on_device:
            self._sync(f"{name} (output shape depends on device data)")
        elif name in ("index", "index_put", "index_put_") and on_device:
            idx = args[1] if len(args) > 1 else []
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx):
                self._sync(f"{name} with a boolean mask (output shape depends on device data)")
        elif name in ("copy_", "copy") and len(args) >= 2:
            dst, src = args[0], args[1]
            if self.is_device(dst) and isinstance(src, torch.Tensor) and not self.is_device(src):
                self._sync("host-to-device copy (e.g. t[i] = python number)")
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage()._cdata for t in flat_in}
        for t in tree_flatten(out)[0]:  # new storage (not a view or an input written in place)
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in inputs:
                inputs.add(t.untyped_storage()._cdata)
                self.bytes_allocated += t.untyped_storage().nbytes()
        if name == "lift_fresh":  # torch.tensor(data): made on the host
            return out
        if on_device or (not flat_in and "device" in kwargs):
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self._device[t] = True
        return out

    # -- Python-level entry points the dispatcher does not see on CPU ------------------------
    def __enter__(self):
        stack = contextlib.ExitStack()
        counter = self
        orig_cpu, orig_tolist, orig_numpy = torch.Tensor.cpu, torch.Tensor.tolist, torch.Tensor.numpy
        orig_to, orig_tensor = torch.Tensor.to, torch.tensor

        def cpu(t, *a, **k):
            if counter.is_device(t):
                counter._sync("device-to-host copy (.cpu())")
                with _disable_current_modes():
                    return orig_cpu(t, *a, **k).clone()  # a host copy: reading it is free
            return orig_cpu(t, *a, **k)

        def tolist(t):
            if counter.is_device(t):
                counter._sync("device-to-host copy (.tolist())")
            return orig_tolist(t)

        def numpy(t, *a, **k):
            if counter.is_device(t):
                counter._sync("device-to-host copy (.numpy())")
            return orig_numpy(t, *a, **k)

        def to(t, *a, **k):
            target = k.get("device")
            if target is None:
                target = next((x for x in a if isinstance(x, (str, torch.device))), None)
            out = orig_to(t, *a, **k)
            if target is not None and not counter.is_device(t):
                counter._sync("host-to-device copy (host_tensor.to(device))")
                counter._device[out] = True
            return out

        def tensor(*a, **k):
            out = orig_tensor(*a, **k)
            if k.get("device") is not None:
                counter._sync("host-to-device copy (torch.tensor(..., device=...))")
                counter._device[out] = True
            return out

        patches = [(torch.Tensor, "cpu", cpu), (torch.Tensor, "tolist", tolist),
                   (torch.Tensor, "numpy", numpy), (torch.Tensor, "to", to), (torch, "tensor", tensor)]
        for mod in list(sys.modules.values()):
            # Launches are asynchronous on a GPU; the interpreter's own copies are not ours.
            launch = getattr(mod, "launch", None)
            if getattr(mod, "__name__", "").startswith("dowser.kernels") and callable(launch):
                patches.append((mod, "launch", _paused(launch)))
        for obj, attr, new in patches:
            old = getattr(obj, attr)
            setattr(obj, attr, new)
            stack.callback(setattr, obj, attr, old)
        self._patches = stack
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            if self._patches is not None:
                self._patches.close()
                self._patches = None


def _paused(launch):
    def run(*args, **kwargs):
        with _disable_current_modes():
            return launch(*args, **kwargs)

    return run
