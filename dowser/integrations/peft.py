"""PEFT integration: dowser masks as the sparse support of PEFT's Super-Tuning adapter.

What the installed peft offers (checked on peft 0.21.2): Super-Tuning (`SupertuningConfig`,
`peft_type="SUPERTUNING"`) keeps, per nn.Linear, a 1-D fp32 parameter `supertuning_values` and
an int32 buffer `supertuning_indices` of flat positions, and computes W + scatter_add(indices,
values). It picks its indices itself by weight magnitude, `int(numel * (1 - sparsity))` per
layer with ONE `sparsity` for all layers, but it saves the indices in the adapter file and loads
them back over its own choice. That version has no `set_precomputed_indices`; this module does
what it would do: it writes dowser's indices into the adapter (export) and into the live
layers (training). SHiRA, the other sparse adapter peft ships, rebuilds its indices from a
mask function at load time and does not save them, so a SHiRA adapter with dowser's support
would not survive `PeftModel.from_pretrained`; hence Super-Tuning.

One sparsity for all layers means each layer holds `int(numel * (1 - sparsity))` slots; dowser
gives matrix i its own k_i. We choose the largest sparsity whose slot count covers every k_i
and fill a layer's spare slots with frozen positions holding -0.0 (export; w + -0.0 == w for
every w, bit for bit) or +0.0 kept at zero by a gradient hook (training; placed where the
weight is not -0.0). With scope="matrix" masks that is at most a few slots per layer.

    # (1) export a dowser fine-tune as a PEFT adapter
    from dowser.integrations.peft import export_adapter
    export_adapter(tuned_model, masks, "adapter/", base=base_model)
    merged = PeftModel.from_pretrained(base_model, "adapter/").merge_and_unload()

    # (2) train through PEFT on dowser's data-free selection
    from dowser.integrations.peft import get_peft_model
    masks = dowser.build_masks(model, dowser.probe(model, tok, layers=8), rho=0.1)
    peft_model = get_peft_model(model, masks)     # then any optimizer / Trainer / TRL
    peft_model.save_pretrained("adapter/")        # PeftModel.from_pretrained loads it

Limits: nn.Linear weights only (Super-Tuning's own limit: no GPT-2 Conv1D, no biases of the
adapted layers); other parameters that trained (norms) travel as PEFT `modules_to_save`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from dowser.ops import unpack_mask

__all__ = ["export_adapter", "get_peft_model", "supertuning_sparsity"]

_PREFIX = "base_model.model."


def _peft():
    try:
        import peft
    except ImportError as e:  # peft is an optional extra
        raise ImportError("dowser.integrations.peft needs peft: pip install 'dowser[test]' or "
                          "pip install peft") from e
    if not hasattr(peft, "SupertuningConfig"):
        raise ImportError(f"peft {peft.__version__} has no Super-Tuning adapter (SupertuningConfig); "
                          "install peft >= 0.21")
    return peft


def supertuning_sparsity(counts: Mapping[str, tuple[int, int]]) -> float:
    """The largest `sparsity` for which Super-Tuning's per-layer slot count, computed exactly as
    peft does (`int(numel * (1 - sparsity))`), is at least max(k, 1) for every layer.
    counts: name -> (k, numel)."""
    if not counts:
        raise ValueError("no layers")
    need = {n: (max(k, 1), numel) for n, (k, numel) in counts.items()}
    frac = max(k / numel for k, numel in need.values())
    s = 1.0 - frac
    while any(int(numel * (1 - s)) < k for k, numel in need.values()):
        s = math.nextafter(s, -math.inf)  # float rounding of n * (1 - s): step down until it fits
    return max(s, 0.0)


def _linear_targets(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, nn.Linear]:
    """masked parameter name -> its nn.Linear, refusing what Super-Tuning cannot adapt."""
    named = dict(model.named_modules())
    out = {}
    for name in masks:
        mname, _, leaf = name.rpartition(".")
        mod = named.get(mname)
        if leaf != "weight" or not isinstance(mod, nn.Linear):
            raise ValueError(f"{name!r} is not the weight of an nn.Linear: PEFT's Super-Tuning "
                             "adapts nn.Linear weights only (use dowser.save_delta instead)")
        out[name] = mod
    return out


def _owner_modules(model: nn.Module, names: list[str], linear_names: set[str]) -> list[str]:
    """Module names that own the parameters `names` (for modules_to_save)."""
    named = dict(model.named_modules())
    out = []
    for name in names:
        mname = name.rpartition(".")[0]
        if mname in linear_names:
            raise ValueError(f"{name!r} changed, but PEFT's Super-Tuning cannot carry a change to "
                             "a parameter of an adapted layer other than its weight (use "
                             "dowser.save_delta instead)")
        if mname not in named:
            raise ValueError(f"{name!r} belongs to no module")
        if mname not in out:
            out.append(mname)
    return out


def _slots(packed: torch.Tensor, shape: tuple[int, ...], slots: int, avoid: torch.Tensor | None
           ) -> tuple[torch.Tensor, int]:
    """(flat indices: the trainable ones ascending, then spare frozen positions; k)."""
    sel = unpack_mask(packed.detach().cpu(), shape).reshape(-1)
    idx = sel.nonzero().flatten()
    k = idx.numel()
    spare = ~sel
    if avoid is not None and int((spare & ~avoid).sum()) >= slots - k:
        spare &= ~avoid
    pad = spare.nonzero().flatten()[: slots - k]
    return torch.cat([idx, pad]), k


def _is_neg_zero(w: torch.Tensor) -> torch.Tensor:
    return (w == 0) & torch.signbit(w)


def export_adapter(model: nn.Module, masks: Mapping[str, torch.Tensor], path: str | os.PathLike, *,
                   base: nn.Module | Mapping[str, torch.Tensor],
                   base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """Write a dowser fine-tune of `base` as a PEFT Super-Tuning adapter directory at `path`
    (adapter_config.json + adapter_model.safetensors) that `PeftModel.from_pretrained(base,
    path)` loads and `merge_and_unload()` merges back into `model`'s weights.

    values = model - base over the trainable entries (fp32, as Super-Tuning stores them),
    computed in the weight's dtype: exact whenever the fine-tuned and base entries are within
    a factor of 2 (Sterbenz), and checked entry by entry against Super-Tuning's `w + value`
    (with up to 8 ulp nudges). An entry that `w + value` cannot reach (dowser trains the
    smallest-score, often near-zero entries, whose updates can exceed them) takes two slots
    at its index, -w then the fine-tuned value: exact when the slots are added in order, as
    scatter_add does on CPU. Parameters outside the masks that differ from base go as
    modules_to_save (whole modules; their other parameters must be unchanged).

    Returns {"sparsity", "slots" (values stored), "trainable" (sum of k), "two_slot" (entries
    stored as two slots), "inexact" (entries a CPU merge does not reproduce bit for bit: only
    a fine-tuned -0.0 can be, as +0.0), "max_abs_error"}.
    """
    peft = _peft()
    targets = _linear_targets(model, masks)
    params = dict(model.named_parameters())
    ref = dict(base.named_parameters()) if isinstance(base, nn.Module) else dict(base)
    for name, p in params.items():
        if name not in ref or tuple(ref[name].shape) != tuple(p.shape) or ref[name].dtype != p.dtype:
            raise ValueError(f"base does not fit the model at {name!r}")
    counts = {}
    for name, packed in masks.items():
        sel = unpack_mask(packed.detach().cpu(), params[name].shape)
        frozen_same = torch.equal(params[name].detach().cpu()[~sel], ref[name].detach().cpu()[~sel])
        if not frozen_same:
            raise ValueError(f"frozen entries of {name!r} differ from base: not a dowser fine-tune "
                             "of that base with these masks")
        counts[name] = (int(sel.sum()), params[name].numel())
    changed = [n for n, p in params.items() if n not in masks
               and not torch.equal(p.detach().cpu(), ref[n].detach().cpu())]
    linear_names = {n.rpartition(".")[0] for n in targets}
    to_save = _owner_modules(model, changed, linear_names)
    # Per layer: indices and values such that base.scatter_add(indices, values) == model,
    # evaluated with Super-Tuning's own arithmetic (values.to(dtype), scatter_add in dtype).
    plans, inexact, max_err = {}, 0, 0.0
    for name, packed in masks.items():
        p, b = params[name].detach().cpu(), ref[name].detach().cpu()
        idx, k = _slots(packed, tuple(p.shape), counts[name][0], None)
        ft, w = p.reshape(-1)[idx], b.reshape(-1)[idx]
        vals = (ft - w).float()  # exact when ft and w are within a factor 2 (Sterbenz)
        for _ in range(8):  # otherwise the nearest fp32 values may still round to ft
            bad = (w + vals.to(p.dtype)) != ft
            if not bool(bad.any()):
                break
            up = ((w + vals.to(p.dtype)) < ft)[bad]
            vals[bad] = torch.nextafter(vals[bad], torch.where(up, math.inf, -math.inf).to(vals.dtype))
        bad = ((w + vals.to(p.dtype)) != ft).nonzero().flatten()
        # What w + v cannot reach (an update larger than the new value, e.g. across zero) takes
        # two slots at one index: v1 = -w cancels to exactly +0, then + ft. scatter_add adds in
        # the order of the slots on CPU (GPU atomics may not: a GPU merge may differ there).
        vals[bad] = (-w[bad]).float()
        extra_idx, extra_vals = idx[bad], ft[bad].float()
        plans[name] = (torch.cat([idx, extra_idx]), torch.cat([vals, extra_vals]))
    for name, (used, _) in plans.items():
        if used.numel() > counts[name][1]:
            raise ValueError(f"{name!r}: {used.numel()} slots needed (two for each entry that "
                             f"w + v cannot reach) exceed its {counts[name][1]} entries")
    sparsity = supertuning_sparsity({n: (plans[n][0].numel(), counts[n][1]) for n in masks})
    tensors: dict[str, torch.Tensor] = {}
    total_slots = two_slot = 0
    for name, packed in masks.items():
        p, b = params[name].detach().cpu(), ref[name].detach().cpu()
        n = p.numel()
        slots = int(n * (1 - sparsity))
        used_idx, used_vals = plans[name]
        two_slot += used_idx.numel() - counts[name][0]
        taken = torch.zeros(n, dtype=torch.bool)
        taken[used_idx] = True
        pad = (~taken).nonzero().flatten()[: slots - used_idx.numel()]
        idx = torch.cat([used_idx, pad])
        values = torch.cat([used_vals, torch.full((pad.numel(),), -0.0)])  # w + -0.0 == w exactly
        merged = b.reshape(-1).scatter_add(0, idx, values.to(p.dtype))  # what PEFT will compute
        off = merged != p.reshape(-1)
        if bool(off.any()):  # only a -0.0 target can be left (+0 + -0 == +0)
            inexact += int(off.sum())
            max_err = max(max_err, float((merged - p.reshape(-1))[off].abs().max()))
        mname = name.rpartition(".")[0]
        tensors[f"{_PREFIX}{mname}.supertuning_indices"] = idx.to(torch.int32).contiguous()
        tensors[f"{_PREFIX}{mname}.supertuning_values"] = values.contiguous()
        total_slots += slots
    for mname in to_save:
        for pname, p in dict(model.named_modules())[mname].named_parameters(prefix=mname):
            tensors[_PREFIX + pname] = p.detach().cpu().clone().contiguous()
    config = peft.SupertuningConfig(target_modules=sorted(linear_names), sparsity=sparsity,
                                    select_top=False, modules_to_save=to_save or None,
                                    save_precomputed_indices=True)
    config.base_model_name_or_path = base_model_name_or_path
    os.makedirs(path, exist_ok=True)
    config.save_pretrained(os.fspath(path))
    from safetensors.torch import save_file

    from dowser._artifacts import atomic_path

    with atomic_path(os.path.join(os.fspath(path), "adapter_model.safetensors")) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    return {"sparsity": sparsity, "slots": total_slots,
            "trainable": sum(k for k, _ in counts.values()), "two_slot": two_slot,
            "inexact": inexact, "max_abs_error": max_err}


def get_peft_model(model: nn.Module, masks: Mapping[str, torch.Tensor], *,
                   adapter_name: str = "default", modules_to_save: list[str] | None = None,
                   **config_kwargs: Any):
    """`peft.get_peft_model` with a Super-Tuning adapter whose sparse support is `masks`.

    Each masked nn.Linear gets exactly its mask's trainable entries as trainable scalars
    (initialised to 0, so the model starts as `model`); spare slots (see the module docstring)
    are frozen positions whose values a gradient hook keeps at exactly 0 (a hook lives with
    this model: after PeftModel.from_pretrained they would train like any other slot).
    `peft_model.save_pretrained(dir)` then writes an adapter that `PeftModel.from_pretrained`
    loads with these indices. config_kwargs go to SupertuningConfig (e.g. r= for Supra).
    """
    peft = _peft()
    targets = _linear_targets(model, masks)
    counts = {}
    for name, packed in masks.items():
        from dowser.ops import popcount

        counts[name] = (popcount(packed), targets[name].weight.numel())
    sparsity = supertuning_sparsity(counts)
    config = peft.SupertuningConfig(target_modules=sorted(n.rpartition(".")[0] for n in masks),
                                    sparsity=sparsity, select_top=False,
                                    modules_to_save=modules_to_save,
                                    save_precomputed_indices=True, **config_kwargs)
    pm = peft.get_peft_model(model, config, adapter_name=adapter_name)
    named = dict(pm.base_model.model.named_modules())
    for name, packed in masks.items():
        layer = named[name.rpartition(".")[0]]
        w = layer.get_base_layer().weight
        slots = layer.supertuning_values[adapter_name].numel()
        idx, k = _slots(packed, tuple(w.shape), slots, _is_neg_zero(w.detach().cpu().reshape(-1)))
        layer.supertuning_indices[adapter_name] = idx.to(torch.int32).to(w.device)
        values = layer.supertuning_values[adapter_name]
        with torch.no_grad():
            values.zero_()
        if slots > k:
            keep = torch.zeros(slots, dtype=torch.bool, device=values.device)
            keep[:k] = True
            # where, not a product: a NaN gradient must not reach a spare slot either
            values.register_hook(lambda g, keep=keep: torch.where(keep, g, torch.zeros_like(g)))
    return pm
