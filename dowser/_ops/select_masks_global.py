"""dowser::select_masks_global: one bottom-k selection over many matrices (ties by layer
order, then flat index): one packed mask per matrix and the stats of dowser::select_mask."""

from __future__ import annotations

import torch

from dowser import reference
from dowser._checks import words_for
from dowser._ops._inputs import exact_layer
from dowser._ops.select_mask import same_selection
from dowser._registry import define
from dowser.selfcheck import add_case


def _fake(weights, out_factors, in_factors, batch_weights, k):
    device = weights[0].device if len(weights) else torch.device("cpu")
    return ([w.new_empty((words_for(w.numel()),), dtype=torch.int32) for w in weights],
            torch.empty((3,), dtype=torch.int64, device=device))


op = define("select_masks_global", "(Tensor[] weights, Tensor[] out_factors, Tensor[] in_factors, "
            "Tensor[] batch_weights, SymInt k) -> (Tensor[], Tensor)",
            reference.select_masks_global, _fake)


def _inputs(gen: torch.Generator) -> tuple:
    w, psi, a, bw = exact_layer(gen)
    w2, psi2, a2, bw2 = exact_layer(gen)
    return [w, w2[:, :50].t()], [psi, a2[:, :50]], [a, psi2], [bw, bw2], 2000


add_case("select_masks_global", _inputs, same_selection)
