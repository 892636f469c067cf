"""Input checks shared by the public ops: clear errors before anything is written."""

from __future__ import annotations

import math

import torch


def words_for(numel: int) -> int:
    """Number of int32 words of a packed mask over `numel` entries."""
    return (numel + 31) // 32


def check_rho(rho: float) -> float:
    if not isinstance(rho, (int, float)) or isinstance(rho, bool) or not math.isfinite(rho) \
            or not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be a number in [0, 1], got {rho!r}")
    return float(rho)


def check_finite(name: str, t: torch.Tensor) -> None:
    """ValueError if `t` holds NaN/Inf, without O(numel) temporaries: a finite sum proves every
    entry finite (NaN and Inf propagate through a sum) at memory speed; only a non-finite sum (a
    bad entry, or an overflow) pays for the exact count, in row chunks."""
    if not t.is_floating_point() or t.numel() == 0 or bool(torch.isfinite(t.sum())):
        return
    rows = t if t.dim() >= 2 else t.reshape(-1, 1)
    step = max(1, (1 << 22) // max(1, rows[0].numel()))
    bad = sum(int((~torch.isfinite(rows[i:i + step])).sum()) for i in range(0, rows.shape[0], step))
    if bad:
        raise ValueError(f"{name} contains {bad} NaN/Inf value(s)")


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")


def check_packed(name: str, packed: torch.Tensor, numel: int) -> None:
    """A packed mask must be int32 with exactly words_for(numel) words and zero padding bits."""
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dtype != torch.int32:
        raise ValueError(f"{name} must be int32 words, got {packed.dtype}")
    if packed.dim() != 1 or packed.numel() != words_for(numel):
        raise ValueError(f"{name} has shape {tuple(packed.shape)}, expected ({words_for(numel)},) "
                         f"for {numel} entries")
    tail = numel % 32
    if tail and packed.numel():
        last = int(packed[-1].item()) & 0xFFFFFFFF
        if last >> tail:
            raise ValueError(f"{name} has bits set past entry {numel} (padding bits must be 0): "
                             "it was made for a larger tensor")
