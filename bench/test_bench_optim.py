"""pytest-benchmark entry: `pytest bench/ --benchmark-only` (the full table: bench_optim.py).

One 4096 x 2752 fp32 parameter (11M entries, the 45M set's matrix cut to a quarter), the
same parameter and gradient for every row: torch's fused AdamW next to MaskedAdamW at
rho = 0.1 (compact state) in both NaN/Inf modes.
"""

import pytest
import torch

import dowser
from dowser.ops import pack_mask


@pytest.fixture(scope="module")
def param():
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4096, 2752, generator=gen))
    p.grad = torch.randn(4096, 2752, generator=gen)
    return p


@pytest.mark.parametrize("config", ["torch fused", "dowser check", "dowser skip"])
def test_adamw_step_11m(benchmark, param, config):
    if config == "torch fused":
        opt = torch.optim.AdamW([param], lr=1e-4, fused=True)
    else:
        gen = torch.Generator().manual_seed(1)
        mask = pack_mask(torch.rand(param.shape, generator=gen) < 0.1)
        opt = dowser.MaskedAdamW([param], {param: mask}, lr=1e-4, nonfinite=config.split()[1])
    opt.step()  # state allocated outside the timed steps
    benchmark(opt.step)
