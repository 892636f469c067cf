"""One launch path for every Triton kernel of dowser.

Every wrapper launches through `launch`, which
- pins Triton's FP fusion (`enable_fp_fusion=False`: no FMA contraction, like the C++ builds'
  -ffp-contract=off), so masks do not change when Triton flips its default (3.10);
- lets the ahead-of-time compile check (dowser.kernels.aot) record what a wrapper would launch
  (kernel, grid, arguments, constexprs) without a GPU: inside `record()` nothing runs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

FP_FUSION = False  # pinned at every launch (DESIGN.md §2: rounding is pinned)


@dataclass
class Launch:
    kernel: Any
    grid: tuple
    args: tuple
    constexprs: dict
    options: dict = field(default_factory=dict)


_RECORDING: list[list[Launch]] = []


@contextlib.contextmanager
def record() -> Iterator[list[Launch]]:
    """Record launches instead of running them (the wrappers' host code still runs)."""
    launches: list[Launch] = []
    _RECORDING.append(launches)
    try:
        yield launches
    finally:
        _RECORDING.pop()


def recording() -> bool:
    return bool(_RECORDING)


def launch(kernel, grid: tuple, *args, **constexprs) -> None:
    """kernel[grid](*args, **constexprs) with FP fusion pinned (or recorded, see `record`)."""
    options = {"enable_fp_fusion": FP_FUSION}
    if _RECORDING:
        _RECORDING[-1].append(Launch(kernel, tuple(grid), args, constexprs, options))
        return
    kernel[grid](*args, **constexprs, **options)
