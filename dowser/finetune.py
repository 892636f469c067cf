"""A small, plain fine-tuning loop and the forgetting metrics, shared by `dowser demo` and
bench/forgetting.py. Real training code should use its own loop or HF Trainer (see README)."""

from __future__ import annotations

import random
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from dowser.tasks import Example, collate, next_token_accuracy, task_accuracy


def hscore(a_up: float, a_down: float) -> float:
    """Harmonic mean of upstream and downstream accuracy (the paper's H-score)."""
    return 0.0 if a_up + a_down == 0 else 2 * a_up * a_down / (a_up + a_down)


def evaluate(model: torch.nn.Module, up_chunks: torch.Tensor, down_examples: Sequence[Example],
             pad_id: int) -> dict[str, float]:
    """A_up (next-token accuracy on held-out text), A_down (exact match), Avg and H-score."""
    a_up = next_token_accuracy(model, up_chunks)
    down = task_accuracy(model, down_examples, pad_id)
    a_down = down["exact_match"]
    return {"A_up": a_up, "A_down": a_down, "down_token_acc": down["token_acc"],
            "Avg": (a_up + a_down) / 2, "H": hscore(a_up, a_down)}


def train(model: torch.nn.Module, examples: Sequence[Example], optimizer: torch.optim.Optimizer,
          *, steps: int, batch_size: int, pad_id: int, seed: int = 0, grad_clip: float | None = 1.0,
          progress: bool = True, desc: str = "fine-tune") -> list[float]:
    """Train on answer-token cross-entropy for `steps` steps; returns the loss per step."""
    rng = random.Random(seed)
    device = next(model.parameters()).device
    params = [p for g in optimizer.param_groups for p in g["params"]]
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for _ in bar:
        batch = collate(rng.sample(list(examples), batch_size), pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = model(**batch).loss
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def freeze_outside(model: torch.nn.Module, trainable: Any) -> None:
    """requires_grad=True exactly for the parameters whose names are in `trainable`."""
    names = set(trainable)
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
