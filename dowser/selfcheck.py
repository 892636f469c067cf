"""Run every op on every usable backend against the plain-PyTorch reference (`dowser selfcheck`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from dowser import _registry


@dataclass
class Case:
    make_inputs: Callable[[torch.Generator], tuple]
    same: Callable[[object, object], bool] = lambda a, b: torch.equal(a, b)  # noqa: E731
    # For in-place ops: what to compare, from (args after the call, return value).
    outputs: Callable[[tuple, object], object] | None = None


CASES: dict[str, Case] = {}


def add_case(op: str, make_inputs: Callable[[torch.Generator], tuple],
             same: Callable[[object, object], bool] | None = None,
             outputs: Callable[[tuple, object], object] | None = None) -> None:
    """Register the inputs the self-check feeds `op` (each _ops/<op>.py calls this)."""
    case = Case(make_inputs, same) if same else Case(make_inputs)
    case.outputs = outputs
    CASES[op] = case


def _to(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, list):
        return [_to(v, device) for v in x]
    return x


def inputs(op: str, device: str = "cpu", seed: int = 0) -> tuple:
    """Fresh self-check inputs of `op` on `device` (the same for the same seed)."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(_to(a, device) for a in CASES[op].make_inputs(gen))


def selfcheck(device: str = "cpu", seed: int = 0) -> list[dict[str, str]]:
    """Compare each usable backend of each declared op with the reference; one row per pair.

    Raises AssertionError naming the op and backend on the first mismatch, and when a
    declared op has no self-check case.
    """
    missing = sorted(set(_registry.OPS) - set(CASES))
    if missing:
        raise AssertionError(f"selfcheck: no case for {', '.join(missing)}")
    rows = []
    for op, case in sorted(CASES.items()):
        impls = _registry.implementations(op, device)

        def run(fn):
            args = inputs(op, device, seed)  # fresh: in-place ops modify their inputs
            ret = fn(*args)
            return case.outputs(args, ret) if case.outputs else ret

        expected = run(impls["reference"])
        for backend, fn in sorted(impls.items()):
            if not case.same(run(fn), expected):
                raise AssertionError(f"selfcheck: {op} on {backend}/{device} differs from the reference")
            rows.append({"op": op, "device": device, "backend": backend, "result": "ok"})
    return rows
