"""dowser::select_mask: the exact bottom-k selection of one matrix (DESIGN.md §2: the k lowest
scores, ties by lower flat index) as a packed int32 mask, and int64 stats [threshold key,
count strictly below, ties taken] (key -1 when k = 0)."""

from __future__ import annotations

import torch

from dowser import reference
from dowser._checks import words_for
from dowser._ops._inputs import exact_layer
from dowser._registry import define
from dowser.selfcheck import add_case


def _fake(weight, out_factors, in_factors, batch_weights, k):
    return (weight.new_empty((words_for(weight.numel()),), dtype=torch.int32),
            weight.new_empty((3,), dtype=torch.int64))


op = define("select_mask", "(Tensor weight, Tensor out_factors, Tensor in_factors, "
            "Tensor batch_weights, SymInt k) -> (Tensor, Tensor)", reference.select_mask, _fake)


def same_selection(a, b) -> bool:
    (ma, sa), (mb, sb) = a, b
    ma = ma if isinstance(ma, list) else [ma]
    mb = mb if isinstance(mb, list) else [mb]
    return torch.equal(sa.cpu(), sb.cpu()) and len(ma) == len(mb) and all(
        torch.equal(x.cpu(), y.cpu()) for x, y in zip(ma, mb))


add_case("select_mask", lambda gen: (*exact_layer(gen), 1000), same_selection)
