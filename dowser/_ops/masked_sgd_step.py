"""dowser::masked_sgd_step: one SGD step (torch.optim.SGD's math) of a parameter group on
bit-packed masks. `bufs` is empty when momentum is 0, else one fp32 momentum buffer per
tensor (compact when offsets[i] is given); first[i] = the buffer is fresh. Returns per-tensor
NaN/Inf counts; nothing is written when any is non-zero.

masters, has_master: as in dowser::masked_adamw_step (fp32 master copies laid out like the
momentum buffer; the schema note there says why they are two arguments).
"""

from __future__ import annotations

import torch

from dowser import reference
from dowser._checks import master_args
from dowser._ops._inputs import optim_group
from dowser._ops.masked_adamw_step import _same, fake_counts
from dowser._registry import define
from dowser.selfcheck import add_case

SCHEMA = ("(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] bufs, Tensor?[] masks, "
          "Tensor?[] offsets, bool[] first, float lr, float momentum, float dampening, "
          "float weight_decay, bool nesterov, bool maximize, Tensor(d!)[]? masters=None, "
          "bool[]? has_master=None) -> Tensor")

op = define("masked_sgd_step", SCHEMA, reference.masked_sgd_, fake_counts)


def _inputs(gen: torch.Generator) -> tuple:
    g = optim_group(gen)
    return (g["params"], g["grads"], g["state1"], g["masks"], g["offsets"], [False, True, False],
            1e-2, 0.9, 0.1, 0.01, True, False, *master_args(g["masters"]))


add_case("masked_sgd_step", _inputs, _same,
         lambda args, counts: [counts, *args[0], *args[2], *args[12]])
