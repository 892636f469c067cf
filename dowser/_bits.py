"""Runtime helpers on score keys and packed masks, shared by the ops, the optimizers and the
distributed code (the reference oracles use them too; they are definitions, not oracles)."""

from __future__ import annotations

import torch

_POPCOUNT8 = torch.tensor([bin(b).count("1") for b in range(256)], dtype=torch.int32)


def score_factors(out_factors: torch.Tensor, in_factors: torch.Tensor,
                  batch_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row factors (B, d_out) = Psi * w / sum(w), column factors (B, d_in)), both fp32."""
    w = batch_weights.to(torch.float32)
    wn = w / w.sum()
    return out_factors.to(torch.float32) * wn[:, None], in_factors.to(torch.float32)


def score_keys(s: torch.Tensor) -> torch.Tensor:
    """Order-preserving unsigned 32-bit keys (as int64) of fp32 scores; -0.0 maps like +0.0."""
    s = s.reshape(-1).to(torch.float32)
    s = torch.where(s == 0, torch.zeros_like(s), s).contiguous()
    bits = s.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return torch.where(bits >= 2**31, bits ^ 0xFFFFFFFF, bits | 2**31)


def key_to_float(key: int) -> float:
    """Inverse of `score_keys` for one key (-1 -> -inf: nothing selected)."""
    if key < 0:
        return float("-inf")
    bits = (key & 0x7FFFFFFF) if key >= 2**31 else (key ^ 0xFFFFFFFF)
    return float(torch.tensor([bits], dtype=torch.int64).to(torch.int32).view(torch.float32))


def word_offsets(packed: torch.Tensor) -> torch.Tensor:
    """Exclusive prefix sum of the per-word popcounts of a packed mask (int32, one per word):
    the compact-state index of the first trainable entry of each word."""
    table = _POPCOUNT8.to(packed.device)
    words = packed.contiguous()
    out = torch.empty(words.numel(), dtype=torch.int32, device=packed.device)
    carry = 0
    for start in range(0, words.numel(), 1 << 14):  # bounded temporaries (~1 MB) for huge masks
        chunk = words[start:start + (1 << 14)]
        counts = table[chunk.view(torch.uint8).to(torch.int64)].view(-1, 4).sum(dim=1, dtype=torch.int64)
        incl = torch.cumsum(counts, 0) + carry
        out[start:start + chunk.numel()] = (incl - counts).to(torch.int32)
        carry = int(incl[-1])
    return out


def count_trainable(packed: torch.Tensor, offsets: torch.Tensor | None = None) -> int:
    """Number of set bits of a packed mask (from its word offsets when given)."""
    if packed.numel() == 0:
        return 0
    if offsets is None:
        offsets = word_offsets(packed)
    last = int(packed[-1].item()) & 0xFFFFFFFF
    return int(offsets[-1].item()) + bin(last).count("1")


def popcount(packed: torch.Tensor) -> int:
    """Number of set bits (trainable entries) of a packed mask."""
    table = _POPCOUNT8.to(packed.device)
    as_bytes = packed.contiguous().view(torch.uint8)
    total = 0
    for chunk in as_bytes.split(1 << 22):  # bounded temporaries for huge masks
        total += int(table[chunk.to(torch.int64)].sum())
    return total
