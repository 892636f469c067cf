"""Plain-PyTorch oracles, one per op: the fallback backend and the ground truth of every test.

Written for clarity, not speed or memory; every kernel must agree with these bit for bit
(masks) or within stated tolerances (floating-point results). Nothing at runtime imports
helpers from here: shared definitions (score keys, word offsets) live in dowser/_bits.py.
"""

from __future__ import annotations

import math

import torch

# Definitions the oracles share with the runtime (re-exported for the tests' convenience).
from dowser._bits import (count_trainable, key_to_float, score_factors, score_keys,  # noqa: F401
                          word_offsets)
from dowser._checks import masters_per_param

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


def scores(weight: torch.Tensor, out_factors: torch.Tensor, in_factors: torch.Tensor,
           batch_weights: torch.Tensor) -> torch.Tensor:
    """Materialised fp32 score matrix (d_out, d_in)."""
    pw, a = score_factors(out_factors, in_factors, batch_weights)
    # The rank-B product in fp64, rounded once to fp32: an fp32 matmul on a GPU follows the
    # global TF32 switch (HF `tf32=True`, torch.set_float32_matmul_precision("high")), which
    # would break this fallback's 1e-5-versus-fp64 contract; fp64 never uses TF32, and needs
    # no change of (or race on) global state.
    r = (pw.t().to(torch.float64) @ a.to(torch.float64)).to(torch.float32)
    return weight.abs().to(torch.float32) * r


def scores64(weight: torch.Tensor, out_factors: torch.Tensor, in_factors: torch.Tensor,
             batch_weights: torch.Tensor) -> torch.Tensor:
    """The same scores in fp64 (the exact-arithmetic oracle of the tests)."""
    w = batch_weights.to(torch.float64)
    r = (out_factors.to(torch.float64) * w[:, None]).t() @ in_factors.to(torch.float64)
    return weight.abs().to(torch.float64) * r / w.sum()


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
        stats = torch.tensor([t, below, k - below], dtype=torch.int64, device=keys.device)
    else:
        stats = torch.tensor([-1, 0, 0], dtype=torch.int64, device=keys.device)
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


# ---- masked optimizer steps (issue 5) ---------------------------------------------------------

def _trainable_index(param: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if mask is None else unpack_mask(mask, param.numel())


def count_nonfinite(grads: list[torch.Tensor], masks: list[torch.Tensor | None]) -> torch.Tensor:
    """Per tensor: number of NaN/Inf gradient entries that are trainable (masks[i] None: every
    entry is)."""
    device = grads[0].device if len(grads) else torch.device("cpu")
    bad = torch.zeros(len(grads), dtype=torch.int64, device=device)
    for i, (g, mask) in enumerate(zip(grads, masks)):
        flat = g.reshape(-1)
        idx = _trainable_index(g, mask)
        sel = flat if idx is None else flat[idx]
        bad[i] = (~torch.isfinite(sel)).sum()
    return bad


def _gather(p: torch.Tensor, g: torch.Tensor, mask: torch.Tensor | None, maximize: bool,
            master: torch.Tensor | None = None, compact: bool = False):
    """(trainable flat index or None, their fp32 gradients (negated to maximize), their fp32
    parameter values: read from the fp32 master copy when there is one)."""
    idx = _trainable_index(p, mask)
    gf = g.reshape(-1)
    gf = (gf if idx is None else gf[idx]).float()
    if maximize:
        gf = -gf
    if master is not None:
        return idx, gf, _state_view(master, idx, compact).clone()
    pf = p.reshape(-1)
    return idx, gf, (pf if idx is None else pf[idx]).float()


def _state_view(state: torch.Tensor, idx: torch.Tensor | None, compact: bool) -> torch.Tensor:
    flat = state.view(-1)
    return flat if (compact or idx is None) else flat[idx]


def _put(state: torch.Tensor, idx: torch.Tensor | None, compact: bool, new: torch.Tensor,
         sel: torch.Tensor | None = None) -> None:
    """Write the fp32 values `new` of the trainable entries (or of their subset `sel`,
    positions counted among the trainable entries) into a compact or dense state tensor."""
    flat = state.view(-1)
    if sel is None:
        if compact or idx is None:
            flat.copy_(new)
        else:
            flat[idx] = new
        return
    if compact or idx is None:
        flat[sel] = new
    else:
        flat[idx.nonzero().squeeze(1)[sel]] = new


def _write_back(param: torch.Tensor, idx: torch.Tensor | None, new: torch.Tensor,
                sel: torch.Tensor | None = None) -> None:
    """Assign fp32 values, rounded to the parameter dtype (round to nearest even), to the
    trainable entries only (or their subset `sel`); frozen entries are never touched."""
    if sel is None and idx is None:
        param.copy_(new.view(param.shape).to(param.dtype))
        return
    where = idx if sel is None else (sel if idx is None else idx.nonzero().squeeze(1)[sel])
    if param.is_contiguous():
        param.view(-1)[where] = new.to(param.dtype)
    else:
        flat = param.reshape(-1).clone()
        flat[where] = new.to(param.dtype)
        param.copy_(flat.view(param.shape))


def masked_adamw_(params: list[torch.Tensor], grads: list[torch.Tensor],
                  exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
                  masks: list[torch.Tensor | None], offsets: list[torch.Tensor | None],
                  steps: list[float], lr: float, beta1: float, beta2: float, eps: float,
                  weight_decay: float, maximize: bool, skip_nonfinite: bool = False,
                  masters: list[torch.Tensor] | None = None,
                  has_master: list[bool] | None = None) -> torch.Tensor:
    """AdamW on the trainable entries only (PyTorch's fused AdamW math order, fp32 math).

    Per tensor i: masks[i] None = every entry trains; offsets[i] given = compact fp32 state of
    the k trainable entries (in flat order), else state shaped like the parameter. masters: the
    fp32 master copies that exist, in parameter order (has_master[i]: params[i] has the next
    one; has_master None: every parameter has one, or none does); a master is laid out
    exactly like exp_avgs[i], and the step then reads the
    parameter value from it, writes the new fp32 value back to it and the value rounded to the
    parameter dtype to the parameter (so updates below half an ulp of a bf16 parameter are
    kept). Returns the per-tensor count of NaN/Inf gradients in trainable entries; when any is
    non-zero nothing was written. With `skip_nonfinite`, the finite entries are updated all the
    same and the NaN/Inf ones keep their param, master and state bits.
    """
    per_param = masters_per_param(masters, has_master, len(params))
    bad = count_nonfinite(grads, masks)
    if bool(bad.any()) and not skip_nonfinite:
        return bad
    for p, g, m, v, mask, off, step, w in zip(params, grads, exp_avgs, exp_avg_sqs, masks, offsets,
                                             steps, per_param):
        compact = off is not None
        idx, gf, pf = _gather(p, g, mask, maximize, w, compact)
        mf = _state_view(m, idx, compact).clone()
        vf = _state_view(v, idx, compact).clone()
        bc1 = 1.0 - beta1 ** step
        bc2_sqrt = math.sqrt(1.0 - beta2 ** step)
        step_size = lr / bc1
        pf = pf * (1.0 - lr * weight_decay)
        mf = mf + (1.0 - beta1) * (gf - mf)  # lerp(m, g, 1 - beta1)
        vf = beta2 * vf + (1.0 - beta2) * (gf * gf)
        # Correctly rounded sqrt (via fp64, exact after rounding back): torch's fp32 CPU sqrt
        # may be 1 ulp off, and the kernels use the IEEE instruction.
        denom = vf.double().sqrt().float() / bc2_sqrt + eps
        pf = pf - step_size * mf / denom
        sel = None
        if skip_nonfinite:
            ok = torch.isfinite(gf)
            if not bool(ok.all()):  # keep the old bits of the skipped entries
                sel = torch.arange(gf.numel(), device=gf.device)[ok]
                pf, mf, vf = pf[ok], mf[ok], vf[ok]
        _write_back(p, idx, pf, sel)
        if w is not None:
            _put(w, idx, compact, pf, sel)
        _put(m, idx, compact, mf, sel)
        _put(v, idx, compact, vf, sel)
    return bad


def masked_sgd_(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor],
                masks: list[torch.Tensor | None], offsets: list[torch.Tensor | None],
                first: list[bool], lr: float, momentum: float, dampening: float,
                weight_decay: float, nesterov: bool, maximize: bool,
                masters: list[torch.Tensor] | None = None,
                has_master: list[bool] | None = None) -> torch.Tensor:
    """SGD (torch.optim.SGD's math) on the trainable entries only, fp32 math.

    `bufs` is empty when momentum is 0, else one fp32 momentum buffer per tensor (compact when
    offsets[i] is given); first[i] = the buffer is fresh (it is then set to the update, as
    torch does). masters, has_master: fp32 master copies (compact when offsets[i] is given),
    passed, read and written as in `masked_adamw_`. Returns per-tensor NaN/Inf counts; nothing is
    written when any is non-zero.
    """
    per_param = masters_per_param(masters, has_master, len(params))
    bad = count_nonfinite(grads, masks)
    if bool(bad.any()):
        return bad
    for i, (p, g, mask, off, w) in enumerate(zip(params, grads, masks, offsets, per_param)):
        compact = off is not None
        idx, gf, pf = _gather(p, g, mask, maximize, w, compact)
        d = gf + weight_decay * pf if weight_decay != 0 else gf
        if momentum != 0:
            buf = bufs[i]
            bf = d.clone() if first[i] else momentum * _state_view(buf, idx, compact) + (1.0 - dampening) * d
            _put(buf, idx, compact, bf)
            d = d + momentum * bf if nesterov else bf
        new = pf - lr * d
        _write_back(p, idx, new)
        if w is not None:
            _put(w, idx, compact, new)
    return bad
