"""Exact bottom-k selection into packed masks by radix passes over recomputed score blocks.

Every pass recomputes its scores with kernels/score.py (`score_block` / `score_tile`), so
nothing of size d_out x d_in is ever stored. Keys are the order-preserving uint32 keys of the
fp32 scores, selected in three 11/11/10-bit digits (as CUB and RAFT do):
  HIST (x3)  each program builds a private histogram of one digit (`tl.histogram`, 2048 bins,
             of the entries whose higher digits equal the prefix chosen so far) and merges it
             into the global bins with relaxed atomics, only for bins it actually touched:
             no per-element global atomic, no fence, and integer sums are order-free, so the
             result is deterministic. The bin holding the k-th entry is found on the device.
  TIES       ties (key == T) per block (per row and column tile for 2-D tiles), only when some
             ties at T must be left out; otherwise its loads are masked off (no traffic).
  WRITE      whole words: bit = key < T or (key == T and tie rank < k - count below), the rank
             from an in-place inclusive scan of the TIES counts in flat (layer, index) order
             minus the block's own count.
The threshold state (prefix, T, count below, ties needed) lives in a small device tensor that
the kernels read and a one-program kernel updates after each HIST pass (`_find_bin_kernel`:
one launch, not a string of small torch ops), so a selection makes no host synchronisation; the only integer
arguments are shapes and strides, marked do_not_specialize (one compile per dtype, layout and
mode, whatever the shapes, B or k).
Memory: a 2048-bin histogram, one int64 tie count per block (n / 1024 or d_out * d_in / 128,
scanned in place) and the output words.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dowser.kernels._launch import launch
from dowser.kernels.score import (BB, BM, BN, RUNTIME_INTS, WORDS, score_block, score_key,
                                  score_tile, use_tiles, weight_layout)

NB = 2048  # bins per digit (11 bits)
# (shift of the digit, mask of the higher bits that must equal the prefix) per HIST pass.
DIGITS = ((21, 0x00000000), (10, 0xFFE00000), (0, 0xFFFFFC00))
HIST, TIES, WRITE = 0, 1, 2
# Device control words (int64): what the passes read -- prefix so far, mask of its bits, shift
# of the digit, threshold key T, ties needed, whether some tie must be left out -- and the
# bin search's state -- rank still wanted inside the bin, count strictly below.
_PREFIX, _PMASK, _SHIFT, _T, _NEED, _RANKED, _LEFT, _BELOW = range(8)


def _signed32(x: int) -> int:
    # Masks travel as signed 32-bit values (one argument type for every pass: one compile).
    return x - (1 << 32) if x >= 1 << 31 else x


@triton.jit(do_not_specialize=["shift", "next_shift", "next_pmask"])
def _find_bin_kernel(hist_ptr, ctl_ptr, shift, next_shift, next_pmask, NB: tl.constexpr):
    """One program: the bin of the histogram holding the wanted rank, the control words for
    the next pass (or T, ties needed and the TIES flag after the last), and the bins zeroed."""
    bins = tl.arange(0, NB)
    h = tl.load(hist_ptr + bins)
    cum = tl.cumsum(h, axis=0)
    left = tl.load(ctl_ptr + 6)
    lower_bins = cum < left  # cum is non-decreasing: these are the bins before the wanted one
    b = tl.sum(lower_bins.to(tl.int64), axis=0)
    lower = tl.max(tl.where(lower_bins, cum, 0), axis=0)
    in_bin = tl.sum(tl.where(bins == b, h, 0), axis=0)
    prefix = tl.load(ctl_ptr + 0) | (b << shift)
    left = left - lower
    tl.store(ctl_ptr + 0, prefix)
    tl.store(ctl_ptr + 1, next_pmask.to(tl.int64))
    tl.store(ctl_ptr + 2, next_shift.to(tl.int64))
    tl.store(ctl_ptr + 3, prefix)  # T, once the last digit is in
    tl.store(ctl_ptr + 4, left)  # ties at T still to take
    tl.store(ctl_ptr + 5, (left < in_bin).to(tl.int64))
    tl.store(ctl_ptr + 6, left)
    tl.store(ctl_ptr + 7, tl.load(ctl_ptr + 7) + lower)
    tl.store(hist_ptr + bins, tl.zeros_like(h))


@triton.jit
def _histogram_merge(key, valid, ctl_ptr, hist_ptr, SIZE: tl.constexpr, NB: tl.constexpr):
    """Per-program histogram of one digit of the keys in the current prefix bin, merged into
    the global int64 bins with relaxed atomics (one per bin this program touched)."""
    pre = tl.load(ctl_ptr + 0).to(tl.uint32)
    pmask = tl.load(ctl_ptr + 1).to(tl.uint32)
    shift = tl.load(ctl_ptr + 2).to(tl.uint32)
    inbin = valid & ((key & pmask) == pre)
    digit = tl.where(inbin, (key >> shift) & (NB - 1), 0).to(tl.int32)
    h = tl.histogram(tl.reshape(digit, (SIZE,)), NB)
    # Entries outside the bin were counted as digit 0: take them back out.
    outside = SIZE - tl.sum(tl.reshape(inbin.to(tl.int32), (SIZE,)), axis=0)
    bins = tl.arange(0, NB)
    h = h - tl.where(bins == 0, outside, 0)
    tl.atomic_add(hist_ptr + bins, h.to(tl.int64), mask=h > 0, sem="relaxed")


@triton.jit(do_not_specialize=RUNTIME_INTS)
def _pass_kernel(w_ptr, s0, s1, p_ptr, a_ptr, d_out, d_in, B, n,
                 ctl_ptr, hist_ptr, block_ptr, prefix_ptr, out_ptr,
                 MODE: tl.constexpr, WORDS: tl.constexpr, NB: tl.constexpr,
                 LAYOUT: tl.constexpr):
    # Flat blocks of WORDS x 32 row-major indices: a program owns whole mask words.
    pid = tl.program_id(0).to(tl.int64)
    word = pid * WORDS + tl.arange(0, WORDS)
    f = word[:, None] * 32 + tl.arange(0, 32)[None, :]
    live = n
    if MODE == 1:  # no tie has to be left out: nothing is live, so no load is issued
        live = tl.where(tl.load(ctl_ptr + 5) != 0, n, 0)
    valid = f < live
    key = score_key(score_block(w_ptr, s0, s1, p_ptr, a_ptr, d_out, d_in, B, f, valid, LAYOUT))
    if MODE == 0:
        _histogram_merge(key, valid, ctl_ptr, hist_ptr, WORDS * 32, NB)
    elif MODE == 1:  # ties per block
        T = tl.load(ctl_ptr + 3).to(tl.uint32)
        tie = (valid & (key == T)).to(tl.int32)
        tl.store(block_ptr + pid, tl.sum(tl.sum(tie, axis=1), axis=0))
    else:  # write the words
        T = tl.load(ctl_ptr + 3).to(tl.uint32)
        need = tl.load(ctl_ptr + 4)
        tie = (valid & (key == T)).to(tl.int32)
        per_word = tl.sum(tie, axis=1)
        before_word = tl.cumsum(per_word, axis=0) - per_word
        # prefix_ptr holds the inclusive scan of the TIES counts: take this block's own ties
        # back out (they were counted only when some tie is left out, see MODE 1).
        own = tl.where(tl.load(ctl_ptr + 5) != 0, tl.sum(per_word, axis=0), 0)
        rank = (tl.load(prefix_ptr + pid) - own) + (before_word[:, None] + tl.cumsum(tie, axis=1) - 1)
        on = valid & ((key < T) | ((tie != 0) & (rank < need)))
        bits = on.to(tl.int32) << tl.arange(0, 32)[None, :]
        # Disjoint bits: the sum is an OR (and wraps into the sign bit exactly like one).
        packed = tl.sum(bits, axis=1)
        tl.store(out_ptr + word, packed, mask=word < tl.cdiv(n, 32))


@triton.jit(do_not_specialize=RUNTIME_INTS)
def _pass_tile_kernel(w_ptr, s0, s1, p_ptr, a_ptr, d_out, d_in, B, n_ct,
                      ctl_ptr, hist_ptr, block_ptr, prefix_ptr, out_ptr,
                      MODE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BB: tl.constexpr,
                      NB: tl.constexpr, LAYOUT: tl.constexpr):
    # Tiles of BM rows x BN columns, d_in % 32 == 0: a row's 32 aligned columns are one word.
    pid_n = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    cols = pid_n.to(tl.int64) * BN + tl.arange(0, BN)
    live_rows = d_out
    if MODE == 1:  # no tie has to be left out: no row is live, so no load is issued
        live_rows = tl.where(tl.load(ctl_ptr + 5) != 0, d_out, 0)
    valid = (rows < live_rows)[:, None] & (cols < d_in)[None, :]
    key = score_key(score_tile(w_ptr, s0, s1, p_ptr, a_ptr, live_rows, d_in, B, rows, cols,
                               BM, BN, BB, LAYOUT))
    if MODE == 0:
        _histogram_merge(key, valid, ctl_ptr, hist_ptr, BM * BN, NB)
    elif MODE == 1:  # ties per (row, column tile): row-major over these is flat order
        T = tl.load(ctl_ptr + 3).to(tl.uint32)
        tie = (valid & (key == T)).to(tl.int32)
        tl.store(block_ptr + rows * n_ct + pid_n, tl.sum(tie, axis=1), mask=rows < d_out)
    else:
        T = tl.load(ctl_ptr + 3).to(tl.uint32)
        need = tl.load(ctl_ptr + 4)
        tie = (valid & (key == T)).to(tl.int32)
        own = tl.where(tl.load(ctl_ptr + 5) != 0, tl.sum(tie, axis=1), 0)  # inclusive -> exclusive
        before = tl.load(prefix_ptr + rows * n_ct + pid_n, mask=rows < d_out, other=0) - own
        rank = before[:, None] + (tl.cumsum(tie, axis=1) - 1)
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


def _launch(layer, mode: int, ctl: torch.Tensor, hist: torch.Tensor, block=None, prefix=None,
            out=None) -> None:
    w, pw, a = layer
    if w.numel() == 0:
        return
    # Unused pointer arguments get a live tensor of the right dtype (never dereferenced).
    block = hist if block is None else block
    prefix = hist if prefix is None else prefix
    out = hist if out is None else out
    layout = weight_layout(w)
    if use_tiles(w):
        n_ct = triton.cdiv(w.shape[1], BN)
        launch(_pass_tile_kernel, (triton.cdiv(w.shape[0], BM), n_ct),
               w, w.stride(0), w.stride(1), pw, a, w.shape[0], w.shape[1], pw.shape[0], n_ct,
               ctl, hist, block, prefix, out, MODE=mode, BM=BM, BN=BN, BB=BB, NB=NB,
               LAYOUT=layout)
    else:
        launch(_pass_kernel, (triton.cdiv(w.numel(), WORDS * 32),),
               w, w.stride(0), w.stride(1), pw, a, w.shape[0], w.shape[1], pw.shape[0], w.numel(),
               ctl, hist, block, prefix, out, MODE=mode, WORDS=WORDS, NB=NB, LAYOUT=layout)


def select_masks(layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], k: int
                 ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """layers: (weight, row factors (B, d_out) scaled by w / sum(w), column factors (B, d_in)).

    Returns the packed masks of the k lowest scores over all layers (ties by layer, then flat
    index) and int64 stats [threshold key, count below, ties taken] (key -1 when k = 0), on
    the layers' device. No host synchronisation.
    """
    layers = [(w, pw.contiguous(), a.contiguous()) for w, pw, a in layers]
    device = layers[0][0].device if layers else torch.device("cpu")
    outs = [torch.zeros((w.numel() + 31) // 32, dtype=torch.int32, device=w.device)
            for w, _, _ in layers]
    n = sum(w.numel() for w, _, _ in layers)
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    if k == 0:
        stats = torch.zeros(3, dtype=torch.int64, device=device)
        stats.narrow(0, 0, 1).fill_(-1)  # a launch; `t[0] = -1` would copy a host scalar (a sync)
        return outs, stats
    # Filled on the device: `ctl[i] = v` would be a blocking host-to-device copy of a scalar.
    # (narrow/select rather than Python indexing throughout: the same views, and they also
    # trace under FakeTensorMode on CUDA devices of a CPU-only torch, see test_gpu_review.)
    ctl = torch.zeros(8, dtype=torch.int64, device=device)
    ctl.narrow(0, _SHIFT, 1).fill_(DIGITS[0][0])
    ctl.narrow(0, _LEFT, 1).fill_(k)
    hist = torch.zeros(NB, dtype=torch.int64, device=device)
    for i, (shift, _) in enumerate(DIGITS):
        for layer in layers:
            _launch(layer, HIST, ctl, hist)
        next_shift, next_pmask = DIGITS[i + 1] if i + 1 < len(DIGITS) else (0, 0)
        launch(_find_bin_kernel, (1,), hist, ctl, shift, next_shift, _signed32(next_pmask), NB=NB)
    # One int64 buffer for every layer's tie counts, scanned in place (inclusive; the WRITE
    # pass subtracts its own count): no cat, no second array. Each layer's segment starts at
    # an even index, so every view is 16-byte aligned (Triton specialises pointers on it: an
    # odd start would compile a second WRITE kernel at run time). int64, not int32: the scan
    # counts ties over all layers, which may exceed 2**31 in a global selection of a 7B model.
    lens = [_counts_len(w) for w, _, _ in layers]
    starts = [0]
    for n_counts in lens:
        starts.append(starts[-1] + n_counts + (n_counts & 1))
    counts = torch.zeros(starts[-1], dtype=torch.int64, device=device)
    blocks = [counts.narrow(0, s, n_counts) for s, n_counts in zip(starts, lens)]
    for layer, block in zip(layers, blocks):
        _launch(layer, TIES, ctl, hist, block=block)
    counts.cumsum_(0)  # in (layer, index) order; the padding entries are 0
    for layer, block, out in zip(layers, blocks, outs):
        _launch(layer, WRITE, ctl, hist, prefix=block, out=out)
    return outs, torch.stack([ctl.select(0, _T), ctl.select(0, _BELOW), ctl.select(0, _NEED)])
