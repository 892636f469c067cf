"""Exact bottom-k selection into packed masks by radix passes over recomputed score blocks.

Passes (each recomputes its scores with kernels/score.py `score_block`, nothing is stored):
  1. histogram of the top 16 bits of each score's order-preserving key (global atomics into
     65536 int32 bins per layer);
  2. histogram of the low 16 bits inside the threshold bin -> threshold key T and the count
     strictly below it;
  3. ties (key == T) per block (per row and column tile for 2-D tiles), then an exclusive scan
     over these counts in flat (layer, index) order;
  4. write whole words: bit = key < T or (key == T and tie rank < k - count below).
Memory: the histograms, one count per block (n / 1024) and the output words.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dowser.kernels.score import BB, BM, BN, WORDS, score_block, score_key, score_tile, use_tiles

NBINS = 1 << 16


@triton.jit
def _pass_kernel(w_ptr, s0, s1, p_ptr, a_ptr, d_out, d_in, B, n,
                 hist_ptr, block_ptr, out_ptr, hi, T, prefix_ptr, need,
                 MODE: tl.constexpr, WORDS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    word = pid * WORDS + tl.arange(0, WORDS)
    f = word[:, None] * 32 + tl.arange(0, 32)[None, :]
    valid = f < n
    key = score_key(score_block(w_ptr, s0, s1, p_ptr, a_ptr, d_out, d_in, B, f, valid))
    ones = tl.full(f.shape, 1, tl.int32)
    if MODE == 0:  # histogram of the top 16 bits
        tl.atomic_add(hist_ptr + (key >> 16).to(tl.int32), ones, mask=valid)
    elif MODE == 1:  # histogram of the low 16 bits inside bin `hi`
        inbin = valid & ((key >> 16).to(tl.int32) == hi)
        tl.atomic_add(hist_ptr + (key & 0xFFFF).to(tl.int32), ones, mask=inbin)
    elif MODE == 2:  # ties per block
        tie = (valid & (key == T)).to(tl.int32)
        tl.store(block_ptr + pid, tl.sum(tl.sum(tie, axis=1), axis=0))
    else:  # write the words
        tie = (valid & (key == T)).to(tl.int32)
        per_word = tl.sum(tie, axis=1)
        before_word = tl.cumsum(per_word, axis=0) - per_word
        rank = tl.load(prefix_ptr + pid) + before_word[:, None] + tl.cumsum(tie, axis=1) - 1
        on = valid & ((key < T) | ((tie != 0) & (rank < need)))
        bits = on.to(tl.int32) << tl.arange(0, 32)[None, :]
        # Disjoint bits: the sum is an OR (and wraps into the sign bit exactly like one).
        packed = tl.sum(bits, axis=1)
        tl.store(out_ptr + word, packed, mask=word < tl.cdiv(n, 32))


@triton.jit
def _pass_tile_kernel(w_ptr, s0, s1, p_ptr, a_ptr, d_out, d_in, B, n_ct,
                      hist_ptr, block_ptr, out_ptr, hi, T, prefix_ptr, need,
                      MODE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BB: tl.constexpr):
    # Tiles of BM rows x BN columns, d_in % 32 == 0: a row's 32 aligned columns are one word.
    pid_n = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    cols = pid_n.to(tl.int64) * BN + tl.arange(0, BN)
    valid = (rows < d_out)[:, None] & (cols < d_in)[None, :]
    key = score_key(score_tile(w_ptr, s0, s1, p_ptr, a_ptr, d_out, d_in, B, rows, cols, BM, BN, BB))
    ones = tl.full((BM, BN), 1, tl.int32)
    if MODE == 0:
        tl.atomic_add(hist_ptr + (key >> 16).to(tl.int32), ones, mask=valid)
    elif MODE == 1:
        inbin = valid & ((key >> 16).to(tl.int32) == hi)
        tl.atomic_add(hist_ptr + (key & 0xFFFF).to(tl.int32), ones, mask=inbin)
    elif MODE == 2:  # ties per (row, column tile): row-major over these is flat order
        tie = (valid & (key == T)).to(tl.int32)
        tl.store(block_ptr + rows * n_ct + pid_n, tl.sum(tie, axis=1), mask=rows < d_out)
    else:
        tie = (valid & (key == T)).to(tl.int32)
        before = tl.load(prefix_ptr + rows * n_ct + pid_n, mask=rows < d_out, other=0)
        rank = before[:, None] + tl.cumsum(tie, axis=1) - 1
        on = valid & ((key < T) | ((tie != 0) & (rank < need)))
        bits = on.to(tl.int32) << (tl.arange(0, BN) % 32)[None, :]
        packed = tl.sum(tl.reshape(bits, (BM, BN // 32, 32)), axis=2)
        word = (rows[:, None] * d_in + (pid_n.to(tl.int64) * BN
                                         + tl.arange(0, BN // 32)[None, :] * 32)) // 32
        wmask = (rows < d_out)[:, None] & ((pid_n * BN + tl.arange(0, BN // 32) * 32) < d_in)[None, :]
        tl.store(out_ptr + word, packed, mask=wmask)


def _counts_len(w: torch.Tensor) -> int:
    """Length of a layer's tie-count array (flat order): per (row, column tile) or per block."""
    if use_tiles(w):
        return w.shape[0] * triton.cdiv(w.shape[1], BN)
    return triton.cdiv(w.numel(), WORDS * 32)


def _launch(layer, mode, hist, block, out, hi=0, T=0, prefix=None, need=0):
    w, pw, a = layer
    n = w.numel()
    if n == 0:
        return
    if use_tiles(w):
        n_ct = triton.cdiv(w.shape[1], BN)
        dummy = hist if hist is not None else out
        _pass_tile_kernel[(triton.cdiv(w.shape[0], BM), n_ct)](
            w, w.stride(0), w.stride(1), pw, a, w.shape[0], w.shape[1], pw.shape[0], n_ct,
            dummy if hist is None else hist, block if block is not None else dummy,
            out if out is not None else dummy, hi, T, prefix if prefix is not None else dummy,
            need, MODE=mode, BM=BM, BN=BN, BB=BB)
        return
    grid = (triton.cdiv(n, WORDS * 32),)
    dummy = hist if hist is not None else out
    _pass_kernel[grid](w, w.stride(0), w.stride(1), pw, a, w.shape[0], w.shape[1], pw.shape[0], n,
                       dummy if hist is None else hist, block if block is not None else dummy,
                       out if out is not None else dummy, hi, T,
                       prefix if prefix is not None else dummy, need, MODE=mode, WORDS=WORDS)


def _find_bin(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th entry (1-based) and the count of entries in lower bins."""
    cum = torch.cumsum(counts, 0)
    b = int(torch.searchsorted(cum, torch.tensor([k], dtype=cum.dtype, device=cum.device)).item())
    return b, int(cum[b - 1]) if b else 0


def select_masks(layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], k: int
                 ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """layers: (weight, row factors (B, d_out) scaled by w / sum(w), column factors (B, d_in)).

    Returns the packed masks of the k lowest scores over all layers (ties by layer, then flat
    index) and int64 stats [threshold key, count below, ties taken] (key -1 when k = 0).
    """
    layers = [(w, pw.contiguous(), a.contiguous()) for w, pw, a in layers]
    device = layers[0][0].device if layers else torch.device("cpu")
    outs = [torch.zeros((w.numel() + 31) // 32, dtype=torch.int32, device=w.device)
            for w, _, _ in layers]
    n = sum(w.numel() for w, _, _ in layers)
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    if k == 0:
        return outs, torch.tensor([-1, 0, 0], dtype=torch.int64)
    hist = torch.zeros(NBINS, dtype=torch.int32, device=device)
    total = torch.zeros(NBINS, dtype=torch.int64, device=device)
    for layer in layers:  # int32 bins per layer (< 2^31 entries each), summed in int64
        hist.zero_()
        _launch(layer, 0, hist, None, None)
        total += hist
    hi, below = _find_bin(total, k)
    total.zero_()
    for layer in layers:
        hist.zero_()
        _launch(layer, 1, hist, None, None, hi=hi)
        total += hist
    lo, below_lo = _find_bin(total, k - below)
    T = (hi << 16) | lo
    count_lt = below + below_lo
    need = k - count_lt
    t_arg = T - (1 << 32) if T >= 1 << 31 else T  # passed as a signed 32-bit scalar
    blocks = [torch.zeros(_counts_len(w), dtype=torch.int32, device=device) for w, _, _ in layers]
    for layer, block in zip(layers, blocks):
        _launch(layer, 2, None, block, None, T=t_arg)
    counts = torch.cat(blocks).to(torch.int64) if blocks else torch.zeros(0, dtype=torch.int64)
    prefix_all = torch.cumsum(counts, 0) - counts  # exclusive scan in (layer, index) order
    start = 0
    for layer, block, out in zip(layers, blocks, outs):
        prefix = prefix_all[start:start + block.numel()].contiguous()
        start += block.numel()
        _launch(layer, 3, None, None, out, T=t_arg, prefix=prefix, need=need)
    return outs, torch.tensor([T, count_lt, need], dtype=torch.int64)
