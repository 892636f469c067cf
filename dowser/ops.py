"""Public ops of dowser. Each call is routed by torch.library to the device's fastest backend
(see `dowser.backend_info()`); every op has a plain-PyTorch reference in dowser.reference."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from dowser import _ops  # noqa: F401  (declares the ops)
from dowser._checks import check_packed

__all__ = ["pack_mask", "unpack_mask", "popcount"]


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool mask (any shape, any strides) into int32 words.

    Flat row-major index i lives in word i // 32, bit i % 32 (least significant first);
    padding bits are 0; 1 means trainable.
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
    return torch.ops.dowser.pack_mask(mask)


def unpack_mask(packed: torch.Tensor, shape: Sequence[int] | torch.Size) -> torch.Tensor:
    """Unpack int32 words into a bool tensor of `shape` (the inverse of `pack_mask`)."""
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must be non-negative, got {shape}")
    numel = math.prod(shape)
    check_packed("packed", packed, numel)
    return torch.ops.dowser.unpack_mask(packed, numel).view(shape)


def popcount(packed: torch.Tensor) -> int:
    """Number of set bits (trainable entries) of a packed mask."""
    table = _POPCOUNT8.to(packed.device)
    as_bytes = packed.contiguous().view(torch.uint8)
    total = 0
    for chunk in as_bytes.split(1 << 22):  # bounded temporaries for huge masks
        total += int(table[chunk.to(torch.int64)].sum())
    return total


_POPCOUNT8 = torch.tensor([bin(b).count("1") for b in range(256)], dtype=torch.int32)
