"""Plain-PyTorch oracles, one per op: the fallback backend and the ground truth of every test.

Written for clarity, not speed or memory; every kernel must agree with these bit for bit
(masks) or within stated tolerances (floating-point results).
"""

from __future__ import annotations

import torch

_SHIFTS = torch.arange(32, dtype=torch.int64)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor (any shape/strides) -> int32 words; flat row-major index i in word i//32,
    bit i%32 (LSB first); padding bits 0."""
    flat = mask.reshape(-1).to(torch.int64)
    n = flat.numel()
    words = (n + 31) // 32
    padded = torch.zeros(words * 32, dtype=torch.int64, device=mask.device)
    padded[:n] = flat
    packed = (padded.view(words, 32) << _SHIFTS.to(mask.device)).sum(dim=1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_mask(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """int32 words -> flat bool mask of `numel` entries."""
    bits = (packed.to(torch.int64).unsqueeze(1) >> _SHIFTS.to(packed.device)) & 1
    return bits.reshape(-1)[:numel].to(torch.bool)
