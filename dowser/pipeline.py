"""`dowser.prepare`: probe, build the masks, freeze everything outside the tuned layers."""

from __future__ import annotations

from typing import Any

from torch import nn

from dowser.masks import MaskSet, build_masks
from dowser.probe import decoder_layers, probe


def prepare(model: nn.Module, tokenizer: Any = None, rho: float = 0.1, layers: int | None = None,
            *, scope: str = "matrix", **probe_kwargs: Any) -> MaskSet:
    """Probe `model`, build its masks, and freeze everything outside the tuned layers.

    The tuned layers are the decoder layers that hold a probed target (and any probed module
    outside them: projector linears, lm_head); every parameter in them trains (2-D targets
    through their masks, 1-D norms/biases densely); every other parameter gets
    requires_grad=False. Returns the MaskSet (keys: parameter names), ready for
    dowser.MaskedAdamW(params, masks, model=model).
    """
    stats = probe(model, tokenizer, layers=layers, **probe_kwargs)
    masks = build_masks(model, stats, rho=rho, scope=scope)
    units = set()
    try:
        prefix = decoder_layers(model)[0]
    except ValueError:
        prefix = None
    for name in stats:
        unit = name
        if prefix is not None and name.startswith(prefix + "."):
            idx = name[len(prefix) + 1:].split(".")[0]
            unit = f"{prefix}.{idx}"
        units.add(unit)
    named = dict(model.named_modules())
    tuned = {id(p) for u in units for p in named[u].parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in tuned)
    return masks
