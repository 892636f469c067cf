"""Fused score blocks: S = |W| * sum_b P[b, i] * A[b, j] computed on the fly, in fp32.

Every kernel that needs scores (the `scores` materialiser here and every pass of
kernels/select.py) calls the one `score_block` function, so they all perform the identical
sequence of fp32 operations per entry: the selection then equals the k smallest of these
kernels' own materialised scores exactly.

Blocks are runs of flat row-major indices (WORDS x 32 of them: whole mask words), not 2-D
tiles: a program then owns whole packed words (no atomics on the mask) and ranks ties in flat
order with a cumulative sum. The batch sum is an explicit fp32 loop over B (B is 1..64 in
practice, so a tile is memory-bound on W either way) rather than tl.dot: it needs no padding
of B to 16 and has the same arithmetic in the interpreter and on the GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

WORDS = 32  # mask words per program: a block of WORDS * 32 flat entries


@triton.jit
def score_block(w_ptr, s0, s1, p_ptr, a_ptr, d_out, d_in, B, f, valid):
    """Scores of flat indices `f` (int64, any shape) where `valid`; 0 elsewhere."""
    row = f // d_in
    col = f % d_in
    # Upcast before any arithmetic (the interpreter treats bf16 as raw uint16).
    w = tl.abs(tl.load(w_ptr + row * s0 + col * s1, mask=valid, other=0.0).to(tl.float32))
    acc = tl.load(p_ptr + row, mask=valid, other=0.0) * tl.load(a_ptr + col, mask=valid, other=0.0)
    for b in range(1, B):
        p = tl.load(p_ptr + b * d_out + row, mask=valid, other=0.0)
        a = tl.load(a_ptr + b * d_in + col, mask=valid, other=0.0)
        acc = acc + p * a
    return w * acc


@triton.jit
def score_key(s):
    """Order-preserving uint32 key of fp32 scores; -0.0 ranks as +0.0."""
    s = tl.where(s == 0.0, 0.0, s)
    bits = s.to(tl.uint32, bitcast=True)
    return tl.where((bits >> 31) != 0, ~bits, bits | 0x80000000)


@triton.jit
def _scores_kernel(w_ptr, s0, s1, p_ptr, a_ptr, out_ptr, d_out, d_in, B, n,
                   WORDS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    f = (pid * WORDS + tl.arange(0, WORDS))[:, None] * 32 + tl.arange(0, 32)[None, :]
    valid = f < n
    s = score_block(w_ptr, s0, s1, p_ptr, a_ptr, d_out, d_in, B, f, valid)
    tl.store(out_ptr + f, s, mask=valid)


def scores(weight: torch.Tensor, pw: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Materialised scores (d_out, d_in) fp32; pw: (B, d_out) scaled row factors, a: (B, d_in)."""
    d_out, d_in = weight.shape
    n = weight.numel()
    out = torch.empty((d_out, d_in), dtype=torch.float32, device=weight.device)
    if n:
        pw, a = pw.contiguous(), a.contiguous()
        grid = (triton.cdiv(n, WORDS * 32),)
        _scores_kernel[grid](weight, weight.stride(0), weight.stride(1), pw, a, out, d_out, d_in,
                             pw.shape[0], n, WORDS=WORDS)
    return out
