"""Argument plumbing shared by the backends' kernels: the device guard of the GPU wrappers, and
the C++ (CPU and CUDA) optimizer-step kernels' tensor lists."""

from __future__ import annotations

import functools
from typing import Callable

import torch

_EMPTY: dict[torch.device, torch.Tensor] = {}


def none_as_empty(ts, device) -> list[torch.Tensor]:
    """The C++ entry points take plain tensor lists: an empty tensor stands for None."""
    dev = torch.device(device)
    empty = _EMPTY.get(dev)
    if empty is None:
        empty = _EMPTY[dev] = torch.empty(0, dtype=torch.int32, device=dev)
    return [empty if t is None else t for t in ts]


def contiguous_params(params: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[tuple]]:
    """Kernels write contiguous memory: non-contiguous params get a contiguous working copy,
    copied back afterwards (frozen entries keep their exact bits through the round trip)."""
    work, back = [], []
    for p in params:
        if p.is_contiguous():
            work.append(p)
        else:
            c = p.contiguous()
            work.append(c)
            back.append((p, c))
    return work, back


def copy_back(back: list[tuple]) -> None:
    """Copy the working copies back. Unconditionally, so without a host sync: when the kernel
    wrote nothing (a trainable NaN/Inf in atomic mode) the copy holds the param's own bits."""
    for p, c in back:
        p.copy_(c)


def call_device(op: str, args, kwargs=None) -> torch.device | None:
    """The one device of every tensor in `args` / `kwargs` (lists and tuples looked into),
    None when there is no tensor; ValueError when they are on several devices (a kernel
    launched on one device cannot read another's memory)."""
    found: dict[torch.device, None] = {}

    def visit(x) -> None:
        if isinstance(x, torch.Tensor):
            found.setdefault(x.device)
        elif isinstance(x, (list, tuple)):
            for y in x:
                visit(y)

    visit(args)
    visit(list((kwargs or {}).values()))
    if len(found) > 1:
        raise ValueError(f"{op}: all tensors of one call must be on one device, got "
                         f"{', '.join(str(d) for d in found)}")
    return next(iter(found), None)


def on_its_device(fn: Callable) -> Callable:
    """Run a GPU wrapper with its tensors' device current (`torch.cuda.device`): Triton
    launches on the current device and the C++ kernels on its current stream, so with a model
    spread over GPUs (device_map="auto") a parameter on cuda:1 must not run while cuda:0 is
    current. Checks first that the call's tensors share one device."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        device = call_device(fn.__name__, args, kwargs)
        if device is None or device.type != "cuda":
            return fn(*args, **kwargs)
        with torch.cuda.device(device):
            return fn(*args, **kwargs)

    return run
