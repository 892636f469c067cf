"""Sparse task deltas: the few weights a dowser fine-tune changed, as one small safetensors file.

    dowser.save_delta(model, masks, "task.safetensors", base=base_model)   # after training
    dowser.apply_delta(fresh_base_model, "task.safetensors")             # bit-exact restore

A delta holds, per masked parameter, the trainable entries' new values (in mask order, i.e.
ascending row-major flat index, in the parameter's own dtype) and the packed mask; the dense
parameters that trained whole (norms and biases of the tuned layers) in full; and metadata:
every parameter's shape and dtype and a sha256 of each masked parameter's FROZEN entries. The
frozen entries are what the fine-tune never touched, so they identify the base model: a base of
the same names and shapes but other weights is refused, naming the first layer that differs.
The file is about rho of the masked layers' size, plus n/8 bytes of masks.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from dowser import _artifacts
from dowser._artifacts import frozen_hash

KIND = "dowser.Delta"

__all__ = ["save_delta", "apply_delta", "frozen_hash"]


def _bool_mask(packed: torch.Tensor, numel: int) -> torch.Tensor:
    from dowser.ops import unpack_mask

    return unpack_mask(packed.detach().cpu(), (numel,))


def _base_tensors(base: Any) -> Mapping[str, torch.Tensor]:
    if isinstance(base, nn.Module):
        return dict(base.named_parameters())
    if isinstance(base, Mapping):
        return base
    raise TypeError(f"base must be an nn.Module or a Mapping name -> tensor, got {type(base).__name__}")


def save_delta(model: nn.Module, masks: Mapping[str, torch.Tensor], path: str | os.PathLike, *,
               base: nn.Module | Mapping[str, torch.Tensor] | None = None,
               dense: list[str] | None = None) -> dict[str, int]:
    """Write the sparse task delta of a dowser fine-tune of `model` to `path` (safetensors).

    Args:
        model: the fine-tuned model.
        masks: parameter name -> packed mask (the MaskSet it was trained with).
        base: the model before fine-tuning (or its named tensors). When given, every frozen
            entry and every parameter outside the delta is checked to be bit-identical to it
            (ValueError naming the first one that is not), and `dense` defaults to the
            non-masked parameters that differ from it.
        dense: names of non-masked parameters stored whole (default without base: those with
            requires_grad=True, which is what dowser.prepare trains densely).

    Returns {"bytes": file size, "values": trainable entries stored, "dense": dense entries}.
    """
    from dowser import __version__
    from dowser._checks import check_packed

    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a Mapping name -> packed mask, got {type(masks).__name__}")
    params = dict(model.named_parameters())
    for name, packed in masks.items():
        if name not in params:
            raise ValueError(f"masks name {name!r}, which this {type(model).__name__} lacks")
        check_packed(f"masks[{name!r}]", packed, params[name].numel())
    ref = _base_tensors(base) if base is not None else None
    if ref is not None:
        for name in params:
            if name not in ref:
                raise ValueError(f"base has no parameter {name!r}")
            if tuple(ref[name].shape) != tuple(params[name].shape) or ref[name].dtype != params[name].dtype:
                raise ValueError(f"base parameter {name!r} is {tuple(ref[name].shape)} "
                                 f"{ref[name].dtype}, the model's {tuple(params[name].shape)} "
                                 f"{params[name].dtype}")
    if dense is None:
        if ref is not None:
            dense = [n for n, p in params.items() if n not in masks
                     and not torch.equal(p.detach().cpu(), ref[n].detach().cpu())]
        else:
            dense = [n for n, p in params.items() if n not in masks and p.requires_grad]
    dense = list(dense)
    for name in dense:
        if name not in params:
            raise ValueError(f"dense names {name!r}, which this {type(model).__name__} lacks")
        if name in masks:
            raise ValueError(f"{name!r} is both masked and dense")
    if ref is not None:  # the delta must say everything that changed
        for name, p in params.items():
            if name in dense:
                continue
            now, was = p.detach().cpu(), ref[name].detach().cpu()
            if name in masks:
                frozen = ~_bool_mask(masks[name], p.numel()).view(p.shape)
                now, was = now[frozen], was[frozen]
            if not torch.equal(now, was):
                what = "frozen entries of" if name in masks else "parameter"
                raise ValueError(f"the {what} {name!r} differ from base: this model is not a "
                                 "dowser fine-tune of that base with these masks")
    tensors: dict[str, torch.Tensor] = {}
    meta_params: dict[str, Any] = {}
    n_values = n_dense = 0
    for name, packed in masks.items():
        p = params[name].detach()
        sel = _bool_mask(packed, p.numel())
        tensors["values:" + name] = p.reshape(-1).cpu()[sel].clone()
        tensors["mask:" + name] = packed.detach().cpu().clone()
        meta_params[name] = {"shape": list(p.shape), "dtype": str(p.dtype).replace("torch.", ""),
                             "frozen_sha256": frozen_hash(p, packed)}
        n_values += int(sel.sum())
    for name in dense:
        p = params[name].detach()
        tensors["dense:" + name] = p.cpu().clone().contiguous()
        meta_params[name] = {"shape": list(p.shape), "dtype": str(p.dtype).replace("torch.", ""),
                             "dense": True}
        n_dense += p.numel()
    meta = dict(_artifacts.model_identity(model))
    meta.update({"dowser_version": __version__, "params": meta_params, "masked": list(masks),
                 "dense": dense, "n_values": n_values})
    if isinstance(getattr(masks, "metadata", None), dict):
        for key in ("rho", "scope", "method"):
            if key in masks.metadata:
                meta[key] = masks.metadata[key]
    if isinstance(base, nn.Module):
        meta["base_model_name"] = _artifacts.model_identity(base)["model_name"]
    _artifacts.save(path, tensors, KIND, meta,
                    plain=("format_version", "rho", "model_name", "config_hash", "dowser_version"))
    return {"bytes": os.path.getsize(path), "values": n_values, "dense": n_dense}


def apply_delta(model: nn.Module, path: str | os.PathLike):
    """Write the delta at `path` onto `model` (the base it was made for), bit-exactly, in place.

    Every check runs before anything is written: each parameter the delta names must exist with
    the same shape and dtype, and each masked parameter's frozen entries must hash to the
    recorded value (so a same-shaped different model is refused, naming the layer). Returns
    the delta's MaskSet (e.g. to protect those entries in a later task)."""
    from dowser._checks import check_packed
    from dowser.masks import MaskSet

    meta, tensors = _artifacts.load(path, KIND)
    params = dict(model.named_parameters())
    info = meta["params"]
    for name, entry in info.items():
        p = params.get(name)
        if p is None:
            raise ValueError(f"delta {path} was made for another model: this "
                             f"{type(model).__name__} has no parameter {name!r}")
        dtype = str(p.dtype).replace("torch.", "")
        if list(p.shape) != entry["shape"] or dtype != entry["dtype"]:
            raise ValueError(f"delta {path} was made for another model: parameter {name!r} is "
                             f"{tuple(p.shape)} {dtype} here but {tuple(entry['shape'])} "
                             f"{entry['dtype']} in the file")
    masks, shapes = {}, {}
    for name in meta["masked"]:
        p = params[name]
        packed, values = tensors["mask:" + name], tensors["values:" + name]
        check_packed(f"mask {name!r} in {path}", packed, p.numel())
        if frozen_hash(p, packed) != info[name]["frozen_sha256"]:
            raise ValueError(f"delta {path} was made for another model: the frozen entries of "
                             f"{name!r} differ from its base (same names and shapes, other "
                             "weights)")
        sel = _bool_mask(packed, p.numel())
        if values.numel() != int(sel.sum()):
            raise ValueError(f"delta {path} is damaged: {name!r} has {values.numel()} values "
                             f"for {int(sel.sum())} trainable entries")
        masks[name], shapes[name] = packed, tuple(p.shape)
    with torch.no_grad():
        for name in meta["masked"]:
            p = params[name]
            sel = _bool_mask(masks[name], p.numel()).to(p.device)
            flat = p.detach().reshape(-1).clone() if not p.is_contiguous() else p.data.view(-1)
            # boolean indexing fills the selected entries in row-major order: the mask order
            flat[sel] = tensors["values:" + name].to(p.device)
            if not p.is_contiguous():
                p.copy_(flat.view(p.shape))
        for name in meta["dense"]:
            params[name].copy_(tensors["dense:" + name].to(params[name].device))
    keep = {k: meta[k] for k in ("rho", "scope", "method", "model_name", "model_class",
                                 "config_hash", "dowser_version") if k in meta}
    device = next(iter(params.values())).device if params else "cpu"
    return MaskSet({k: v.to(device) for k, v in masks.items()}, shapes, keep)
