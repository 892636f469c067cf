"""dowser::masked_adamw_step: one AdamW step of a parameter group on bit-packed masks.

Per tensor: a packed mask (None = every entry trains) and, for compact state, the mask's
per-word popcount prefix sums. Returns the per-tensor count of NaN/Inf gradients in trainable
entries; when any is non-zero the op wrote nothing (dowser.optim raises ValueError naming the
parameter). With skip_nonfinite=True the step is one pass instead: entries whose gradient is
NaN/Inf keep their param and state bits, every other trainable entry is updated, and the
counts say how many were skipped.

masters (optional; None entries = none): fp32 master copies of bf16/fp16 parameters, laid out
exactly like the tensor's optimizer state (compact: k entries in mask order; dense: numel
entries). The step reads the parameter value from the master, computes in fp32, writes the new
value to the master and, rounded to the parameter dtype (nearest even), to the parameter.
"""

from __future__ import annotations

import torch

from dowser import reference
from dowser._ops._inputs import optim_group
from dowser._registry import define
from dowser.selfcheck import add_case

SCHEMA = ("(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
          "Tensor(c!)[] exp_avg_sqs, Tensor?[] masks, Tensor?[] offsets, float[] steps, "
          "float lr, float beta1, float beta2, float eps, float weight_decay, "
          "bool maximize, bool skip_nonfinite=False, Tensor(d!)?[]? masters=None) -> Tensor")


def fake_counts(params, *args, **kwargs) -> torch.Tensor:
    device = params[0].device if len(params) else torch.device("cpu")
    return torch.empty((len(params),), dtype=torch.int64, device=device)


op = define("masked_adamw_step", SCHEMA, reference.masked_adamw_, fake_counts)


def _inputs(gen: torch.Generator) -> tuple:
    g = optim_group(gen)
    return (g["params"], g["grads"], g["state1"], g["state2"], g["masks"], g["offsets"],
            [3.0, 3.0, 1.0], 1e-2, 0.9, 0.999, 1e-8, 0.1, False)


def _outputs(args, counts) -> list:
    return [counts, *args[0], *args[2], *args[3]]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(a, b))


add_case("masked_adamw_step", _inputs, _same, _outputs)
