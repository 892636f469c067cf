"""What probing produces: per layer, the low-rank factors of its scores (ProbeEntry), and the
mapping of all of them with their metadata and safetensors file (ProbeStats)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dowser import _artifacts
from dowser.probe.targets import layer_dims, weight_of

KIND = "dowser.ProbeStats"


@dataclass
class ProbeEntry:
    """Low-rank factors of one layer's scores: S = |W| * (w Psi)^T A / sum(w), all fp32.

    out_factors: Psi, (B, d_out); in_factors: A, (B, d_in) — per batch, the token mean of
    |dL/dz| and of |h|; batch_weights: w, (B,). in_sq: (B, d_in) per-batch token means of h^2
    (for the wanda rule, gathered in the same forward; None in files from older versions).
    d_out/d_in are those of z = W h, whatever the storage of W (GPT-2's Conv1D stores W^T).
    """

    out_factors: torch.Tensor
    in_factors: torch.Tensor
    batch_weights: torch.Tensor
    in_sq: torch.Tensor | None = None

    def scores(self, weight: torch.Tensor) -> torch.Tensor:
        """Dense d_out x d_in scores in fp64 for small layers (tests, inspection); never used
        by masks."""
        w = self.batch_weights.double()
        low = (self.out_factors.double() * w[:, None]).T @ self.in_factors.double() / w.sum()
        return weight.detach().double().abs() * low

    def input_norms(self) -> torch.Tensor:
        """‖X_j‖₂ per input feature (d_in,), fp32: sqrt of the batch-weighted mean of the
        per-batch token means of h_j² (wanda's activation norm over every probe token)."""
        if self.in_sq is None:
            raise ValueError("these statistics hold no input norms (made by an older dowser): "
                             "probe again for method='wanda'")
        w = self.batch_weights.double()
        return ((self.in_sq.double() * w[:, None]).sum(0) / w.sum()).sqrt().float()


class ProbeStats(Mapping):
    """Mapping module name (as in model.named_modules()) -> ProbeEntry, plus `.metadata`."""

    def __init__(self, entries: dict[str, ProbeEntry], metadata: dict[str, Any] | None = None):
        self._entries = dict(entries)
        self.metadata: dict[str, Any] = dict(metadata or {})

    def __getitem__(self, name: str) -> ProbeEntry:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"ProbeStats({len(self)} layers, {self.metadata})"

    def save(self, path: str | os.PathLike) -> None:
        """Write the factors and metadata to a safetensors file (no pickle)."""
        tensors = {}
        for name, e in self._entries.items():
            tensors[f"{name}.out_factors"] = e.out_factors.detach().float().cpu().contiguous()
            tensors[f"{name}.in_factors"] = e.in_factors.detach().float().cpu().contiguous()
            # clone: entries may share one batch-weights tensor, which safetensors refuses
            tensors[f"{name}.batch_weights"] = e.batch_weights.detach().float().cpu().clone()
            if e.in_sq is not None:
                tensors[f"{name}.in_sq"] = e.in_sq.detach().float().cpu().contiguous()
        _artifacts.save(path, tensors, KIND, {**self.metadata, "layers": list(self._entries)})

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None) -> "ProbeStats":
        """Read a file written by `save`; with `model`, refuse statistics made for another model
        (the message names the first layer whose name or shape does not fit)."""
        meta, t = _artifacts.load(path, KIND)
        layers = meta.pop("layers")
        entries = {n: ProbeEntry(t[f"{n}.out_factors"], t[f"{n}.in_factors"],
                                 t[f"{n}.batch_weights"], t.get(f"{n}.in_sq"))
                   for n in layers}
        if model is not None:
            modules = dict(model.named_modules())
            for name, e in entries.items():
                mod = modules.get(name)
                if mod is None or weight_of(mod) is None:
                    raise ValueError(f"statistics file {path} does not fit this model: it has no "
                                     f"linear layer named {name!r}")
                d_out, d_in = layer_dims(mod)
                if (d_out, d_in) != (e.out_factors.shape[1], e.in_factors.shape[1]):
                    raise ValueError(
                        f"statistics file {path} does not fit this model: layer {name!r} is "
                        f"{d_out}x{d_in} here but {e.out_factors.shape[1]}x"
                        f"{e.in_factors.shape[1]} in the file")
        return cls(entries, meta)
