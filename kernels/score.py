"""Fused score blocks: S = |W| * sum_b P[b, i] * A[b, j] computed on the fly, in fp32.

Every kernel that needs scores (the `scores` materialiser here and every pass of
kernels/select.py) calls the one `score_block` function, so they all perform the identical
sequence of fp32 operations per entry: the selection then equals the k smallest of these
kernels' own materialised scores exactly.

Two layouts, chosen per matrix (and used by every kernel of that matrix alike):
- 2-D tiles (`score_tile`) when d_in % 32 == 0 (every LLM projection): BM x BN tiles, the
  rank-B product as tl.dot over B padded to 16 (input_precision="ieee", fp32), so each factor
  value is reused across the tile; a tile row of 32 aligned columns is exactly one mask word.
- flat blocks (`score_block`) otherwise: runs of WORDS x 32 flat row-major indices, so a
  program still owns whole words; the batch sum is an explicit fp32 loop over B.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dowser.kernels._launch import launch

WORDS = 32  # mask words per program: a block of WORDS * 32 flat entries

# Weight layouts (a constexpr of every kernel): the stride that is 1 is known at compile time,
# so loads along it coalesce; the other stride and every shape are runtime values
# (do_not_specialize), so a new shape never triggers a new compile.
GENERAL, ROW_MAJOR, COL_MAJOR = 0, 1, 2
# Runtime integer arguments of the kernels: never specialised on (value 1, divisibility by 16).
RUNTIME_INTS = ["s0", "s1", "d_out", "d_in", "B", "n", "n_ct"]


def weight_layout(weight: torch.Tensor) -> int:
    """ROW_MAJOR when stride(1) == 1, COL_MAJOR when stride(0) == 1, else GENERAL (a dimension
    of size 1 may have any stride: it never contributes to an offset)."""
    s0, s1 = weight.stride()
    if s1 == 1 or weight.shape[1] <= 1:
        return ROW_MAJOR
    if s0 == 1 or weight.shape[0] <= 1:
        return COL_MAJOR
    return GENERAL


@triton.jit
def w_offsets(row, col, s0, s1, LAYOUT: tl.constexpr):
    """Element offsets of W[row, col] for the weight layout."""
    if LAYOUT == 1:
        off = row * s0 + col
    elif LAYOUT == 2:
        off = row + col * s1
    else:
        off = row * s0 + col * s1
    return off


@triton.jit
def score_block(w_ptr, s0, s1, p_ptr, a_ptr, d_out, d_in, B, f, valid, LAYOUT: tl.constexpr):
    """Scores of flat indices `f` (int64, any shape) where `valid`; 0 elsewhere."""
    row = f // d_in
    col = f % d_in
    # Upcast before any arithmetic (the interpreter treats bf16 as raw uint16).
    w = tl.abs(tl.load(w_ptr + w_offsets(row, col, s0, s1, LAYOUT), mask=valid,
                       other=0.0).to(tl.float32))
    acc = tl.load(p_ptr + row, mask=valid, other=0.0) * tl.load(a_ptr + col, mask=valid, other=0.0)
    for b in range(1, B):
        p = tl.load(p_ptr + b * d_out + row, mask=valid, other=0.0)
        a = tl.load(a_ptr + b * d_in + col, mask=valid, other=0.0)
        acc = acc + p * a
    return w * acc


BM, BN, BB = 32, 128, 16  # 2-D tile: rows, columns (4 words per row), batch chunk for tl.dot


def use_tiles(weight: torch.Tensor) -> bool:
    """2-D tiles when each row is a whole number of mask words."""
    return weight.shape[1] % 32 == 0 and weight.numel() > 0


@triton.jit
def score_tile(w_ptr, s0, s1, p_ptr, a_ptr, d_out, d_in, B, rows, cols,
               BM: tl.constexpr, BN: tl.constexpr, BB: tl.constexpr, LAYOUT: tl.constexpr):
    """Scores of the tile rows x cols ((BM,), (BN,) int64 index vectors); 0 outside."""
    rmask = rows < d_out
    cmask = cols < d_in
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for b0 in range(0, B, BB):
        bs = b0 + tl.arange(0, BB)
        bmask = bs < B
        # Zero padding of B adds exact zeros: the padded product is the unpadded one.
        p = tl.load(p_ptr + bs[None, :] * d_out + rows[:, None], mask=rmask[:, None] & bmask[None, :],
                    other=0.0)
        a = tl.load(a_ptr + bs[:, None] * d_in + cols[None, :], mask=bmask[:, None] & cmask[None, :],
                    other=0.0)
        acc += tl.dot(p, a, input_precision="ieee")
    m = rmask[:, None] & cmask[None, :]
    w = tl.load(w_ptr + w_offsets(rows[:, None], cols[None, :], s0, s1, LAYOUT), mask=m,
                other=0.0).to(tl.float32)
    return tl.abs(w) * acc


@triton.jit(do_not_specialize=RUNTIME_INTS)
def _scores_tile_kernel(w_ptr, s0, s1, p_ptr, a_ptr, out_ptr, d_out, d_in, B,
                        BM: tl.constexpr, BN: tl.constexpr, BB: tl.constexpr,
                        LAYOUT: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    cols = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN)
    s = score_tile(w_ptr, s0, s1, p_ptr, a_ptr, d_out, d_in, B, rows, cols, BM, BN, BB, LAYOUT)
    tl.store(out_ptr + rows[:, None] * d_in + cols[None, :], s,
             mask=(rows < d_out)[:, None] & (cols < d_in)[None, :])


@triton.jit
def score_key(s):
    """Order-preserving uint32 key of fp32 scores; -0.0 ranks as +0.0."""
    s = tl.where(s == 0.0, 0.0, s)
    bits = s.to(tl.uint32, bitcast=True)
    # bits ^ 0xFFFFFFFF, not ~bits: Triton 3.6's interpreter computes ~ as a XOR with -1, which
    # numpy 2 refuses for uint32 (the compiled kernel is the same either way)
    return tl.where((bits >> 31) != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)


@triton.jit(do_not_specialize=RUNTIME_INTS)
def _scores_kernel(w_ptr, s0, s1, p_ptr, a_ptr, out_ptr, d_out, d_in, B, n,
                   WORDS: tl.constexpr, LAYOUT: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    f = (pid * WORDS + tl.arange(0, WORDS))[:, None] * 32 + tl.arange(0, 32)[None, :]
    valid = f < n
    s = score_block(w_ptr, s0, s1, p_ptr, a_ptr, d_out, d_in, B, f, valid, LAYOUT)
    tl.store(out_ptr + f, s, mask=valid)


def scores(weight: torch.Tensor, pw: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Materialised scores (d_out, d_in) fp32; pw: (B, d_out) scaled row factors, a: (B, d_in)."""
    d_out, d_in = weight.shape
    n = weight.numel()
    out = torch.empty((d_out, d_in), dtype=torch.float32, device=weight.device)
    if n and use_tiles(weight):
        pw, a = pw.contiguous(), a.contiguous()
        grid2 = (triton.cdiv(d_out, BM), triton.cdiv(d_in, BN))
        launch(_scores_tile_kernel, grid2, weight, weight.stride(0), weight.stride(1), pw, a, out,
               d_out, d_in, pw.shape[0], BM=BM, BN=BN, BB=BB, LAYOUT=weight_layout(weight))
    elif n:
        pw, a = pw.contiguous(), a.contiguous()
        grid = (triton.cdiv(n, WORDS * 32),)
        launch(_scores_kernel, grid, weight, weight.stride(0), weight.stride(1), pw, a, out, d_out,
               d_in, pw.shape[0], n, WORDS=WORDS, LAYOUT=weight_layout(weight))
    return out
