"""dowser::masked_adamw_step: one AdamW step of a parameter group on bit-packed masks.

Per tensor: a packed mask (None = every entry trains) and, for compact state, the mask's
per-word popcount prefix sums. Returns the per-tensor count of NaN/Inf gradients in trainable
entries; when any is non-zero the op wrote nothing (dowser.optim raises ValueError naming the
parameter). With skip_nonfinite=True the step is one pass instead: entries whose gradient is
NaN/Inf keep their param and state bits, every other trainable entry is updated, and the
counts say how many were skipped.

masters, has_master (optional): the fp32 master copies of bf16/fp16 parameters that exist, in
parameter order, and one flag per parameter saying whether it has the next one (has_master
None: every parameter has one, or none does; dowser._checks.master_args builds both from one
entry per parameter). A master is laid out exactly like the tensor's optimizer state (compact:
k entries in mask order; dense: numel entries). The step reads the parameter value from the
master, computes in fp32, writes the new value to the master and, rounded to the parameter
dtype (nearest even), to the parameter.
"""

from __future__ import annotations

import torch

from dowser import reference
from dowser._checks import master_args
from dowser._ops._inputs import optim_group
from dowser._registry import define
from dowser.selfcheck import add_case

# Why `Tensor(d!)[]? masters` plus `bool[]? has_master`, and not one `Tensor(d!)?[]?` list
# with None holes (the schema until issue 30) -- a torch bug, upstream-style:
#
#   Title: a custom op with a mutable `Tensor(a!)?[]` argument holding None cannot be
#     functionalized (opcheck test_aot_dispatch_dynamic, torch.compile)
#   Repro: lib.define("f(Tensor(a!)?[] xs) -> Tensor") with a CompositeExplicitAutograd kernel
#     and a fake kernel; torch.library.opcheck(torch.ops.ns.f, ([torch.zeros(2), None],)).
#   auto_functionalized_v2 (the default): torch/_higher_order_ops/auto_functionalize.py,
#     _do_auto_functionalize_v2_for_generic_mutable_operator sets
#     `arg_to_base_index[arg_name] = {}` for a list and then calls
#     `arg_to_base_index[arg_name].append(None)` for a None element ->
#     AttributeError: 'dict' object has no attribute 'append'. Changing that one line to
#     `arg_to_base_index[arg_name][i] = None` makes the repro pass opcheck and compile
#     (checked on 2.13 by patching the function at runtime).
#   auto_functionalized v1 (torch.compile with inductor.config.enable_auto_functionalized_v2
#     = False): auto_functionalized_dense clones every element
#     (clone_preserve_strides(None)) -> AttributeError: 'NoneType' object has no attribute
#     'size'.
#   Versions: both run and reproduced with torch 2.13.0+cpu only (the one torch that installs
#     on this CPU machine; no GPU machine was lent to check 2.11). The v2 lines are the same
#     in the upstream sources read (the first v2 spelling, `all_basis`, and `all_bases`).
# Here no mutable list ever holds None, so both paths functionalize the step: `masters` holds
# only the masters that exist and `has_master` maps them to parameters. The C++ and CUDA entry
# points keep taking one entry per parameter (an empty tensor = none), expanded by
# dowser._checks.masters_per_param in each backend and in the reference.
SCHEMA = ("(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
          "Tensor(c!)[] exp_avg_sqs, Tensor?[] masks, Tensor?[] offsets, float[] steps, "
          "float lr, float beta1, float beta2, float eps, float weight_decay, "
          "bool maximize, bool skip_nonfinite=False, Tensor(d!)[]? masters=None, "
          "bool[]? has_master=None) -> Tensor")


def fake_counts(params, *args, **kwargs) -> torch.Tensor:
    device = params[0].device if len(params) else torch.device("cpu")
    return torch.empty((len(params),), dtype=torch.int64, device=device)


op = define("masked_adamw_step", SCHEMA, reference.masked_adamw_, fake_counts)


def _inputs(gen: torch.Generator) -> tuple:
    g = optim_group(gen)
    return (g["params"], g["grads"], g["state1"], g["state2"], g["masks"], g["offsets"],
            [3.0, 3.0, 1.0], 1e-2, 0.9, 0.999, 1e-8, 0.1, False, False,
            *master_args(g["masters"]))


def _outputs(args, counts) -> list:
    return [counts, *args[0], *args[2], *args[3], *args[14]]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(a, b))


add_case("masked_adamw_step", _inputs, _same, _outputs)
