"""Dowser-LoRA: the authors' LoRA variant of Model-Dowser, as masks on PEFT LoRA adapters.

The authors' training script (nguyendinhson-kaist/Model-Dowser, `LLaVA/llava/train/
train_dowser.py`, function `train`, the "Case B: Using LoRA" branch with its helper
`_build_axis_mask`) does not mask W itself when LoRA is on. From a layer's importance matrix
S (d_out x d_in) it takes the row means (`imp.mean(dim=1)`, one score per output i) and the
column means (`imp.mean(dim=0)`, one per input j), selects the lowest fraction
p = 1 - sqrt(1 - rho) of each axis, and lets only those rows of lora_B (d_out x r) and those
columns of lora_A (r x d_in) train (gradient hooks). Then the (i, j) pairs whose row or column
is selected are 1 - (1 - p)^2 = rho of the matrix.

Here the same rule is a MaskSet over the adapter's parameters (keys as in
peft_model.named_parameters(): `...<module>.lora_A.<adapter>.weight` / `lora_B`), so
dowser.MaskedAdamW trains it with the same guarantee as any mask: frozen entries never move.
Differences from the authors' script, on purpose (docs/methods.md):

- the axis selection is dowser's exact one: k = floor(p*n + 0.5) rows (columns), ties by the
  lower index (theirs: k = max(1, round(p*n)), `kthvalue` and `<=`, so ties overshoot and a
  flat axis trains entirely);
- the axis means are computed from the probe's low-rank factors without forming S:
  row_i = sum_b w_b psi_bi (|W| a_b)_i / (sum(w) d_in), col_j = sum_b w_b a_bj (psi_b^T |W|)_j /
  (sum(w) d_out), in fp64 over row blocks of W;
- every rule of build_masks plugs in through its factors (dowser, magnitude, wanda), and
  "random" draws each axis's keys from the counter-based hash of (seed, name + ":rows"/":cols").
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from dowser.probe.stats import ProbeStats

if TYPE_CHECKING:
    from dowser.masks import MaskSet

__all__ = ["build_lora_masks", "axis_fraction", "axis_scores"]

_PEFT_PREFIX = "base_model.model."
_ROW_BLOCK = 1024


def axis_fraction(rho: float) -> float:
    """The per-axis fraction p = 1 - sqrt(1 - rho): rows or columns selected at p cover rho of
    the (i, j) pairs (1 - (1 - p)^2 = rho)."""
    from dowser._checks import check_rho

    return 1.0 - math.sqrt(1.0 - check_rho(rho))


def axis_scores(weight: torch.Tensor, psi: torch.Tensor, a: torch.Tensor, bw: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(row means (d_out,), column means (d_in,)) of S = |W| * (Psi^T diag(w) A) / sum(w), fp64,
    from the factors: O(block x d_in + B x (d_out + d_in)) extra memory, never S itself."""
    d_out, d_in = weight.shape
    w = bw.double() / bw.double().sum()
    psi, a = psi.double(), a.double()
    rows = torch.empty(d_out, dtype=torch.float64, device=weight.device)
    col_acc = torch.zeros_like(a)  # (B, d_in): sum_i psi_bi |W_ij|
    for r0 in range(0, d_out, _ROW_BLOCK):
        blk = weight[r0:r0 + _ROW_BLOCK].detach().double().abs()
        rows[r0:r0 + blk.shape[0]] = ((blk @ a.T) * psi[:, r0:r0 + blk.shape[0]].T) @ w / d_in
        col_acc += psi[:, r0:r0 + blk.shape[0]] @ blk
    cols = (w @ (col_acc * a)) / d_out
    return rows, cols


def _select_axis(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Bool (n,): the k = floor(p*n + 0.5) lowest scores, ties by the lower index, through
    dowser's one selection (a 1 x n layer whose scores are these values: |s| * (1 * 1))."""
    from dowser import ops

    s = scores.float()
    n = s.numel()
    packed = ops.build_mask(s[None], torch.ones(1, 1, device=s.device), torch.ones(1, n, device=s.device), p)
    return ops.unpack_mask(packed, (n,))


def _random_axis(seed: int, name: str, n: int) -> torch.Tensor:
    from dowser import _keys

    return _keys.hash_keys_at(_keys.stream_base(seed, name), torch.arange(n)).double()


def build_lora_masks(model: nn.Module, stats: ProbeStats | None = None, rho: float = 0.1, *,
                     method: str = "dowser", seed: int = 0, targets: Sequence[str] | None = None,
                     adapter: str = "default") -> "MaskSet":
    """Dowser-LoRA masks for the LoRA adapters of a PEFT model (the authors' LoRA variant).

    Args:
        model: a PEFT model (peft.get_peft_model with a LoraConfig) whose targeted layers have
            lora_A[adapter] / lora_B[adapter]; its base weights give |W|.
        stats: `dowser.probe(...)` statistics of the model before wrapping (module names of the
            base model, e.g. "model.layers.3.mlp.up_proj"); needed by "dowser" and "wanda".
        rho: the fraction of (i, j) pairs whose row or column trains; each axis keeps
            p = 1 - sqrt(1 - rho) of its rows / columns (`axis_fraction`).
        method: "dowser", "magnitude", "wanda" (the row and column means of that rule's score)
            or "random" (hash keys per axis).
        seed: the random rule's seed.
        targets: base-model module names to mask (default: every LoRA layer in `stats`, or
            every LoRA layer of the model without stats).
        adapter: the LoRA adapter's name.

    Returns a MaskSet keyed by the adapter parameters' names: lora_B's mask sets whole rows i
    (output i selected), lora_A's whole columns j (input j selected). Train it with
    dowser.MaskedAdamW(params, masks, model=model).
    """
    from dowser import __version__
    from dowser._checks import check_rho
    # masks.py imports this module at its end: import it here, not at the top
    from dowser.masks import MaskSet, _check_method, _rule_factors, mask_metadata
    from dowser.ops import pack_mask

    rho = check_rho(rho)
    _check_method(method, "lowest", seed, "matrix")
    if stats is None and method in ("dowser", "wanda"):
        raise ValueError(f"method={method!r} needs probe statistics: pass stats=dowser.probe(...)")
    lora = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and hasattr(mod, "lora_B") and adapter in getattr(mod, "lora_A", {}):
            base = name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name
            lora[base] = (name, mod)
    if not lora:
        raise ValueError(f"this {type(model).__name__} has no LoRA layers with adapter {adapter!r}: "
                         "wrap it with peft.get_peft_model(model, LoraConfig(...)) first")
    if targets is None:
        names = [n for n in (stats if stats is not None else lora) if n in lora]
        if not names:
            raise ValueError("no probed layer carries a LoRA adapter (stats and LoRA targets differ)")
    else:
        names = list(dict.fromkeys(targets))
        missing = [n for n in names if n not in lora]
        if missing:
            raise ValueError(f"targets names {missing[0]!r}, which has no LoRA adapter {adapter!r}")
    pnames = {id(p): n for n, p in model.named_parameters()}
    p = axis_fraction(rho)
    masks, shapes = {}, {}
    for base in names:
        full, mod = lora[base]
        weight = mod.get_base_layer().weight
        if weight.dim() != 2 or getattr(mod, "fan_in_fan_out", False):
            raise ValueError(f"{base!r}: only nn.Linear base layers (d_out x d_in) are supported")
        d_out, d_in = weight.shape
        if method == "random":
            rows, cols = (_random_axis(seed, base + ":rows", d_out), _random_axis(seed, base + ":cols", d_in))
        else:
            if stats is not None and method in ("dowser", "wanda") and base not in stats:
                raise ValueError(f"targets names {base!r}, which the statistics lack")
            entry = stats[base] if stats is not None and base in stats else None
            psi, a, bw = _rule_factors(method, entry, d_out, d_in, weight.device, base)
            rows, cols = axis_scores(weight, psi, a, bw)
        row_on, col_on = _select_axis(rows, p), _select_axis(cols, p)
        A, B = mod.lora_A[adapter].weight, mod.lora_B[adapter].weight  # (r, d_in), (d_out, r)
        for prm, on in ((B, row_on[:, None].expand(B.shape)), (A, col_on[None, :].expand(A.shape))):
            key = pnames[id(prm)]
            masks[key] = pack_mask(on.contiguous().to(prm.device))
            shapes[key] = tuple(prm.shape)
    meta = mask_metadata(stats, model)
    meta.update({"method": f"{method}-lora", "select": "lowest", "seed": seed, "rho": rho,
                 "axis_fraction": p, "scope": "axis", "dowser_version": __version__})
    return MaskSet(masks, shapes, meta)
