"""Which linear layers to probe and tune: the decoder layers of a Hugging Face model, its
multimodal projector, vision tower and lm_head, found through the model's own structure."""

from __future__ import annotations

import re
from typing import Any, Sequence

import torch
from torch import nn

PROJECTOR_NAMES = ("multi_modal_projector", "connector", "visual.merger", "mm_projector")
VISION_NAMES = ("vision_tower", "vision_model", "visual")


def is_conv1d(mod: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2): y = x @ W + b with W stored (d_in, d_out).
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf")


def _is_linear(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) or is_conv1d(mod)


def weight_of(mod: nn.Module) -> torch.Tensor | None:
    w = getattr(mod, "weight", None)
    return w if isinstance(w, torch.Tensor) and w.dim() == 2 and _is_linear(mod) else None


def layer_dims(mod: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of the map z = W h that `mod` computes."""
    w = mod.weight
    return (w.shape[1], w.shape[0]) if is_conv1d(mod) else (w.shape[0], w.shape[1])


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _layer_list(mod: nn.Module) -> nn.ModuleList | None:
    for attr in ("layers", "h", "blocks"):
        cand = getattr(mod, attr, None)
        if isinstance(cand, nn.ModuleList) and len(cand):
            return cand
    inner = getattr(mod, "model", None)
    if isinstance(inner, nn.Module) and inner is not mod:
        return _layer_list(inner)
    return None


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the language decoder's layers, found through the model's
    own structure: get_decoder(), language_model, text_model, model, transformer."""
    names = {id(m): n for n, m in model.named_modules()}
    candidates: list[Any] = []
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            candidates.append(get_decoder())
        except Exception:  # noqa: BLE001 - some models define it but cannot answer
            pass
    for path in ("language_model", "model.language_model", "text_model", "model.text_model",
                 "model", "transformer"):
        candidates.append(_get_path(model, path))
    for cand in candidates:
        if isinstance(cand, nn.Module) and id(cand) in names:
            layers = _layer_list(cand)
            if layers is not None and id(layers) in names:
                return names[id(layers)], layers
    raise ValueError(
        f"dowser cannot find the decoder layers of {type(model).__name__}: pass targets=[module "
        "names] or targets='regex' to name the linear layers to probe")


def _find_named(model: nn.Module, suffixes: Sequence[str]) -> list[str]:
    """Names of top-most modules whose qualified name ends with one of `suffixes`."""
    found: list[str] = []
    for name, _ in model.named_modules():
        if any(name == s or name.endswith("." + s) for s in suffixes):
            if not any(name.startswith(f + ".") for f in found):
                found.append(name)
    return found


def _linears_under(model: nn.Module, prefixes: Sequence[str], exclude: Sequence[str] = ()) -> list[str]:
    out = []
    for name, mod in model.named_modules():
        if not _is_linear(mod) or weight_of(mod) is None:
            continue
        if any(name.startswith(p + ".") for p in prefixes) and \
                not any(name.startswith(e + ".") for e in exclude):
            out.append(name)
    return out


def find_targets(model: nn.Module, *, layers: int | None = None,
                 targets: Sequence[str] | str | None = None, include_projector: bool = False,
                 include_lm_head: bool = False, include_vision: bool = False) -> dict[str, str]:
    """Module names to probe, each mapped to its role: "text", "projector", "vision", "lm_head".

    Default: every linear layer of the language decoder's last `layers` layers (all if None).
    `targets` (a list of module names or one regex matched with re.search against names of
    linear modules) replaces the discovery.
    """
    named = dict(model.named_modules())
    if targets is not None:
        if isinstance(targets, str):
            pattern = re.compile(targets)
            chosen = [n for n, m in named.items() if weight_of(m) is not None and pattern.search(n)]
            if not chosen:
                raise ValueError(f"targets regex {targets!r} matches no linear layer of "
                                 f"{type(model).__name__}")
        else:
            chosen = list(targets)
            for n in chosen:
                if n not in named:
                    raise ValueError(f"targets: {type(model).__name__} has no module named {n!r}")
                if weight_of(named[n]) is None:
                    raise ValueError(f"targets: module {n!r} is a {type(named[n]).__name__}, not a "
                                     "linear layer (nn.Linear or Conv1D)")
        return {n: _role(model, n) for n in chosen}

    prefix, layer_list = decoder_layers(model)
    n = len(layer_list)
    if layers is not None:
        if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= n:
            raise ValueError(f"layers must be an int in [1, {n}] (the number of last decoder "
                             f"layers to probe), got {layers!r}")
    first = n - (layers if layers is not None else n)
    out: dict[str, str] = {}
    for i in range(first, n):
        for name in _linears_under(model, [f"{prefix}.{i}"]):
            out[name] = "text"
    if include_vision:
        proj = _find_named(model, PROJECTOR_NAMES)
        vis = _find_named(model, VISION_NAMES)
        if not vis:
            raise ValueError(f"include_vision: {type(model).__name__} has no vision tower "
                             f"(looked for {', '.join(VISION_NAMES)})")
        for name in _linears_under(model, vis, exclude=proj):
            out[name] = "vision"
    if include_projector:
        proj = _find_named(model, PROJECTOR_NAMES)
        if not proj:
            raise ValueError(f"include_projector: {type(model).__name__} has no multimodal "
                             f"projector (looked for {', '.join(PROJECTOR_NAMES)})")
        for name in _linears_under(model, proj):
            out[name] = "projector"
    if include_lm_head:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None or weight_of(head) is None:
            raise ValueError(f"include_lm_head: {type(model).__name__} has no linear lm_head")
        names = {id(m): nm for nm, m in model.named_modules()}
        out[names[id(head)]] = "lm_head"
    return out


def _role(model: nn.Module, name: str) -> str:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and dict(model.named_modules()).get(name) is head:
        return "lm_head"
    if any(name == p or name.startswith(p + ".") for p in _find_named(model, PROJECTOR_NAMES)):
        return "projector"
    if any(name.startswith(p + ".") for p in _find_named(model, VISION_NAMES)):
        return "vision"
    return "text"


def projector_inputs(model: nn.Module, image_names: list[str]) -> set[str]:
    """The projector's first linear layer(s): those whose input is the vision features."""
    out = set()
    for prefix in _find_named(model, PROJECTOR_NAMES):
        lins = [n for n in image_names if n.startswith(prefix + ".")]
        if lins:
            out.add(lins[0])
    return out
