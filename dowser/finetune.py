"""A small, plain fine-tuning loop and the forgetting metrics, shared by `dowser demo` and
bench/forgetting.py. Real training code should use its own loop or HF Trainer (see README)."""

from __future__ import annotations

import random
from typing import Any, Callable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from dowser.tasks import Example, answer_logits, collate, task_accuracy, upstream_metrics


def hscore(a_up: float, a_down: float) -> float:
    """Harmonic mean of upstream and downstream accuracy (the paper's H-score)."""
    return 0.0 if a_up + a_down == 0 else 2 * a_up * a_down / (a_up + a_down)


def evaluate(model: torch.nn.Module, up_chunks: torch.Tensor, down_examples: Sequence[Example],
             pad_id: int) -> dict[str, float]:
    """A_up (next-token accuracy on held-out text), CE_up (its cross-entropy, nats/token),
    A_down (exact match), down_token_acc, Avg and H-score."""
    up = upstream_metrics(model, up_chunks)
    down = task_accuracy(model, down_examples, pad_id)
    a_up, a_down = up["acc"], down["exact_match"]
    return {"A_up": a_up, "CE_up": up["ce"], "A_down": a_down, "down_token_acc": down["token_acc"],
            "Avg": (a_up + a_down) / 2, "H": hscore(a_up, a_down)}


def train(model: torch.nn.Module, examples: Sequence[Example], optimizer: torch.optim.Optimizer,
          *, steps: int, batch_size: int, pad_id: int, seed: int = 0, grad_clip: float | None = 1.0,
          progress: bool = True, desc: str = "fine-tune", checkpoints: Sequence[int] = (),
          on_checkpoint: Callable[[int], None] | None = None) -> list[float]:
    """Train on answer-token cross-entropy for `steps` steps; returns the loss per step.

    Batches are drawn from `examples` by a generator seeded with `seed` (the same batches for
    every method at one seed). After step s for each s in `checkpoints`, `on_checkpoint(s)` is
    called (e.g. to measure A_down along training); its time is not the training's."""
    if steps < 0 or batch_size < 1 or batch_size > len(examples):
        raise ValueError(f"need steps >= 0 and 1 <= batch_size <= {len(examples)} examples, "
                         f"got steps={steps}, batch_size={batch_size}")
    rng = random.Random(seed)
    device = next(model.parameters()).device
    params = [p for g in optimizer.param_groups for p in g["params"]]
    pool = list(examples)
    marks = set(checkpoints)
    model.train()
    losses = []
    bar = tqdm(range(1, steps + 1), desc=desc, disable=not progress, leave=False)
    for step in bar:
        batch = collate(rng.sample(pool, batch_size), pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits, target, _ = answer_logits(model, batch)
        loss = torch.nn.functional.cross_entropy(logits.float(), target)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if step in marks and on_checkpoint is not None:
            on_checkpoint(step)
            model.train()
    model.eval()
    return losses


def random_masks(like: Mapping[str, torch.Tensor], shapes: Mapping[str, Sequence[int]], rho: float,
                 seed: int) -> dict[str, torch.Tensor]:
    """Baseline masks: exactly the same k = floor(rho*n + 0.5) entries per matrix, chosen at random."""
    from dowser._checks import check_rho
    from dowser.ops import pack_mask

    rho = check_rho(rho)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in like:
        n = 1
        for s in shapes[name]:
            n *= int(s)
        k = int(rho * n + 0.5)
        flat = torch.zeros(n, dtype=torch.bool)
        flat[torch.randperm(n, generator=gen)[:k]] = True
        out[name] = pack_mask(flat.view(tuple(shapes[name]))).to(like[name].device)
    return out


def freeze_outside(model: torch.nn.Module, trainable: Any) -> None:
    """requires_grad=True exactly for the parameters whose names are in `trainable`."""
    names = set(trainable)
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
