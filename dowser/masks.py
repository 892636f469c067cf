"""Stage 2 of Model-Dowser: masks from probe statistics (or from a baseline rule), and their
safetensors files.

One builder for every scoring rule (see docs/methods.md): "dowser" |W|*(Psi^T diag(w) A)/sum(w),
"magnitude" |W|, "wanda" |W_ij|*||X_j||_2 all go through `dowser.ops.build_mask` (or
`build_masks_global`) as low-rank factors (magnitude and wanda are rank 1 with factors of ones
and of input norms), over the parameter AS STORED: GPT-2's Conv1D keeps W^T (d_in x d_out), so
its mask is built on the stored weight with the factors swapped. "random" scores entry i of
parameter `name` by a counter-based hash of (seed, name, i) (dowser._keys). No d_out x d_in
score matrix is ever materialised here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from dowser import _artifacts
from dowser._artifacts import frozen_hash, model_identity
from dowser._checks import check_rho
from dowser.probe.stats import ProbeEntry, ProbeStats
from dowser.probe.targets import is_conv1d, layer_dims, weight_of

KIND = "dowser.MaskSet"

__all__ = ["MaskSet", "build_masks", "METHODS"]

METHODS = ("dowser", "magnitude", "wanda", "random")
SELECTS = ("lowest", "highest")

_SAMPLES_PREFIX = "__score_samples__."
_N_SAMPLES = 2048  # sampled scores kept per matrix for `dowser inspect` histograms


class MaskSet(Mapping):
    """Mapping parameter name (as in model.named_parameters()) -> packed int32 mask.

    Attributes:
        shapes: parameter name -> the parameter's shape (the mask's layout is row-major over it).
        metadata: method, select, rho, scope, seed (of build_masks), probe settings (the probe's
            seed as probe_seed), model identity, package version.
        score_samples: parameter name -> fp32 scores of a fixed random sample of its entries
            (for histograms; empty when unknown).
    """

    def __init__(self, masks: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]],
                 metadata: dict[str, Any] | None = None,
                 score_samples: dict[str, torch.Tensor] | None = None):
        if set(masks) != set(shapes):
            raise ValueError("masks and shapes must name the same parameters")
        self._masks = dict(masks)
        self.shapes = {k: tuple(int(s) for s in v) for k, v in shapes.items()}
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.score_samples: dict[str, torch.Tensor] = dict(score_samples or {})

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def __repr__(self) -> str:
        return (f"MaskSet({len(self)} masks, method={self.metadata.get('method', 'dowser')}, "
                f"rho={self.metadata.get('rho')}, scope={self.metadata.get('scope')})")

    def to(self, device: torch.device | str) -> "MaskSet":
        """A copy with every mask on `device`."""
        return MaskSet({k: v.to(device) for k, v in self._masks.items()}, self.shapes,
                       self.metadata, self.score_samples)

    def counts(self) -> dict[str, tuple[int, int]]:
        """parameter name -> (trainable entries, total entries)."""
        from dowser.ops import popcount

        out = {}
        for name, packed in self._masks.items():
            total = 1
            for s in self.shapes[name]:
                total *= s
            out[name] = (popcount(packed), total)
        return out

    def summary(self) -> str:
        """A per-layer table: trainable count, total and fraction of every masked parameter."""
        counts = self.counts()
        width = max([len(n) for n in counts] + [9])
        lines = [f"{'parameter':<{width}}  {'shape':>14}  {'trainable':>11}  {'total':>11}  "
                 f"{'fraction':>8}"]
        all_t = all_n = 0
        for name, (t, n) in counts.items():
            shape = "x".join(map(str, self.shapes[name]))
            lines.append(f"{name:<{width}}  {shape:>14}  {t:>11}  {n:>11}  "
                         f"{(t / n if n else 0):>8.4f}")
            all_t += t
            all_n += n
        lines.append(f"{'total':<{width}}  {'':>14}  {all_t:>11}  {all_n:>11}  "
                     f"{(all_t / all_n if all_n else 0):>8.4f}")
        # files from before scoring methods existed hold dowser masks
        meta = ", ".join([f"method={self.metadata.get('method', 'dowser')}"] + [
            f"{k}={self.metadata[k]}" for k in ("select", "rho", "scope", "seed", "n_samples", "n_rademacher",
                          "estimator", "probe_seed", "model_name") if k in self.metadata])
        return meta + "\n" + "\n".join(lines)

    # -- set operations (continual learning) ---------------------------------------------
    def _combine(self, other: "MaskSet", op: str) -> "MaskSet":
        if not isinstance(other, MaskSet):
            return NotImplemented
        for name in self.keys() & other.keys():
            if self.shapes[name] != other.shapes[name]:
                raise ValueError(f"MaskSet {op}: parameter {name!r} is {self.shapes[name]} in "
                                 f"one mask set and {other.shapes[name]} in the other")
        if op == "|":
            names = list(self) + [n for n in other if n not in self._masks]
        elif op == "&":
            names = [n for n in self if n in other._masks]
        else:
            names = list(self)
        out = {}
        for name in names:
            a, b = self._masks.get(name), other._masks.get(name)
            if a is not None and b is not None:
                b = b.to(a.device)
            if op == "|":
                word = a if b is None else (b if a is None else a | b)
            elif op == "&":
                word = a & b
            else:  # padding bits of ~b are 1 but a's are 0, so a & ~b keeps them 0
                word = a if b is None else a & ~b
            out[name] = word.clone()
        shapes = {n: self.shapes.get(n, other.shapes.get(n)) for n in names}
        # rho/scope/probe settings describe one selection, not a combination of two
        keep = ("model_name", "model_class", "config_hash", "dowser_version")
        meta = {k: self.metadata[k] for k in keep if k in self.metadata}
        meta["derived"] = op
        return MaskSet(out, shapes, meta)

    def __or__(self, other: "MaskSet") -> "MaskSet":
        """Union: an entry is set if it is set in either (parameters of both kept)."""
        return self._combine(other, "|")

    def __and__(self, other: "MaskSet") -> "MaskSet":
        """Intersection: an entry is set if it is set in both (only shared parameters)."""
        return self._combine(other, "&")

    def __sub__(self, other: "MaskSet") -> "MaskSet":
        """Difference: entries set here and not in `other` (this set's parameters)."""
        return self._combine(other, "-")

    # -- content identity -------------------------------------------------------------------
    def frozen_hashes(self, model: nn.Module) -> dict[str, str]:
        """parameter name -> sha256 of its frozen entries (dtype, shape, bytes in flat order).

        Frozen entries never move under dowser fine-tuning, so the hash is the same before and
        after training, and it tells two same-shaped models apart."""
        params = dict(model.named_parameters())
        out = {}
        for name, packed in self._masks.items():
            if name not in params:
                raise ValueError(f"this {type(model).__name__} has no parameter {name!r} named "
                                 "by the masks")
            out[name] = frozen_hash(params[name], packed)
        return out

    def bind(self, model: nn.Module) -> "MaskSet":
        """Record the frozen-entry hashes of `model` in metadata["frozen_sha256"] (in place;
        returns self), so that MaskSet.load(path, model, check_content=True) can refuse a
        same-shaped different model. dowser.prepare does this for you."""
        self.metadata["frozen_sha256"] = self.frozen_hashes(model)
        return self

    def check_content(self, model: nn.Module, path: str | os.PathLike | None = None) -> None:
        """Raise ValueError (naming the layer) unless `model`'s frozen entries hash to the
        values recorded by `bind`."""
        where = f"mask file {path}" if path is not None else "these masks"
        recorded = self.metadata.get("frozen_sha256")
        if not recorded:
            raise ValueError(f"{where} hold no content hashes (made before MaskSet.bind or "
                             "dowser.prepare recorded them): cannot check the model's content")
        found = self.frozen_hashes(model)
        for name, digest in recorded.items():
            if found.get(name) != digest:
                raise ValueError(f"{where} were made for another model: the frozen entries of "
                                 f"{name!r} differ (same names and shapes, other weights)")

    def save(self, path: str | os.PathLike) -> None:
        """Write the masks (int32 words) and metadata to a safetensors file (no pickle)."""
        tensors = {k: v.detach().cpu().clone() for k, v in self._masks.items()}
        for k, v in self.score_samples.items():
            tensors[_SAMPLES_PREFIX + k] = v.detach().float().cpu().clone()
        meta = {**self.metadata, "shapes": {k: list(v) for k, v in self.shapes.items()}}
        _artifacts.save(path, tensors, KIND, meta,
                        plain=("format_version", "rho", "scope", "method", "select", "n_samples",
                               "n_rademacher", "estimator", "seed", "probe_seed", "model_name",
                               "config_hash", "dowser_version"))

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None, *,
             check_content: bool = False) -> "MaskSet":
        """Read a mask file; with `model`, refuse one made for another model: the message names
        the first parameter that is missing or has another shape. With check_content=True
        also refuse a same-shaped different model (hashes of the frozen entries, see bind)."""
        from dowser._checks import check_packed

        meta, tensors = _artifacts.load(path, KIND)
        shapes = {k: tuple(v) for k, v in meta.pop("shapes").items()}
        samples = {k[len(_SAMPLES_PREFIX):]: v for k, v in tensors.items()
                   if k.startswith(_SAMPLES_PREFIX)}
        masks = {k: tensors[k] for k in shapes}  # the file's parameter order
        for name, packed in masks.items():
            numel = 1
            for s in shapes[name]:
                numel *= s
            check_packed(f"mask {name!r} in {path}", packed, numel)
        if model is not None:
            params = dict(model.named_parameters())
            for name, shape in shapes.items():
                if name not in params:
                    raise ValueError(f"mask file {path} was made for another model: this "
                                     f"{type(model).__name__} has no parameter {name!r}")
                if tuple(params[name].shape) != shape:
                    raise ValueError(
                        f"mask file {path} was made for another model: parameter {name!r} is "
                        f"{tuple(params[name].shape)} here but {shape} in the file")
        out = cls(masks, shapes, meta, samples)
        if check_content:
            if model is None:
                raise ValueError("check_content=True needs model=")
            out.check_content(model, path)
        return out


def _param_names(model: nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), n)  # first name, as named_parameters() reports a tied weight
    return names


def _sample_index(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    n = min(_N_SAMPLES, rows * cols)
    return torch.randperm(rows * cols, generator=gen)[:n] if rows * cols <= 1 << 24 else \
        torch.randint(0, rows * cols, (n,), generator=gen)


def _sample_scores(weight: torch.Tensor, psi: torch.Tensor, a: torch.Tensor, bw: torch.Tensor,
                   conv1d: bool, gen: torch.Generator) -> torch.Tensor:
    """Scores of _N_SAMPLES random entries of the stored weight, without the dense matrix
    (of this rank's rows when the weight is sharded)."""
    from dowser.distributed import local_rows

    weight, row0 = local_rows(weight)
    if conv1d:
        a = a[:, row0:row0 + weight.shape[0]]
    else:
        psi = psi[:, row0:row0 + weight.shape[0]]
    rows, cols = weight.shape
    idx = _sample_index(rows, cols, gen).to(weight.device)
    r, c = idx // cols, idx % cols
    out_i, in_j = (c, r) if conv1d else (r, c)
    w = bw.double() / bw.double().sum()
    low = ((psi.double()[:, out_i] * a.double()[:, in_j]) * w[:, None]).sum(0)
    return (weight.detach().reshape(-1)[idx].double().abs() * low).float().cpu()


def _check_method(method: str, select: str, seed: int, scope: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    if select not in SELECTS:
        raise ValueError(f"select must be 'lowest' or 'highest', got {select!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if scope not in ("matrix", "global"):
        raise ValueError(f"scope must be 'matrix' or 'global', got {scope!r}")


def _resolve_targets(model: nn.Module, stats: ProbeStats | None, targets: Any, method: str
                     ) -> list[str]:
    """Module names to mask: `targets` when given (each in stats for the probe-based rules),
    else the probed layers."""
    if stats is not None and not isinstance(stats, ProbeStats):
        raise TypeError(f"stats must be a ProbeStats (from dowser.probe), got {type(stats).__name__}")
    if stats is None and method in ("dowser", "wanda"):
        raise ValueError(f"method={method!r} needs probe statistics: pass stats=dowser.probe(...)")
    if targets is None:
        if stats is None:
            raise ValueError(f"method={method!r} without stats needs targets= (module names)")
        names = list(stats)
    else:
        if isinstance(targets, str) or not all(isinstance(t, str) for t in targets):
            raise ValueError("targets must be a sequence of module names (strings)")
        names = list(dict.fromkeys(targets))
        if not names:
            raise ValueError("targets is empty")
        if stats is not None and method in ("dowser", "wanda"):
            missing = [n for n in names if n not in stats]
            if missing:
                raise ValueError(f"targets names {missing[0]!r}, which the statistics lack")
    modules = dict(model.named_modules())
    for name in names:
        mod = modules.get(name)
        if mod is None or weight_of(mod) is None:
            where = "stats has layer" if targets is None else "targets names"
            raise ValueError(f"{where} {name!r}, which this {type(model).__name__} lacks "
                             "(or which is not a linear layer)")
    return names


def _rule_factors(method: str, entry: ProbeEntry | None, d_out: int, d_in: int,
                  dev: torch.device, mname: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Psi (B, d_out), A (B, d_in), batch weights (B,)) of a factor rule, fp32 on `dev`."""
    if method == "dowser":
        if (entry.out_factors.shape[1], entry.in_factors.shape[1]) != (d_out, d_in):
            raise ValueError(f"stats for {mname!r} are {entry.out_factors.shape[1]}x"
                             f"{entry.in_factors.shape[1]} but the layer is {d_out}x{d_in}")
        return (entry.out_factors.to(dev, torch.float32), entry.in_factors.to(dev, torch.float32),
                entry.batch_weights.to(dev, torch.float32))
    ones = torch.ones(1, dtype=torch.float32, device=dev)
    psi = torch.ones(1, d_out, dtype=torch.float32, device=dev)
    if method == "magnitude":
        return psi, torch.ones(1, d_in, dtype=torch.float32, device=dev), ones
    if entry.in_sq is None:
        raise ValueError(f"stats for {mname!r} hold no input norms (made by an older dowser): "
                         "probe again for method='wanda'")
    if entry.in_sq.shape[-1] != d_in:
        raise ValueError(f"stats for {mname!r} have {entry.in_sq.shape[-1]} input norms but "
                         f"the layer has d_in={d_in}")
    return psi, entry.input_norms().to(dev, torch.float32)[None], ones


def mask_metadata(stats: Any, model: Any) -> dict[str, Any]:
    """What every mask file records of how it was made: the probe's metadata (its seed as
    probe_seed) and the model's identity."""
    meta: dict[str, Any] = {}
    if stats is not None:
        meta = {k: v for k, v in stats.metadata.items() if k != "roles"}
        if "seed" in meta:
            meta["probe_seed"] = meta.pop("seed")
    meta.update(model_identity(model))
    return meta


def build_masks(model: nn.Module, stats: ProbeStats | None = None, rho: float = 0.1, *,
                scope: str = "matrix", method: str = "dowser", select: str = "lowest",
                seed: int = 0, targets: Sequence[str] | None = None) -> MaskSet:
    """Masks for every targeted layer: the rho fraction of entries with the lowest (or highest)
    score is trainable (bit 1), the rest frozen.

    Args:
        model: the model whose linear layers are masked (weights of any float dtype).
        stats: `dowser.probe(...)` statistics; needed by "dowser" and "wanda", optional for
            "magnitude" and "random" (which then need only `targets`).
        rho: trainable fraction in [0, 1].
        scope: "matrix": exactly k = floor(rho * n + 0.5) entries of every matrix; "global":
            all targeted matrices ranked together (k over their total), ties by target order.
        method: the score of entry (i, j) of z = W h:
            "dowser"    |W_ij| * (Psi^T diag(w) A)_ij / sum(w) (the probe's low-rank factors);
            "magnitude" |W_ij| (the same op with rank-1 factors of ones);
            "wanda"     |W_ij| * ||X_j||_2, ||X_j||_2^2 the mean of h_j^2 over the probe's
                        tokens (`ProbeEntry.input_norms()`; rank-1 factors ones and norms);
            "random"    a 32-bit counter-based hash of (seed, parameter name, flat index):
                        exactly k uniformly random entries, rebuilt from (seed, name) alone.
        select: "lowest" (the paper's rule: train the least important) or "highest" (the
            top-k, for ablations). Both take ties by the lower row-major flat index: "highest"
            selects the k lowest of the NEGATED scores (the row factor is negated, which negates
            every fp32 product and sum exactly, so the order of distinct scores reverses and
            equal scores stay equal), or of 2^32 - 1 - key for "random", through the same
            bottom-k selection and its tie rule.
        seed: the random rule's seed (recorded in the metadata for every method).
        targets: module names to mask (default: every layer in `stats`).

    Keys are parameter names (as in model.named_parameters()); masks lie on each weight's
    device. The metadata records method, select, seed, rho, scope, the probe's settings (its
    seed as probe_seed) and the model's identity.

    Under torch.distributed (a process group with more than one rank; every rank calls this
    with the same stats) the work is shared and every rank gets the same full masks, equal bit
    for bit to a single process's: replicated weights at per-matrix scope are spread over the
    ranks and the packed masks broadcast; weights sharded on dim 0 (FSDP2) and the global scope
    select over each rank's rows with one histogram all-reduce per radix pass. "random" needs
    no communication: every rank computes the same keys.
    """
    from dowser import __version__
    from dowser import _keys
    from dowser import distributed as dd
    from dowser import ops

    rho = check_rho(rho)
    _check_method(method, select, seed, scope)
    names_m = _resolve_targets(model, stats, targets, method)
    modules = dict(model.named_modules())
    pnames = _param_names(model)
    highest = select == "highest"
    layers, names, shapes, samples, devices = [], [], {}, {}, []
    gen = torch.Generator().manual_seed(0)
    for mname in names_m:
        mod = modules[mname]
        d_out, d_in = layer_dims(mod)
        weight = mod.weight
        pname = pnames[id(weight)]
        if pname in shapes:
            raise ValueError(f"parameter {pname!r} is targeted twice (tied weights?)")
        names.append(pname)
        shapes[pname] = tuple(weight.shape)
        dev = dd.local_tensor(weight).device
        devices.append(dev)
        if method == "random":
            rows, cols = weight.shape
            base = _keys.stream_base(seed, pname)
            samples[pname] = (_keys.hash_keys_at(base, _sample_index(rows, cols, gen))
                              .double() / 2.0 ** 32).float()
            continue
        entry = stats[mname] if stats is not None and mname in stats else None
        psi, a, bw = _rule_factors(method, entry, d_out, d_in, dev, mname)
        conv1d = is_conv1d(mod)
        samples[pname] = _sample_scores(weight, psi, a, bw, conv1d, gen)
        if highest:
            psi = -psi  # exact: every score changes sign, nothing else (see docstring)
        # The mask is laid out over the weight as stored: Conv1D stores W^T, whose rows are the
        # layer's inputs, so its "out" factor is A and its "in" factor is Psi.
        rows_f, cols_f = (a, psi) if conv1d else (psi, a)
        layers.append((weight.detach(), rows_f, cols_f, bw))
    numels = [math.prod(shapes[n]) for n in names]
    if method == "random":
        srcs = [_keys.random_key_chunks(seed, n, numel, dev, highest)
                for n, numel, dev in zip(names, numels, devices)]
        if scope == "global":
            packed, _ = _keys.select_lowest(srcs, numels, ops._k_for(rho, sum(numels)))
            packed = [p.to(d) for p, d in zip(packed, devices)]
        else:
            packed = [_keys.select_lowest([s], [numel], ops._k_for(rho, numel), dev)[0][0]
                      for s, numel, dev in zip(srcs, numels, devices)]
    elif dd.is_active():
        packed = dd.build_masks(layers, [shapes[n] for n in names], rho, scope)
    elif scope == "global":
        packed = ops.build_masks_global(layers, rho)
    else:
        packed = [ops.build_mask(w, o, i, rho, batch_weights=bw) for (w, o, i, bw) in layers]
    meta = mask_metadata(stats, model)
    meta.update({"method": method, "select": select, "seed": seed, "rho": rho, "scope": scope,
                 "dowser_version": __version__, "modules": dict(zip(names, names_m))})
    return MaskSet(dict(zip(names, packed)), shapes, meta, samples)


# Dowser-LoRA, the authors' LoRA variant: the same scoring rules, selected per row of lora_B and
# per column of lora_A of a PEFT LoRA adapter (dowser/lora_masks.py). Imported last: it builds
# on _rule_factors and _check_method above (imported inside its function: no import cycle).
from dowser.lora_masks import build_lora_masks  # noqa: E402

__all__ += ["build_lora_masks"]
