"""Run every op on every usable backend against the plain-PyTorch reference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from dowser import _registry


@dataclass
class Case:
    make_inputs: Callable[[torch.Generator], tuple]
    same: Callable[[object, object], bool] = lambda a, b: torch.equal(a, b)  # noqa: E731


CASES: dict[str, Case] = {}


def add_case(op: str, make_inputs: Callable[[torch.Generator], tuple],
             same: Callable[[object, object], bool] | None = None) -> None:
    """Register the inputs the self-check feeds `op` (op modules call this)."""
    CASES[op] = Case(make_inputs, same) if same else Case(make_inputs)


def selfcheck(device: str = "cpu", seed: int = 0) -> list[dict[str, str]]:
    """Compare each usable backend of each op with the reference; returns one row per pair.

    Raises AssertionError naming the op and backend on the first mismatch.
    """
    rows = []
    for op, case in sorted(CASES.items()):
        gen = torch.Generator().manual_seed(seed)
        args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in case.make_inputs(gen))
        impls = _registry.implementations(op, device)
        expected = impls["reference"](*args)
        for backend, fn in sorted(impls.items()):
            got = fn(*args)
            if not case.same(got, expected):
                raise AssertionError(f"selfcheck: {op} on {backend}/{device} differs from the reference")
            rows.append({"op": op, "device": device, "backend": backend, "result": "ok"})
    return rows
