"""Public ops of dowser. Each call is routed by torch.library to the device's fastest backend
(see `dowser.backend_info()`); every op has a plain-PyTorch reference in dowser.reference.
Declarations: dowser/_ops/<op>.py; kernels per backend: dowser/_ops/backends/<backend>.py."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from dowser import _ops  # noqa: F401  (declares the ops)
from dowser._bits import count_trainable, key_to_float, popcount, word_offsets  # noqa: F401
from dowser._checks import check_finite, check_float, check_packed, check_rho

__all__ = ["pack_mask", "unpack_mask", "popcount", "word_offsets", "count_trainable", "scores",
           "build_mask", "score_threshold", "build_masks_global"]


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


# --- scores and exact bottom-rho masks ------------------------------------------------------

_Layer = tuple  # (weight, out_factors, in_factors) or (weight, out_factors, in_factors, batch_weights)


def _check_layer(weight: torch.Tensor, out_factors: torch.Tensor, in_factors: torch.Tensor,
                 batch_weights: torch.Tensor | None, prefix: str = ""
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate one layer's inputs (ValueError naming the argument); returns the factors as
    (B, d) fp32 and the batch weights as (B,) fp32 (ones by default)."""
    names = {k: f"{prefix}{k}" for k in ("weight", "out_factors", "in_factors", "batch_weights")}
    for key, t in (("weight", weight), ("out_factors", out_factors), ("in_factors", in_factors)):
        check_float(names[key], t)
    if weight.dim() != 2:
        raise ValueError(f"{names['weight']} must be 2-D (d_out, d_in), got shape {tuple(weight.shape)}")
    d_out, d_in = weight.shape
    factors = []
    for key, t, d, what in (("out_factors", out_factors, d_out, "d_out"),
                            ("in_factors", in_factors, d_in, "d_in")):
        if t.dim() == 1:
            t = t.unsqueeze(0)  # one batch: a plain vector
        if t.dim() != 2 or t.shape[1] != d or t.shape[0] < 1:
            raise ValueError(f"{names[key]} must have shape (B, {what}={d}) with B >= 1, "
                             f"got {tuple(t.shape)}")
        if t.device != weight.device:
            raise ValueError(f"{names[key]} is on {t.device}, {names['weight']} on {weight.device}")
        factors.append(t)
    psi, a = factors
    if psi.shape[0] != a.shape[0]:
        raise ValueError(f"{names['out_factors']} has B={psi.shape[0]} batches but "
                         f"{names['in_factors']} has B={a.shape[0]}")
    b = psi.shape[0]
    if batch_weights is None:
        bw = torch.ones(b, dtype=torch.float32, device=weight.device)
    else:
        check_float(names["batch_weights"], batch_weights)
        if batch_weights.shape != (b,):
            raise ValueError(f"{names['batch_weights']} must have shape ({b},), "
                             f"got {tuple(batch_weights.shape)}")
        if batch_weights.device != weight.device:
            raise ValueError(f"{names['batch_weights']} is on {batch_weights.device}, "
                             f"{names['weight']} on {weight.device}")
        check_finite(names["batch_weights"], batch_weights)
        bw = batch_weights.to(torch.float32)
        if bool((bw < 0).any()) or not float(bw.sum()) > 0:
            raise ValueError(f"{names['batch_weights']} must be >= 0 with a positive sum")
    for key, t in (("weight", weight), ("out_factors", psi), ("in_factors", a)):
        check_finite(names[key], t)
    return psi.to(torch.float32), a.to(torch.float32), bw


def _k_for(rho: float, n: int) -> int:
    return int(math.floor(rho * n + 0.5))


def scores(weight: torch.Tensor, out_factors: torch.Tensor, in_factors: torch.Tensor, *,
           batch_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Materialise S = |W| * (Psi^T diag(w) A) / sum(w) as an fp32 (d_out, d_in) tensor.

    For tests and small layers: `build_mask` never holds S. weight: (d_out, d_in), any float
    dtype and strides; out_factors: (B, d_out); in_factors: (B, d_in); batch_weights: (B,),
    >= 0 with a positive sum (default ones).
    """
    psi, a, bw = _check_layer(weight, out_factors, in_factors, batch_weights)
    return torch.ops.dowser.scores(weight, psi, a, bw)


def _select_one(weight, out_factors, in_factors, rho, batch_weights):
    rho = check_rho(rho)
    psi, a, bw = _check_layer(weight, out_factors, in_factors, batch_weights)
    return torch.ops.dowser.select_mask(weight, psi, a, bw, _k_for(rho, weight.numel()))


def build_mask(weight: torch.Tensor, out_factors: torch.Tensor, in_factors: torch.Tensor,
               rho: float, *, batch_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Packed int32 mask (DESIGN.md §2 layout) of the k = floor(rho*n + 0.5) lowest scores.

    Exactly k bits are set; ties go to the lower row-major flat index. The score matrix is
    never materialised on the fast backends (score rows/tiles are recomputed per pass).
    """
    rho = check_rho(rho)
    psi, a, bw = _check_layer(weight, out_factors, in_factors, batch_weights)
    n = weight.numel()
    k = _k_for(rho, n)
    if k == 0 or k == n:  # nothing to rank
        return pack_mask(torch.full((n,), k == n, dtype=torch.bool, device=weight.device))
    return torch.ops.dowser.select_mask(weight, psi, a, bw, k)[0]


def score_threshold(weight: torch.Tensor, out_factors: torch.Tensor, in_factors: torch.Tensor,
                    rho: float, *, batch_weights: torch.Tensor | None = None
                    ) -> tuple[float, int, int]:
    """(threshold score, number of scores strictly below it, number of ties at it taken).

    The threshold is the largest selected score (-inf and (0, 0) when k = 0); the mask of
    `build_mask` holds every score below it plus the first `ties` entries equal to it.
    """
    _, stats = _select_one(weight, out_factors, in_factors, rho, batch_weights)
    key, below, ties = (int(v) for v in stats.tolist())
    return key_to_float(key), below, ties


def build_masks_global(layers: Sequence[_Layer], rho: float) -> list[torch.Tensor]:
    """One threshold over all layers: the k = floor(rho * total + 0.5) lowest scores of all
    matrices together, ties ordered by layer order, then flat index; one packed mask per layer.

    Each layer is (weight, out_factors, in_factors) or (weight, out_factors, in_factors,
    batch_weights); all on one device.
    """
    rho = check_rho(rho)
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise ValueError("layers must be a sequence of (weight, out_factors, in_factors"
                         "[, batch_weights]) tuples")
    ws, psis, As, bws = [], [], [], []
    for idx, layer in enumerate(layers):
        if not isinstance(layer, (tuple, list)) or len(layer) not in (3, 4):
            raise ValueError(f"layers[{idx}] must be (weight, out_factors, in_factors"
                             "[, batch_weights])")
        w, o, i = layer[:3]
        bw = layer[3] if len(layer) == 4 else None
        psi, a, bw = _check_layer(w, o, i, bw, prefix=f"layers[{idx}].")
        if ws and w.device != ws[0].device:
            raise ValueError(f"layers[{idx}].weight is on {w.device}, layers[0] on {ws[0].device}")
        ws.append(w)
        psis.append(psi)
        As.append(a)
        bws.append(bw)
    if not ws:
        return []
    total = sum(w.numel() for w in ws)
    k = _k_for(rho, total)
    if k == 0 or k == total:
        return [pack_mask(torch.full((w.numel(),), k == total, dtype=torch.bool, device=w.device))
                for w in ws]
    return list(torch.ops.dowser.select_masks_global(ws, psis, As, bws, k)[0])
