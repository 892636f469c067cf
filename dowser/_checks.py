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


# ---- the masters argument of dowser::masked_adamw_step / masked_sgd_step ----------------------
# The ops take the fp32 master copies that exist (`masters`, in parameter order) and one flag
# per parameter (`has_master`), never a list with None holes: torch cannot functionalize a
# mutable list holding None (see the schema note in dowser/_ops/masked_adamw_step.py).

def master_args(per_param: list[torch.Tensor | None]) -> tuple[list[torch.Tensor] | None,
                                                                list[bool] | None]:
    """(masters, has_master) for the ops from one entry per parameter (None = no master);
    (None, None) when no parameter has one."""
    flags = [m is not None for m in per_param]
    if not any(flags):
        return None, None
    return [m for m in per_param if m is not None], flags


def masters_per_param(masters: list[torch.Tensor] | None, has_master: list[bool] | None,
                      n: int) -> list[torch.Tensor | None]:
    """The ops' (masters, has_master) as one entry per parameter (None = no master), checked.
    has_master None: no master at all (masters None or empty) or one for every parameter."""
    masters = [] if masters is None else list(masters)
    if has_master is None or len(has_master) == 0:
        if len(masters) not in (0, n):
            raise ValueError(f"masters has {len(masters)} entries for {n} parameters "
                             "(pass has_master to say which parameters they belong to)")
        return masters if masters else [None] * n
    if len(has_master) != n:
        raise ValueError(f"has_master has {len(has_master)} entries for {n} parameters")
    if sum(bool(h) for h in has_master) != len(masters):
        raise ValueError(f"masters has {len(masters)} entries but has_master flags "
                         f"{sum(bool(h) for h in has_master)} parameters")
    it = iter(masters)
    return [next(it) if h else None for h in has_master]
