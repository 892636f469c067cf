"""dowser::count_nonfinite: per tensor, the number of NaN/Inf gradient entries that are
trainable (masks[i] None: every entry is) -- the read-only pre-check of the masked steps."""

from __future__ import annotations

import torch

from dowser import reference
from dowser._registry import define
from dowser.selfcheck import add_case


def _fake(grads, masks) -> torch.Tensor:
    device = grads[0].device if len(grads) else torch.device("cpu")
    return torch.empty((len(grads),), dtype=torch.int64, device=device)


op = define("count_nonfinite", "(Tensor[] grads, Tensor?[] masks) -> Tensor",
            reference.count_nonfinite, _fake)


def _inputs(gen: torch.Generator) -> tuple:
    grads = [torch.randn(37, 45, generator=gen), torch.randn(70, generator=gen).to(torch.bfloat16),
             torch.randn(5, generator=gen).to(torch.float16)]
    grads[0].view(-1)[torch.randint(0, grads[0].numel(), (9,), generator=gen)] = float("nan")
    grads[1][torch.randint(0, 70, (3,), generator=gen)] = float("inf")
    grads[2][1] = float("-inf")
    mask = reference.pack_mask(torch.rand(37, 45, generator=gen) < 0.5)
    return grads, [mask, None, reference.pack_mask(torch.tensor([True, False, True, True, False]))]


add_case("count_nonfinite", _inputs)
