"""Every random draw of probe batch b derives from (seed, b) alone: prompts, Rademacher
vectors and noise pixels are the same whatever the device, the batch order or the rank."""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, batch: int, stream: str) -> int:
    """A 63-bit seed for one random stream of one batch, independent of every other batch."""
    digest = hashlib.sha256(f"dowser:{int(seed)}:{int(batch)}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def rademacher(seed: int, batch: int, n_draws: int, n_rows: int, vocab: int) -> torch.Tensor:
    """The Rademacher vectors xi of probe batch `batch`: (n_draws, n_rows, vocab) of +-1 (fp32,
    CPU), drawn from (seed, batch) alone."""
    return torch.stack([rademacher_one(seed, batch, r, n_rows, vocab) for r in range(n_draws)])


def rademacher_one(seed: int, batch: int, draw: int, n_rows: int, vocab: int) -> torch.Tensor:
    # One generator per draw, so a draw is made only when its backward runs (no R x vocab
    # buffer) and R can grow without changing the earlier draws.
    gen = torch.Generator().manual_seed(derive_seed(seed, batch, f"xi{draw}"))
    bits = torch.randint(0, 2, (n_rows, vocab), generator=gen, dtype=torch.int8)
    return bits.float() * 2 - 1
