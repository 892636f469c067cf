"""pytest-benchmark entry: `pytest bench/ --benchmark-only`."""

import pytest
import torch

from dowser import _registry


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_pack_4096x4096(benchmark, backend):
    fns = _registry.implementations("pack_mask", "cpu")
    if backend not in fns:
        pytest.skip(f"{backend} unavailable")
    mask = torch.rand(4096, 4096) < 0.1
    benchmark(fns[backend], mask)
