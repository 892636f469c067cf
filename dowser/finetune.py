"""A small, plain fine-tuning loop and the forgetting metrics, shared by `dowser demo` and
bench/forgetting.py. Real training code should use its own loop or HF Trainer (see README)."""

from __future__ import annotations

import inspect
import random
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dowser.optim import MaskedAdamW
from dowser.tasks import Example, collate, task_accuracy, upstream_metrics


def hscore(a_up: float, a_down: float) -> float:
    """Harmonic mean of upstream and downstream accuracy (the paper's H-score)."""
    return 0.0 if a_up + a_down == 0 else 2 * a_up * a_down / (a_up + a_down)


def evaluate(model: torch.nn.Module, up_chunks: torch.Tensor, down_examples: Sequence[Example],
             pad_id: int, progress: bool = False) -> dict[str, float]:
    """A_up (next-token accuracy on held-out text), CE_up (its cross-entropy, nats/token),
    A_down (teacher-forced accuracy on the answer tokens), A_down_exact (exact match of whole
    answers), Avg and H-score.

    A_down is the token accuracy, not exact match: exact match stays at 0 until a method has
    learned the whole task, so at short budgets every H-score would be 0 and no two methods
    could be told apart; token accuracy moves from the first steps on (zero-shot ~0.1)."""
    up = upstream_metrics(model, up_chunks, progress=progress)
    down = task_accuracy(model, down_examples, pad_id, progress=progress)
    a_up, a_down = up["acc"], down["token_acc"]
    return {"A_up": a_up, "CE_up": up["ce"], "A_down": a_down, "A_down_exact": down["exact_match"],
            "Avg": (a_up + a_down) / 2, "H": hscore(a_up, a_down)}


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    # a PEFT wrapper's forward passes **kwargs through to the model it wraps
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


def answer_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the labelled (answer) tokens of `batch` (input_ids, attention_mask,
    labels with -100 elsewhere), as `model(**batch).loss` computes it.

    Only the positions that predict a labelled token go through the output head: with a
    49k-token vocabulary the head and its backward are a large share of a short-sequence
    step, and prompt positions need no logits. Models whose forward has no `logits_to_keep`
    (Hugging Face causal LMs have it) fall back to `model(**batch).loss`.
    """
    if not _accepts_logits_to_keep(model):
        return model(**batch).loss
    labels = batch["labels"]
    target = labels[:, 1:]  # logits at position t predict the token at t + 1
    keep = (target != -100).any(0).nonzero().squeeze(1)  # union over the batch's rows
    if keep.numel() == 0:
        return model(**batch).loss
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, logits_to_keep=keep).logits
    # fp32 logits and a mean over labelled tokens, like transformers' ForCausalLMLoss
    return F.cross_entropy(logits.float().flatten(0, 1), target[:, keep].flatten(),
                           ignore_index=-100)


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
        loss = answer_loss(model, batch)
        loss.backward()
        finite = False
        if grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
            finite = bool(torch.isfinite(norm))
        if finite and isinstance(optimizer, MaskedAdamW):
            # a finite total norm proves every gradient finite: no second NaN/Inf pass
            optimizer.step(grads_finite=True)
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if step in marks and on_checkpoint is not None:
            on_checkpoint(step)
            model.train()
    model.eval()
    return losses


def freeze_outside(model: torch.nn.Module, trainable: Any) -> None:
    """requires_grad=True exactly for the parameters whose names are in `trainable`."""
    names = set(trainable)
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
