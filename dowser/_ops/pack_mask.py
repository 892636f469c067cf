"""dowser::pack_mask: bool (any shape) -> int32 words, flat index i in word i // 32, bit i % 32."""

from __future__ import annotations

import torch

from dowser import reference
from dowser._checks import words_for
from dowser._registry import define
from dowser.selfcheck import add_case


def _fake(mask: torch.Tensor) -> torch.Tensor:
    return mask.new_empty((words_for(mask.numel()),), dtype=torch.int32)


op = define("pack_mask", "(Tensor mask) -> Tensor", reference.pack_mask, _fake)

add_case("pack_mask", lambda gen: (torch.rand(37, 101, generator=gen) < 0.3,))
