"""Counter-based random scores and the exact chunked bottom-k selection over integer keys.

`method="random"` in `dowser.build_masks` scores entry i of parameter `name` by a 32-bit hash
of (seed, name, i) alone, so any user can rebuild the same mask from those three things, on any
device, in any process, without the weights. The hash is computed chunk by chunk in int64 torch
ops (splitmix64's finaliser over a Weyl sequence), so memory is O(chunk), and the selection of
the k lowest keys is exact (ties by matrix order, then lower flat index) in two passes over the
recomputed keys (see `select_lowest`).
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch

from dowser import reference

CHUNK = 1 << 20  # keys held at once (a multiple of 32, so chunks pack into whole words)

_M64 = (1 << 64) - 1


def _i64(x: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits (torch has no uint64 ops)."""
    x &= _M64
    return x - (1 << 64) if x >= 1 << 63 else x


_GAMMA = _i64(0x9E3779B97F4A7C15)  # splitmix64's Weyl increment
_MIX1 = _i64(0xBF58476D1CE4E5B9)
_MIX2 = _i64(0x94D049BB133111EB)


def _mix64_int(z: int) -> int:
    """splitmix64's finaliser on a Python int (exact unsigned 64-bit arithmetic)."""
    z &= _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def stream_base(seed: int, name: str) -> int:
    """The 64-bit start of the key stream of parameter `name` under `seed` (as an int64 value).

    FNV-1a over the UTF-8 name (never Python's salted hash()), mixed with the seed, so the
    stream depends on (seed, name) alone.
    """
    h = 0xCBF29CE484222325
    for byte in name.encode("utf-8"):
        h = ((h ^ byte) * 0x100000001B3) & _M64
    return _i64(_mix64_int(_mix64_int(h) ^ _mix64_int(int(seed) * 0x9E3779B97F4A7C15 + 1)))


def _lsr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def hash_keys(base: int, start: int, stop: int, device: torch.device | str = "cpu"
              ) -> torch.Tensor:
    """Keys (uint32 values as int64) of flat indices [start, stop) of the stream at `base`."""
    return hash_keys_at(base, torch.arange(start, stop, dtype=torch.int64, device=device))


def hash_keys_at(base: int, indices: torch.Tensor) -> torch.Tensor:
    """Keys of the given flat indices (int64 tensor) of the stream at `base`.

    key(i) = top 32 bits of mix64(base + (i + 1) * GAMMA mod 2^64). int64 multiplication and
    addition wrap modulo 2^64 in torch on every device, which is the unsigned arithmetic the
    hash needs; the right shifts are made logical with a mask.
    """
    z = indices.to(torch.int64) + 1
    z.mul_(_GAMMA).add_(base)
    z.bitwise_xor_(_lsr(z, 30)).mul_(_MIX1)
    z.bitwise_xor_(_lsr(z, 27)).mul_(_MIX2)
    z.bitwise_xor_(_lsr(z, 31))
    return _lsr(z, 32)


def hash_keys_reference(base: int, indices: Sequence[int]) -> list[int]:
    """The same keys computed one by one with Python integers (the oracle of `hash_keys`)."""
    b = base & _M64
    return [_mix64_int(b + (i + 1) * 0x9E3779B97F4A7C15) >> 32 for i in indices]


KeyChunks = Callable[[], Iterator[torch.Tensor]]  # yields a matrix's keys in flat order


def random_key_chunks(seed: int, name: str, numel: int, device: torch.device | str,
                      highest: bool = False, chunk: int | None = None) -> KeyChunks:
    """A re-iterable source of the keys of `name`'s `numel` entries, `chunk` at a time.

    highest=True reverses the order (key -> 2^32 - 1 - key), so the bottom-k selection takes
    the k highest hashes, ties still by lower flat index.
    """
    base = stream_base(seed, name)
    chunk = CHUNK if chunk is None else chunk

    def chunks() -> Iterator[torch.Tensor]:
        for s in range(0, numel, chunk):
            keys = hash_keys(base, s, min(numel, s + chunk), device)
            yield (0xFFFFFFFF - keys) if highest else keys

    return chunks


def _digit(hist: torch.Tensor, want: int) -> tuple[int, int]:
    """(first bin whose cumulative count reaches `want` (1-based), count before that bin)."""
    cum = hist.cumsum(0)
    d = int((cum < want).sum())
    return d, int(cum[d - 1]) if d > 0 else 0


def _set_bits(words: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`words` (int32) with the bits of flat entries `index` set (they must be 0 before)."""
    if index.numel() == 0:
        return words
    w64 = words.to(torch.int64) & 0xFFFFFFFF
    # distinct zero bits: their sum is their OR
    w64.index_add_(0, (index // 32).to(words.device), (1 << (index % 32)).to(words.device))
    return torch.where(w64 >= 2**31, w64 - 2**32, w64).to(torch.int32)


def select_lowest(sources: Sequence[KeyChunks], numels: Sequence[int], k: int,
                  device: torch.device | str = "cpu") -> tuple[list[torch.Tensor], torch.Tensor]:
    """Packed masks (on `device`) of the k lowest 32-bit keys over all `sources` together (ties
    by source order, then flat index), and int64 stats [threshold key, count below it, ties
    taken] (threshold -1 when k = 0). O(chunk + 2^16) extra memory: keys are recomputed.

    Pass 1 histograms the top 16 key bits, which fixes the threshold bin; pass 2 writes every
    entry below that bin and collects the bin's (low 16 bits, index) candidates, of which the
    first k - (count below) in (low bits, source, index) order are then set. A bin too full to
    collect (more than CHUNK entries: heavy ties) takes a third pass instead: a histogram of
    its low 16 bits gives the threshold, and the write pass takes ties in order.
    """
    from dowser.ops import pack_mask

    total = sum(numels)
    if not 0 <= k <= total:
        raise ValueError(f"k must be in [0, {total}], got {k}")
    if k == 0:
        return ([pack_mask(torch.zeros(n, dtype=torch.bool, device=device)) for n in numels],
                torch.tensor([-1, 0, 0], dtype=torch.int64))
    hist = torch.zeros(1 << 16, dtype=torch.int64)
    for src in sources:
        for keys in src():
            hist += torch.bincount(_lsr(keys, 16), minlength=1 << 16).cpu()
    hi, before_hi = _digit(hist, k)
    want = k - before_hi  # entries of bin `hi` to take
    if int(hist[hi]) <= CHUNK:
        masks, cands = [], []
        for si, src in enumerate(sources):
            words, pos = [], 0
            for keys in src():
                top = _lsr(keys, 16)
                words.append(pack_mask(top < hi).to(device))
                inbin = (top == hi).nonzero().squeeze(1)
                if inbin.numel():
                    cands.append((si, (inbin + pos).cpu(), (keys[inbin] & 0xFFFF).cpu()))
                pos += keys.numel()
            masks.append(torch.cat(words) if words else
                         pack_mask(torch.zeros(numels[si], dtype=torch.bool, device=device)))
        src_id = torch.cat([torch.full_like(i, si) for si, i, _ in cands])
        index = torch.cat([i for _, i, _ in cands])
        low = torch.cat([lo for _, _, lo in cands])
        order = torch.sort(low, stable=True).indices[:want]  # stable: source, index order kept
        t_low = int(low[order[-1]])
        for si in range(len(sources)):
            masks[si] = _set_bits(masks[si], index[order][src_id[order] == si])
        below = before_hi + int((low < t_low).sum())
        t = (hi << 16) | t_low
        return masks, torch.tensor([t, below, k - below], dtype=torch.int64)
    # heavy ties in the threshold bin: histogram its low 16 bits
    hist.zero_()
    for src in sources:
        for keys in src():
            inbin = keys[_lsr(keys, 16) == hi]
            if inbin.numel():
                hist += torch.bincount(inbin & 0xFFFF, minlength=1 << 16).cpu()
    lo, before_lo = _digit(hist, want)
    t = (hi << 16) | lo
    below = before_hi + before_lo
    need = k - below  # keys equal to t taken, first come (source order, flat index) first
    masks, seen = [], 0
    for src, n in zip(sources, numels):
        words = []
        for keys in src():
            take = keys < t
            if seen < need:
                tie = keys == t
                rank = tie.cumsum(0) + seen  # 1-based order among all ties so far
                take |= tie & (rank <= need)
                seen += int(tie.sum())
            words.append(pack_mask(take).to(device))
        masks.append(torch.cat(words) if words else
                     pack_mask(torch.zeros(n, dtype=torch.bool, device=device)))
    return masks, torch.tensor([t, below, need], dtype=torch.int64)
