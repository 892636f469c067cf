"""Argument plumbing shared by the C++ (CPU and CUDA) optimizer-step kernels."""

from __future__ import annotations

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
