"""Runtime helpers on score keys and packed masks, shared by the ops, the optimizers and the
distributed code (the reference oracles use them too; they are definitions, not oracles)."""

from __future__ import annotations

import torch

_CHUNK = 1 << 14  # words per chunk: each int64 temporary ~128 KB (the step's peak RSS stays <= 1.1 B/param)


def _word_popcounts(words: torch.Tensor) -> torch.Tensor:
    """Set bits per int32 word (int64), by SWAR arithmetic: no lookup table, so nothing is
    copied from the host to the mask's device."""
    x = words.to(torch.int64).bitwise_and_(0xFFFFFFFF)  # in place below: 4 temporaries in all
    x.sub_((x >> 1).bitwise_and_(0x55555555))
    x = (x & 0x33333333).add_(x.bitwise_right_shift_(2).bitwise_and_(0x33333333))
    x.add_(x >> 4).bitwise_and_(0x0F0F0F0F)
    return x.mul_(0x01010101).bitwise_and_(0xFFFFFFFF).bitwise_right_shift_(24)


def score_factors(out_factors: torch.Tensor, in_factors: torch.Tensor,
                  batch_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row factors (B, d_out) = Psi * w / sum(w), column factors (B, d_in)), both fp32."""
    w = batch_weights.to(torch.float32)
    wn = w / w.sum()
    return out_factors.to(torch.float32) * wn.unsqueeze(1), in_factors.to(torch.float32)


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
    the compact-state index of the first trainable entry of each word. The running sum stays
    on the mask's device (no host synchronisation)."""
    words = packed.contiguous()
    out = torch.empty(words.numel(), dtype=torch.int32, device=packed.device)
    carry = torch.zeros((), dtype=torch.int64, device=packed.device)
    for start in range(0, words.numel(), _CHUNK):  # bounded temporaries for huge masks
        counts = _word_popcounts(words[start:start + _CHUNK])
        incl = torch.cumsum(counts, 0).add_(carry)
        carry = incl[-1].clone()
        out[start:start + counts.numel()] = incl.sub_(counts)
    return out


def count_trainable(packed: torch.Tensor, offsets: torch.Tensor | None = None) -> int:
    """Number of set bits of a packed mask (from its word offsets when given)."""
    if packed.numel() == 0:
        return 0
    if offsets is None:
        offsets = word_offsets(packed)
    return int(offsets[-1:].to(torch.int64) + _word_popcounts(packed[-1:]))  # one host read


def popcount(packed: torch.Tensor) -> int:
    """Number of set bits (trainable entries) of a packed mask (one host read)."""
    words = packed.contiguous().view(-1)
    total = torch.zeros((), dtype=torch.int64, device=packed.device)
    for start in range(0, words.numel(), _CHUNK):  # bounded temporaries for huge masks
        total += _word_popcounts(words[start:start + _CHUNK]).sum()
    return int(total)
