"""torch.library.opcheck for every dowser op on CPU (the in-place optimizer steps included):
schema and alias annotations, fake kernels, and tracing through AOT dispatch."""

from __future__ import annotations

import importlib

import pytest
import torch

import dowser  # noqa: F401  (declares the ops)
from dowser import _registry

# The module (dowser.selfcheck the attribute is the function).
selfcheck = importlib.import_module("dowser.selfcheck")

OPS = sorted(_registry.OPS)


def test_every_declared_op_has_selfcheck_inputs():
    assert set(OPS) == set(selfcheck.CASES)
    assert {"pack_mask", "unpack_mask", "scores", "select_mask", "select_masks_global",
            "count_nonfinite", "masked_adamw_step", "masked_sgd_step"} <= set(OPS)


@pytest.mark.parametrize("op", OPS)
def test_opcheck(op):
    args = selfcheck.inputs(op, "cpu")
    torch.library.opcheck(getattr(torch.ops.dowser, op), args)


@pytest.mark.parametrize("op", OPS)
def test_every_backend_runs_under_the_op(op, monkeypatch):
    """Each usable CPU backend, forced through torch.ops.dowser, gives the reference result."""
    case = selfcheck.CASES[op]
    want = None
    for backend in _registry.implementations(op, "cpu"):
        monkeypatch.setenv("DOWSER_BACKEND", backend)
        args = selfcheck.inputs(op, "cpu")
        ret = getattr(torch.ops.dowser, op)(*args)
        got = case.outputs(args, ret) if case.outputs else ret
        if want is None:
            want = got
        assert case.same(got, want), backend
