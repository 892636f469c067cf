"""The probing pass: one forward per batch with hooks, R backwards through the retained graph.

For every targeted linear layer z = W h, `probe` estimates per probe batch b

    psi_b[i] = mean over Rademacher draws r, sequences and tokens of |d(xi_r^T f)/d z_i|   (L1)
    a_b[j]   = mean over sequences and tokens of |h_j|

where f are the last-position logits (gradients w.r.t. the layer outputs only: no parameter
gradient is ever computed or kept). The score of W_ij is |W_ij| * sum_b w_b psi_b[i] a_b[j] /
sum_b w_b; it is never materialised here: `dowser.build_masks` hands the factors to the ops.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from contextlib import contextmanager
from typing import Any, Callable, Sequence

import torch
from torch import nn

from dowser._artifacts import model_identity
from dowser.probe.batches import (Batch, check_image_probes, image_probe_inputs, make_batches,
                                  select_batches)
from dowser.probe.draws import rademacher_one
from dowser.probe.prompts import logits_of, model_device
from dowser.probe.stats import ProbeEntry, ProbeStats
from dowser.probe.targets import decoder_layers, find_targets, layer_dims, projector_inputs


def _token_mean(x: torch.Tensor, token_mask: torch.Tensor | None, acc_dtype: torch.dtype,
                square: bool = False) -> torch.Tensor:
    """Mean over every dim but the last of |x| (or x^2), over real tokens only when masked."""
    x = x.to(acc_dtype)
    x = x * x if square else x.abs()
    flat = x.reshape(-1, x.shape[-1])
    if token_mask is not None and token_mask.numel() == flat.shape[0]:
        w = token_mask.reshape(-1).to(device=x.device, dtype=acc_dtype)
        return (w @ flat) / w.sum().clamp_min(1)
    return flat.mean(dim=0)


@contextmanager
def _probing_state(model: nn.Module):
    """Eval mode and no parameter requiring grad (the graph starts at the targets' inputs, see
    `_probe_pass`), so no parameter gradient is ever computed and the graph saves no layer
    input for one; mode and requires_grad restored afterwards, whatever happens."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


@contextmanager
def _recompute_layers(model: nn.Module, modules: dict[str, nn.Module]):
    """Checkpoint every decoder layer that holds a target (non-reentrant torch.utils.checkpoint)
    while active: the retained graph then keeps only those layers' inputs, and each of the R
    backward passes recomputes one layer's activations at a time. Peak memory drops from
    L layers of activations to one; time grows by about one forward of the probed layers per
    draw."""
    try:
        prefix, layer_list = decoder_layers(model)
    except ValueError:
        yield
        return
    from torch.utils.checkpoint import checkpoint

    patched = []
    for i, layer in enumerate(layer_list):
        if not any(n.startswith(f"{prefix}.{i}.") for n in modules):
            continue
        own = "forward" in layer.__dict__
        orig = layer.forward

        def forward(*args, _orig=orig, **kwargs):
            return checkpoint(_orig, *args, use_reentrant=False, **kwargs)

        layer.forward = forward
        patched.append((layer, own, orig))
    try:
        yield
    finally:
        for layer, own, orig in patched:
            if own:
                layer.forward = orig
            else:
                del layer.forward


def _accepts(model: nn.Module, kwarg: str) -> bool:
    try:
        return kwarg in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _probe_pass(model: nn.Module, modules: dict[str, nn.Module], batch: Batch,
                inputs: dict[str, torch.Tensor], n_rademacher: int, estimator: str, seed: int,
                logits_to_keep: bool, draws: Callable[..., torch.Tensor] | None
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One forward with hooks + R backwards through the retained graph for one batch.
    Returns name -> (psi (d_out,), a (d_in,), a_sq (d_in,)) in the accumulation dtype, a_sq
    being the token mean of h^2 (wanda's input norm), taken from the same forward."""
    dev = model_device(model)
    a_sum: dict[str, torch.Tensor] = {}
    sq_sum: dict[str, torch.Tensor] = {}
    a_cnt: dict[str, int] = {n: 0 for n in modules}
    tmask = batch.token_mask.to(dev) if batch.token_mask is not None else None
    acc_dtype = torch.float64 if next(iter(modules.values())).weight.dtype == torch.float64 \
        else torch.float32
    # accumulators live with each layer (models split across devices keep working)
    psi = {n: torch.zeros(layer_dims(m)[0], dtype=acc_dtype, device=m.weight.device)
           for n, m in modules.items()}
    square = estimator == "l2"
    leaves: list[torch.Tensor] = []   # where the graph starts (see pre_hook)
    outputs: list[torch.Tensor] = []  # targets' outputs, kept only when there is no leaf
    n_reached = [0]
    recording = [True]  # False while backward recomputes checkpointed layers

    def pre_hook(mod, args):
        # Start the graph here: a target whose input does not need grad gets it as a fresh leaf,
        # so everything downstream (all that J_i depends on) is recorded, nothing upstream, and
        # no parameter needs grad. (A recomputation makes the same graph, so it gets a leaf too.)
        if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point() \
                and not args[0].requires_grad:
            leaf = args[0].detach().requires_grad_(True)
            if recording[0]:
                leaves.append(leaf)
            return (leaf,) + tuple(args[1:])
        return None

    def make_hook(name):
        def grad_hook(g):
            # Reduce dL/dz to its per-feature token mean as soon as autograd produces it, so
            # no layer's full output gradient outlives its own backward step.
            psi[name] += _token_mean(g, tmask, acc_dtype, square=square)

        def hook(mod, args, out):
            if not recording[0]:
                return
            h = args[0] if args else None
            if isinstance(h, torch.Tensor):
                a = _token_mean(h.detach(), tmask, acc_dtype)
                sq = _token_mean(h.detach(), tmask, acc_dtype, square=True)
                a_sum[name] = a if name not in a_sum else a_sum[name] + a
                sq_sum[name] = sq if name not in sq_sum else sq_sum[name] + sq
                a_cnt[name] += 1
            if isinstance(out, torch.Tensor) and out.requires_grad:
                out.register_hook(grad_hook)
                outputs.append(out)
                n_reached[0] += 1
        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in modules.items()]
    handles += [m.register_forward_pre_hook(pre_hook) for m in modules.values()]
    try:
        kwargs = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        if "pixel_values" in kwargs:
            kwargs["pixel_values"] = kwargs["pixel_values"].to(next(model.parameters()).dtype)
        if logits_to_keep:
            kwargs["logits_to_keep"] = 1
        if _accepts(model, "use_cache"):
            kwargs.setdefault("use_cache", False)  # no KV cache to build while probing
        with torch.enable_grad(), _recompute_layers(model, modules):
            out = model(**kwargs)
        recording[0] = False
        f = logits_of(out)[:, -1, :]
        del out
        if leaves:
            outputs.clear()  # the hooks live on the graph; the outputs themselves may be freed
        grad_inputs = leaves or outputs
        n_rows, vocab = f.shape
        xi = draws(batch.index, n_rademacher, n_rows, vocab) if draws is not None else None
        if n_reached[0] and not f.requires_grad:
            raise RuntimeError("the logits do not depend on the probed layers' outputs")
        for r in range(n_rademacher):
            if not n_reached[0]:
                break
            with torch.enable_grad():
                x = xi[r] if xi is not None else rademacher_one(seed, batch.index, r, n_rows,
                                                                 vocab)
                loss = (x.to(device=f.device, dtype=f.dtype) * f).sum() / n_rows
                torch.autograd.grad(loss, grad_inputs, retain_graph=r < n_rademacher - 1,
                                    allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    del f, leaves, outputs, grad_inputs
    result = {}
    for n, mod in modules.items():
        p = psi[n] / n_rademacher
        if square:
            p = p.sqrt()
        d_in = layer_dims(mod)[1]
        if a_cnt[n]:
            a = a_sum[n].to(mod.weight.device) / a_cnt[n]
            sq = sq_sum[n].to(mod.weight.device) / a_cnt[n]
        else:
            a = sq = torch.zeros(d_in, dtype=acc_dtype, device=mod.weight.device)
        result[n] = (p, a, sq)
    return result


def probe(model: nn.Module, tokenizer: Any = None, *, layers: int | None = None,
          targets: Sequence[str] | str | None = None, n_samples: int = 64, batch_size: int = 4,
          n_rademacher: int = 8, seq_len: int = 64, estimator: str = "l1", seed: int = 0,
          prompts: Sequence[str] | torch.Tensor | None = None, dataloader: Iterable | None = None,
          include_projector: bool = False, include_lm_head: bool = False,
          include_vision: bool = False, progress: bool = True,
          distributed: bool | None = None,
          draws: Callable[[int, int, int, int], torch.Tensor] | None = None,
          only_batches: Sequence[int] | None = None) -> ProbeStats:
    """Probe `model` and return the low-rank score factors of every targeted linear layer.

    Args:
        model: a Hugging Face model (or any module whose forward takes input_ids and returns
            logits (batch, tokens, vocab)); fp32, fp16 or bf16; any device.
        tokenizer: optional; without it the vocabulary and BOS/EOS/pad ids come from the config.
        layers: probe the last `layers` decoder layers (default: all).
        targets: explicit module names (list) or a regex over linear-module names.
        n_samples: number of synthetic prompts (ignored with prompts/dataloader, which are used
            whole).
        batch_size: sequences per probe batch (one forward each).
        n_rademacher: R, Rademacher draws (backward passes) per batch.
        seq_len: length of the synthetic prompts (truncation length of string prompts).
        estimator: "l1" (mean |xi^T J_i|, the paper's default) or "l2" (sqrt of mean squares).
        seed: every random draw of batch b (prompt, xi, noise pixels) derives from (seed, b).
        prompts: strings (with a tokenizer) or an n x L LongTensor of token ids: real-data mode.
        dataloader: an iterable of dicts of model inputs: real-data mode.
        include_projector / include_lm_head / include_vision: also probe those (projector and
            vision tower with Gaussian-noise image probes; Llava-style models only).
        progress: show a tqdm bar over batches (on rank 0 only when distributed).
        distributed: split the batches over the ranks of the initialised process group and
            all-gather the factors (default: whenever one with more than one rank exists).
            Batch b goes to rank b % world; with prompts or synthetic probing every rank then
            holds exactly the ProbeStats of one process. With a dataloader each rank probes
            what its own loader yields (shard it, e.g. with a DistributedSampler) and the
            batches are gathered in rank order. Probe the plain model, before wrapping it in
            DDP or fully_shard: ranks run different numbers of forward passes.
        draws: replaces the Rademacher vectors: `draws(b, R, n_rows, vocab)` returns the
            (R, n_rows, vocab) tensor of batch b (e.g. to probe with your own vectors, or to
            compare with another implementation on the same draws). Default:
            `dowser.probe.rademacher(seed, b, R, n_rows, vocab)`, drawn one vector at a time.
        only_batches: probe only these synthetic batches, in this order (batch b is the same
            whatever else is probed: every draw derives from (seed, b)); no distribution.

    Returns:
        ProbeStats: module name -> ProbeEntry(out_factors (B, d_out), in_factors (B, d_in),
        batch_weights (B,)), fp32 on each layer's device. The projector's input factor and the
        lm_head's output factor are ones (the authors' boundary rule).
    """
    if estimator not in ("l1", "l2"):
        raise ValueError(f"estimator must be 'l1' or 'l2', got {estimator!r}")
    for arg, val in (("n_samples", n_samples), ("batch_size", batch_size),
                     ("n_rademacher", n_rademacher), ("seq_len", seq_len)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{arg} must be a positive int, got {val!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if draws is not None and not callable(draws):
        raise ValueError(f"draws must be a callable (b, R, n_rows, vocab) -> tensor, got {draws!r}")
    roles = find_targets(model, layers=layers, targets=targets,
                         include_projector=include_projector, include_lm_head=include_lm_head,
                         include_vision=include_vision)
    named = dict(model.named_modules())
    modules = {n: named[n] for n in roles}
    synthetic = prompts is None and dataloader is None
    # Data-free: text prompts cannot reach the projector or vision tower, so those get their
    # own pass with noise-image probes. Real data: the user's inputs reach whatever they reach.
    image_roles = ("projector", "vision") if synthetic else ()
    text_mods = {n: m for n, m in modules.items() if roles[n] not in image_roles}
    image_mods = {n: m for n, m in modules.items() if roles[n] in image_roles}
    if image_mods:
        check_image_probes(model)
    # Keep only the last position's logits when nothing needs the others (saves the lm_head
    # matmul and its backward over every token).
    keep_last = "lm_head" not in roles.values() and _accepts(model, "logits_to_keep")

    from tqdm.auto import tqdm

    from dowser import distributed as dd

    if distributed is None:
        distributed = dd.is_active()
    rank, world = dd.rank_and_world() if distributed and only_batches is None else (0, 1)
    with _probing_state(model):
        # Draw the synthetic prompts in eval mode with nothing requiring grad.
        mode, batches, total = make_batches(model, tokenizer, n_samples=n_samples,
                                        batch_size=batch_size, seq_len=seq_len, seed=seed,
                                        prompts=prompts, dataloader=dataloader)
        if only_batches is not None:
            if mode != "synthetic":
                raise ValueError("only_batches applies to synthetic probing only")
            batches = select_batches(model, tokenizer, only_batches, n_samples, batch_size,
                                     seq_len, seed)
            total = len(only_batches)
        elif world > 1 and mode == "synthetic":  # generate only this rank's prompts
            mine = list(range(rank, total, world))
            batches = select_batches(model, tokenizer, mine, n_samples, batch_size, seq_len, seed)
            total = len(mine)
        elif world > 1 and mode == "prompts":
            batches = (b for b in batches if b.index % world == rank)
            total = len(range(rank, total, world))
        # per layer: the per-batch rows of psi, a and a_sq
        rows: dict[str, tuple[list[torch.Tensor], ...]] = {n: ([], [], []) for n in modules}
        weights: list[float] = []
        indices: list[int] = []
        for batch in tqdm(batches, total=total, disable=not progress or rank != 0,
                          desc="dowser probe", unit="batch"):
            results = {}
            if text_mods:
                results.update(_probe_pass(model, text_mods, batch, batch.inputs, n_rademacher,
                                           estimator, seed, keep_last, draws))
            if image_mods:
                img_inputs = image_probe_inputs(model, batch, seed)
                results.update(_probe_pass(model, image_mods, batch, img_inputs, n_rademacher,
                                           estimator, seed, False, draws))
            for n in modules:
                for acc, value in zip(rows[n], results[n]):
                    acc.append(value.float())
            weights.append(float(batch.n_rows))
            indices.append(batch.index)
    if world > 1:
        rows, weights = _gather_factors(rows, weights, indices, order_by_index=mode != "dataloader",
                                        device=model_device(model))
    if not weights:
        raise ValueError("no probe batches: prompts/dataloader gave nothing")
    dev = model_device(model)
    bw = torch.tensor(weights, dtype=torch.float32, device=dev)
    entries = {}
    for n in modules:
        psi, a, sq = (torch.stack(r) for r in rows[n])
        if roles[n] == "projector" and n in projector_inputs(
                model, [m for m in modules if roles[m] == "projector"]):
            a = torch.ones_like(a)  # boundary rule: the projector's input factor is ones
        if roles[n] == "lm_head":
            psi = torch.ones_like(psi)  # boundary rule: the lm_head's output factor is ones
        entries[n] = ProbeEntry(psi, a, bw.to(psi.device).clone(), sq)
    meta = {
        "n_samples": int(sum(weights)), "n_batches": len(weights), "n_rademacher": n_rademacher,
        "estimator": estimator, "seed": seed, "seq_len": seq_len, "batch_size": batch_size,
        "mode": mode, "roles": roles, **model_identity(model),
    }
    return ProbeStats(entries, meta)


def _gather_factors(rows: dict[str, tuple[list[torch.Tensor], ...]], weights: list[float],
                    indices: list[int], order_by_index: bool, device: torch.device):
    """Every rank's per-batch factor rows, in batch-index order (or rank order): one
    all-gather of a (local batches x (2 + all factor widths)) fp64 table."""
    from dowser import distributed as dd

    names = list(rows)
    widths = [r[0].shape[-1] if r else 0 for n in names for r in rows[n]]
    # ranks without a batch learn the widths from the others
    widths = torch.cat(dd.all_gather_rows(torch.tensor([widths]))).amax(0).tolist()
    local = torch.zeros(len(weights), 2 + sum(widths), dtype=torch.float64)
    for b in range(len(weights)):
        cols = [torch.tensor([float(indices[b]), weights[b]], dtype=torch.float64)]
        cols += [r[b].double().cpu().reshape(-1) for n in names for r in rows[n]]
        local[b] = torch.cat(cols)
    table = torch.cat(dd.all_gather_rows(local))
    if order_by_index:
        table = table[torch.argsort(table[:, 0], stable=True)]
    cols = iter(table[:, 2:].split(widths, dim=1))
    out = {}
    for n in names:
        dev = rows[n][0][0].device if rows[n][0] else device
        out[n] = tuple(list(next(cols).float().to(dev).unbind(0)) for _ in rows[n])
    return out, table[:, 1].tolist()
