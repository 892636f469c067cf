"""dowser::unpack_mask: int32 words -> a flat bool mask of `numel` entries."""

from __future__ import annotations

import torch

from dowser import reference
from dowser._registry import define
from dowser.selfcheck import add_case


def _fake(packed: torch.Tensor, numel: int) -> torch.Tensor:
    return packed.new_empty((numel,), dtype=torch.bool)


op = define("unpack_mask", "(Tensor packed, SymInt numel) -> Tensor", reference.unpack_mask, _fake)

add_case("unpack_mask", lambda gen: (reference.pack_mask(torch.rand(1000, generator=gen) < 0.5), 1000))
