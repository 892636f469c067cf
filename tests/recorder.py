"""Record the torch.ops.dowser.* calls that public-API code makes (tests: opcheck, compile).

    with record_dowser_calls() as calls:
        opt.step()
    for call in calls:
        torch.library.opcheck(call.op, *call.fresh())

Each call keeps its arguments as they were before the op ran (tensors cloned), so an in-place
step can be replayed from the same state as often as a check needs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map


def _clone(x):
    return x.detach().clone() if isinstance(x, torch.Tensor) else x


@dataclass
class Call:
    op: torch._ops.OpOverload
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return self.op._schema.name.split("::")[1]

    def fresh(self) -> tuple[tuple, dict]:
        """A new copy of the recorded (args, kwargs)."""
        return tree_map(_clone, (self.args, self.kwargs))

    def signature(self) -> tuple:
        """What tells one call's structure from another's: op, and per argument its
        dtype/shape/contiguity (tensors), None-ness, list lengths and scalar values."""
        def sig(x):
            if isinstance(x, torch.Tensor):
                return ("T", x.dtype, tuple(x.shape), x.is_contiguous())
            if isinstance(x, (list, tuple)):
                return tuple(sig(v) for v in x)
            return x
        return (str(self.op), sig(self.args), tuple(sorted((k, sig(v)) for k, v in
                                                        self.kwargs.items())))


class _Recorder(TorchDispatchMode):
    def __init__(self, calls: list[Call]) -> None:
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "dowser":  # before the call: in-place ops change their inputs
            self.calls.append(Call(func, *tree_map(_clone, (tuple(args), dict(kwargs)))))
        return func(*args, **kwargs)


@contextlib.contextmanager
def record_dowser_calls() -> Iterator[list[Call]]:
    """Collect every torch.ops.dowser.* call made inside the block. (Ops that a kernel calls
    from inside another op are not seen: the mode is off while a kernel runs.)"""
    calls: list[Call] = []
    with _Recorder(calls):
        yield calls


def distinct(calls: list[Call]) -> list[Call]:
    """The first call of each distinct signature (a replay of equal structure adds nothing)."""
    seen, out = set(), []
    for c in calls:
        key = c.signature()
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out
