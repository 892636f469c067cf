"""`dowser.prepare`: probe, build the masks, freeze everything outside the tuned layers; and the
selection that keeps entries of earlier tasks frozen (continual learning)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from dowser.masks import MaskSet, build_masks
from dowser.probe import decoder_layers, probe
from dowser.probe.stats import ProbeStats

__all__ = ["prepare", "build_masks_excluding"]

_TARGET_KWARGS = ("targets", "include_projector", "include_lm_head", "include_vision")


def _k_for(rho: float, n: int) -> int:
    return int(math.floor(rho * n + 0.5))


def _union(protect: MaskSet | Sequence[MaskSet] | None) -> MaskSet | None:
    if protect is None:
        return None
    if isinstance(protect, MaskSet):
        return protect
    if isinstance(protect, Mapping) or isinstance(protect, (str, bytes)):
        raise TypeError("protect must be a MaskSet or a sequence of MaskSets")
    sets = list(protect)
    if not sets:
        return None
    for s in sets:
        if not isinstance(s, MaskSet):
            raise TypeError(f"protect must hold MaskSets, got {type(s).__name__}")
    out = sets[0]
    for s in sets[1:]:
        out = out | s
    return out


def _param_names(model: nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), n)
    return names


def _check_room(counts: dict[str, tuple[int, int]], rho: float, scope: str) -> None:
    """Raise (before any selection) when fewer entries are left than the new masks need.
    counts: parameter -> (protected entries, total entries)."""
    if scope == "global":
        t = sum(c[0] for c in counts.values())
        n = sum(c[1] for c in counts.values())
        if _k_for(rho, n) > n - t:
            raise ValueError(f"protect leaves {n - t} of {n} targeted entries free, fewer than the "
                             f"k = {_k_for(rho, n)} that rho={rho} asks for (scope='global'): "
                             "lower rho or protect fewer tasks")
        return
    for name, (t, n) in counts.items():
        k = _k_for(rho, n)
        if k > n - t:
            raise ValueError(f"protect leaves {n - t} of {n} entries of {name!r} free, fewer "
                             f"than the k = {k} that rho={rho} asks for: lower rho or protect "
                             "fewer tasks")


def build_masks_excluding(model: nn.Module, stats: ProbeStats, protect: MaskSet | Sequence[MaskSet],
                          rho: float = 0.1, scope: str = "matrix", **build_kwargs: Any) -> MaskSet:
    """dowser.build_masks, but never selecting a protected entry (bit 1 in `protect`).

    Exactly k = floor(rho * n + 0.5) entries per matrix (per all targeted matrices together
    with scope="global"), n counted over ALL entries, are chosen among the unprotected ones:
    the k lowest-scoring unprotected entries, ties to the lower flat index, exactly as if every
    protected entry scored +inf. When fewer than k entries are free, ValueError (no clamping).

    How, without a score matrix: let c(K) be how many unprotected entries the plain bottom-K
    selection holds. Bottom-K restricted to unprotected entries is a prefix of the unprotected
    entries in (score, index) order, so any K with c(K) = k gives exactly the answer; c grows by
    0 or 1 per step of K, so such a K lies in [k, k + t] (t protected entries) and is found by a
    safeguarded search (a few selections per matrix).
    """
    from dowser.ops import popcount

    protect = _union(protect)
    if protect is None:
        return build_masks(model, stats, rho=rho, scope=scope, **build_kwargs)
    first = build_masks(model, stats, rho=rho, scope=scope, **build_kwargs)
    for name in first:
        if name in protect and protect.shapes[name] != first.shapes[name]:
            raise ValueError(f"protect has {name!r} as {protect.shapes[name]}, the model "
                             f"{first.shapes[name]}")
    numel = {n: math.prod(s) for n, s in first.shapes.items()}
    prot = {n: protect[n].to(first[n].device) for n in first if n in protect}
    t_of = {n: (popcount(prot[n]) if n in prot else 0) for n in first}
    _check_room({n: (t_of[n], numel[n]) for n in first}, rho, scope)

    def free(name: str, packed):
        return packed & ~prot[name] if name in prot else packed

    out = {n: free(n, first[n]) for n in first}
    modules = first.metadata.get("modules", {})
    if scope == "global":
        total = sum(numel.values())
        k = _k_for(rho, total)
        t = sum(t_of.values())

        def select(K: int) -> dict:
            m = first if K == k else build_masks(model, stats, rho=K / total, scope="global",
                                                 **build_kwargs)
            return {n: free(n, m[n]) for n in m}

        def count(masks: dict) -> int:
            return sum(popcount(v) for v in masks.values())

        out = _search(select, count, k, t, total, out)
    else:
        pnames = _param_names(model)
        named = dict(model.named_modules())
        for name in first:
            if t_of[name] == 0:
                continue
            mname = modules.get(name)
            if mname is None:  # masks without the module map: find the module of the weight
                mname = next(m for m in stats if pnames.get(id(named[m].weight)) == name)
            sub = ProbeStats({mname: stats[mname]}, stats.metadata)
            n, k = numel[name], _k_for(rho, numel[name])

            def select(K: int, name=name, sub=sub, n=n) -> dict:
                m = build_masks(model, sub, rho=K / n, scope="matrix", **build_kwargs)
                return {name: free(name, m[name])}

            def count(masks: dict, name=name) -> int:
                return popcount(masks[name])

            out.update(_search(select, count, k, t_of[name], n, {name: out[name]}))
    meta = dict(first.metadata)
    meta["protected"] = sum(t_of.values())
    return MaskSet(out, first.shapes, meta, first.score_samples)


def _search(select, count, k: int, t: int, n: int, at_k: dict) -> dict:
    """Any K in [k, min(n, k + t)] with count(select(K)) == k, and that selection."""
    lo, c_lo = k, count(at_k)
    if c_lo == k:
        return at_k
    hi = min(n, k + t)
    c_hi = None  # c(hi) >= k is guaranteed; evaluated only when needed
    step = 0
    while True:
        # c(K) <= c_lo + (K - lo), so K* >= lo + (k - c_lo); and K* <= hi - (c_hi - k)
        low_bound = lo + (k - c_lo)
        high_bound = hi if c_hi is None else hi - (c_hi - k)
        if c_hi is None:  # no overshoot yet: assume the free fraction below lo holds on
            K = -(-lo * k // c_lo) if c_lo > 0 else low_bound
        elif step % 2 == 0:  # interpolate between the brackets
            K = lo + round((k - c_lo) * (hi - lo) / (c_hi - c_lo))
        else:  # bisection every other step bounds the worst case
            K = (lo + hi) // 2
        K = max(low_bound, min(high_bound, K))
        step += 1
        sel = select(K)
        c = count(sel)
        if c == k:
            return sel
        if c < k:
            lo, c_lo = K, c
        else:
            hi, c_hi = K, c


def prepare(model: nn.Module, tokenizer: Any = None, rho: float = 0.1, layers: int | None = None,
            *, scope: str = "matrix", protect: MaskSet | Sequence[MaskSet] | None = None,
            **probe_kwargs: Any) -> MaskSet:
    """Probe `model`, build its masks, and freeze everything outside the tuned layers.

    The tuned layers are the decoder layers that hold a probed target (and any probed module
    outside them: projector linears, lm_head); every parameter in them trains (2-D targets
    through their masks, 1-D norms/biases densely); every other parameter gets
    requires_grad=False. Returns the MaskSet (keys: parameter names), ready for
    dowser.MaskedAdamW(params, masks, model=model); its metadata records the hashes of the
    frozen entries (MaskSet.bind), so MaskSet.load(..., check_content=True) can check a model.

    protect: masks of earlier tasks (a MaskSet or several). Their entries stay frozen and the
    new masks are chosen among the rest (see build_masks_excluding: exactly k = floor(rho*n +
    0.5) new entries per matrix, n counted over all entries; ValueError, before probing, when
    fewer are free). With protect, only masked entries train: the 1-D parameters of the tuned
    layers are frozen too, since earlier tasks trained them and they cannot be split.
    """
    from dowser._checks import check_rho

    rho = check_rho(rho)
    protect = _union(protect)
    if protect is not None:
        _precheck(model, protect, rho, scope, layers, probe_kwargs)
    stats = probe(model, tokenizer, layers=layers, **probe_kwargs)
    if protect is None:
        masks = build_masks(model, stats, rho=rho, scope=scope)
    else:
        masks = build_masks_excluding(model, stats, protect, rho=rho, scope=scope)
    freeze_outside_layers(model, list(stats), only=None if protect is None else list(masks))
    return masks.bind(model)


def freeze_outside_layers(model: nn.Module, modules: Sequence[str],
                          only: Sequence[str] | None = None) -> None:
    """requires_grad=True exactly for the parameters of the decoder layers (or, outside them,
    the modules themselves) that hold one of `modules`; with `only` (parameter names), just
    those of them. `prepare` freezes this way after probing; a run that loads a mask file
    freezes the same way from the masks' module names."""
    units = set()
    try:
        prefix = decoder_layers(model)[0]
    except ValueError:
        prefix = None
    for name in modules:
        unit = name
        if prefix is not None and name.startswith(prefix + "."):
            idx = name[len(prefix) + 1:].split(".")[0]
            unit = f"{prefix}.{idx}"
        units.add(unit)
    named = dict(model.named_modules())
    missing = [u for u in units if u not in named]
    if missing:
        raise ValueError(f"{type(model).__name__} has no module {missing[0]!r}")
    tuned = {id(p) for u in units for p in named[u].parameters()}
    params = dict(model.named_parameters())
    chosen = None if only is None else {id(params[n]) for n in only}
    for p in model.parameters():
        p.requires_grad_(id(p) in tuned and (chosen is None or id(p) in chosen))


def _precheck(model: nn.Module, protect: MaskSet, rho: float, scope: str, layers: int | None,
              probe_kwargs: dict) -> None:
    """The room check of build_masks_excluding, before the (expensive) probe."""
    from dowser.ops import popcount
    from dowser.probe.targets import find_targets

    if scope not in ("matrix", "global"):
        return  # build_masks gives the error
    kw = {k: probe_kwargs[k] for k in _TARGET_KWARGS if k in probe_kwargs}
    named = dict(model.named_modules())
    pnames = _param_names(model)
    counts = {}
    for mname in find_targets(model, layers=layers, **kw):
        w = getattr(named[mname], "weight", None)
        pname = pnames.get(id(w)) if w is not None else None
        if pname is None:
            continue
        t = popcount(protect[pname]) if pname in protect else 0
        counts[pname] = (t, w.numel())
    _check_room(counts, rho, scope)
