"""Plain-PyTorch oracles, one per op: the fallback backend and the ground truth of every test.

Written for clarity, not speed or memory; every kernel must agree with these bit for bit
(masks) or within stated tolerances (floating-point results).
"""

from __future__ import annotations

import torch

_SHIFTS = torch.arange(32, dtype=torch.int64)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor (any shape/strides) -> int32 words; flat row-major index i in word i//32,
    bit i%32 (LSB first); padding bits 0."""
    flat = mask.reshape(-1).to(torch.int64)
    n = flat.numel()
    words = (n + 31) // 32
    padded = torch.zeros(words * 32, dtype=torch.int64, device=mask.device)
    padded[:n] = flat
    packed = (padded.view(words, 32) << _SHIFTS.to(mask.device)).sum(dim=1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_mask(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """int32 words -> flat bool mask of `numel` entries."""
    bits = (packed.to(torch.int64).unsqueeze(1) >> _SHIFTS.to(packed.device)) & 1
    return bits.reshape(-1)[:numel].to(torch.bool)


# --------------------------------------------------------------------------------------------
# Probing (issue #6): a straightforward re-implementation of the authors' loop, the oracle of
# dowser.probe and the baseline of bench/bench_probe.py. Deliberately naive: one forward per
# Rademacher draw, parameter gradients computed, a dense d_out x d_in score matrix per probe.
# --------------------------------------------------------------------------------------------

def authors_probe_loop(model, batches, targets, xis, estimator: str = "l1"):
    """Dense Model-Dowser scores as the authors' code computes them.

    batches: list of dicts of model inputs (input_ids, attention_mask all ones);
    targets: module names; xis[b]: (R, n_rows, vocab) Rademacher draws of batch b.
    For each batch and draw: forward, backward of (xi * logits[:, -1]).sum() / n_rows with
    parameter gradients, psi = mean |dL/dz| over sequences and tokens, a = mean |h|, and the
    dense score |W| * psi a^T accumulated; batches weighted by their size.
    Returns {module name: fp32 d_out x d_in scores (laid out as z = W h)}.
    """
    import torch

    modules = dict(model.named_modules())
    mods = {n: modules[n] for n in targets}
    sums = {}
    total_w = 0.0
    was_training = model.training
    model.eval()
    for b, inputs in enumerate(batches):
        n_rows = inputs["input_ids"].shape[0]
        batch_scores = {}
        sq = {}
        for r in range(xis[b].shape[0]):
            store = {}

            def make_hook(name):
                def hook(mod, args, out):
                    out.retain_grad()
                    store[name] = (args[0].detach(), out)
                return hook

            handles = [m.register_forward_hook(make_hook(n)) for n, m in mods.items()]
            try:
                out = model(**inputs)
            finally:
                for h in handles:
                    h.remove()
            logits = out.logits if hasattr(out, "logits") else out
            f = logits[:, -1, :]
            loss = (xis[b][r].to(f.dtype) * f).sum() / n_rows
            model.zero_grad(set_to_none=True)
            loss.backward()
            for n, mod in mods.items():
                h, z = store[n]
                g = z.grad.float()
                if estimator == "l2":
                    psi = (g * g).reshape(-1, g.shape[-1]).mean(0)
                else:
                    psi = g.abs().reshape(-1, g.shape[-1]).mean(0)
                a = h.float().abs().reshape(-1, h.shape[-1]).mean(0)
                w = mod.weight.detach().float()
                if type(mod).__name__ == "Conv1D":
                    w = w.T
                if estimator == "l2":
                    # sqrt of the mean square is taken per batch; keep psi sums for that
                    sq[n] = sq.get(n, 0) + psi
                    batch_scores[n] = (w, a)
                else:
                    s = w.abs() * torch.outer(psi, a)  # dense per-probe score matrix
                    batch_scores[n] = batch_scores.get(n, 0) + s
            model.zero_grad(set_to_none=True)
        R = xis[b].shape[0]
        for n in mods:
            if estimator == "l2":
                w, a = batch_scores[n]
                s = w.abs() * torch.outer((sq[n] / R).sqrt(), a)
            else:
                s = batch_scores[n] / R
            sums[n] = sums.get(n, 0) + n_rows * s
        total_w += n_rows
    model.train(was_training)
    return {n: s / total_w for n, s in sums.items()}

# --- scores and bottom-rho selection (issue 4) -------------------------------------------------
# S = |W| * (Psi^T diag(w) A) / sum(w). Every backend starts from the same fp32 factors
# (`score_factors`), then may sum over the batch in its own order; a backend's mask must equal
# `select_from_scores` applied to that backend's own materialised scores.


def score_factors(out_factors: torch.Tensor, in_factors: torch.Tensor,
                  batch_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row factors (B, d_out) = Psi * w / sum(w), column factors (B, d_in)), both fp32."""
    w = batch_weights.to(torch.float32)
    wn = w / w.sum()
    return out_factors.to(torch.float32) * wn[:, None], in_factors.to(torch.float32)


def scores(weight: torch.Tensor, out_factors: torch.Tensor, in_factors: torch.Tensor,
           batch_weights: torch.Tensor) -> torch.Tensor:
    """Materialised fp32 score matrix (d_out, d_in)."""
    pw, a = score_factors(out_factors, in_factors, batch_weights)
    return weight.abs().to(torch.float32) * (pw.t() @ a)


def scores64(weight: torch.Tensor, out_factors: torch.Tensor, in_factors: torch.Tensor,
             batch_weights: torch.Tensor) -> torch.Tensor:
    """The same scores in fp64 (the exact-arithmetic oracle of the tests)."""
    w = batch_weights.to(torch.float64)
    r = (out_factors.to(torch.float64) * w[:, None]).t() @ in_factors.to(torch.float64)
    return weight.abs().to(torch.float64) * r / w.sum()


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


def select_from_scores(s: torch.Tensor | list[torch.Tensor], k: int
                       ) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor]:
    """The k lowest scores (ties by lower flat index; over a list: by list order, then flat
    index) as packed masks, and int64 stats [threshold key, count below it, ties taken]
    (threshold key -1 when k = 0)."""
    many = isinstance(s, (list, tuple))
    parts = list(s) if many else [s]
    keys = torch.cat([score_keys(p) for p in parts]) if parts else torch.zeros(0, dtype=torch.int64)
    n = keys.numel()
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    order = torch.sort(keys, stable=True).indices
    flat = torch.zeros(n, dtype=torch.bool, device=keys.device)
    flat[order[:k]] = True
    if k:
        t = int(keys[order[k - 1]])
        below = int((keys < t).sum())
        stats = torch.tensor([t, below, k - below], dtype=torch.int64)
    else:
        stats = torch.tensor([-1, 0, 0], dtype=torch.int64)
    masks, start = [], 0
    for p in parts:
        masks.append(pack_mask(flat[start:start + p.numel()]))
        start += p.numel()
    return (masks if many else masks[0]), stats


def select_mask(weight: torch.Tensor, out_factors: torch.Tensor, in_factors: torch.Tensor,
                batch_weights: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed mask of the k lowest scores and its stats (see `select_from_scores`)."""
    return select_from_scores(scores(weight, out_factors, in_factors, batch_weights), k)


def select_masks_global(weights: list[torch.Tensor], out_factors: list[torch.Tensor],
                        in_factors: list[torch.Tensor], batch_weights: list[torch.Tensor],
                        k: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One threshold over all layers: concatenate the scores and sort."""
    s = [scores(*args) for args in zip(weights, out_factors, in_factors, batch_weights)]
    return select_from_scores(s, k)
