"""Bit-packing of masks: bool -> int32 words (LSB first) and back, in Triton."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dowser.kernels._launch import launch

WORDS_PER_PROGRAM = 64


@triton.jit(do_not_specialize=["n", "n_words"])
def _pack_kernel(src_ptr, out_ptr, n, n_words, WORDS: tl.constexpr):
    pid = tl.program_id(0)
    words = pid * WORDS + tl.arange(0, WORDS)
    bits = tl.arange(0, 32)
    idx = words[:, None].to(tl.int64) * 32 + bits[None, :]
    b = tl.load(src_ptr + idx, mask=idx < n, other=0).to(tl.int32)
    # Bits are disjoint, so a sum is an OR (a custom OR-reduce is ~100x slower in the interpreter).
    packed = tl.sum(b << bits[None, :], axis=1)
    tl.store(out_ptr + words, packed, mask=words < n_words)


@triton.jit(do_not_specialize=["n", "n_words"])
def _unpack_kernel(packed_ptr, out_ptr, n, n_words, WORDS: tl.constexpr):
    pid = tl.program_id(0)
    words = pid * WORDS + tl.arange(0, WORDS)
    w = tl.load(packed_ptr + words, mask=words < n_words, other=0)
    bits = tl.arange(0, 32)
    vals = (w[:, None] >> bits[None, :]) & 1
    idx = words[:, None].to(tl.int64) * 32 + bits[None, :]
    tl.store(out_ptr + idx, vals.to(tl.int8), mask=idx < n)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    flat = mask.reshape(-1).contiguous().view(torch.uint8)
    n = flat.numel()
    n_words = (n + 31) // 32
    out = torch.empty(n_words, dtype=torch.int32, device=mask.device)
    if n_words:
        launch(_pack_kernel, (triton.cdiv(n_words, WORDS_PER_PROGRAM),), flat, out, n, n_words,
               WORDS=WORDS_PER_PROGRAM)
    return out


def unpack_mask(packed: torch.Tensor, numel: int) -> torch.Tensor:
    packed = packed.contiguous()
    out = torch.empty(numel, dtype=torch.int8, device=packed.device)
    n_words = packed.numel()
    if n_words:
        launch(_unpack_kernel, (triton.cdiv(n_words, WORDS_PER_PROGRAM),), packed, out, numel,
               n_words, WORDS=WORDS_PER_PROGRAM)
    return out.view(torch.bool)
