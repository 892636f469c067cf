"""pytest-benchmark entry for mask building: `pytest bench/ --benchmark-only`."""

import pytest
import torch

from dowser import _registry


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_select_mask_1024x2816(benchmark, backend):
    fns = _registry.implementations("select_mask", "cpu")
    if backend not in fns:
        pytest.skip(f"{backend} unavailable")
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(1024, 2816, generator=gen)
    psi, a, bw = torch.rand(16, 1024, generator=gen), torch.rand(16, 2816, generator=gen), torch.ones(16)
    k = int(0.1 * w.numel() + 0.5)
    benchmark(fns[backend], w, psi, a, bw, k)
