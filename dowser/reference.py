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
