"""Continual learning on SmolLM2-135M: three ciphers learnt one after another (the paper's
appendix H in miniature).

    python bench/continual.py                          # the default budget (a few CPU minutes)
    python bench/continual.py --steps 200 --layers 8 --device cuda

Tasks: the ciphers "alpha", "beta", "gamma" of dowser.tasks.CIPHERS (each digit -> a letter,
the prompt names the cipher), learnt in that order. After every stage each task's accuracy
(teacher-forced token accuracy on its answer tokens; exact match in the CSV too) and A_up
(next-token top-1 accuracy on held-out stdlib prose) are measured. Methods:

- full FT: AdamW on every parameter of the last L layers, stage after stage;
- dowser: at every stage a fresh data-free probe of the current model and new masks
  (dowser.prepare), MaskedAdamW; nothing protects the entries earlier tasks trained;
- dowser + protect: the same, but stage t's masks avoid the entries of stages < t
  (dowser.prepare(protect=...)), so those stay frozen.

The two dowser runs share stage 1 (the same masks and training, run once) and from stage 2 on
train only masked entries (the 1-D norms of the tuned layers are frozen in both, as
prepare(protect=) does), so they differ only in the protection.
BWT = mean over tasks j < T of (acc_j after the last stage - acc_j after stage j); the paper's
definition. Results: bench/results/continual-<device>.{md,csv,png}.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, pyplot, write_results  # noqa: E402

import dowser  # noqa: E402
from dowser.demo import last_layer_params, load_smollm2  # noqa: E402
from dowser.finetune import freeze_outside, train  # noqa: E402
from dowser.tasks import (CIPHERS, named_cipher_examples, next_token_accuracy,  # noqa: E402
                          task_accuracy, upstream_chunks)

TASKS = list(CIPHERS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=16, help="training steps per task")
    ap.add_argument("--layers", type=int, default=2, help="last L decoder layers tuned")
    ap.add_argument("--rho", type=float, default=0.2)
    ap.add_argument("--lr-full", type=float, default=3e-4)
    ap.add_argument("--lr-sparse", type=float, default=3e-3)
    ap.add_argument("--n-samples", type=int, default=4, help="data-free probe prompts per stage")
    ap.add_argument("--n-rademacher", type=int, default=2)
    ap.add_argument("--probe-seq-len", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--digits", type=int, nargs=2, default=[2, 3], help="min and max digits")
    ap.add_argument("--n-test", type=int, default=24, help="test examples per task")
    ap.add_argument("--up-chunks", type=int, default=2, help="128-token chunks for A_up")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--methods", nargs="+", default=["full", "dowser", "protect"],
                    choices=["full", "dowser", "protect"], help="which runs to make")
    ap.add_argument("--rows-from", help="a CSV of an earlier run with the same settings: its "
                    "zero-shot row and the rows of the methods not run now join the table")
    args = ap.parse_args()

    t_start = time.perf_counter()
    dm = load_smollm2()
    base = dm.model.to(args.device)
    up = upstream_chunks(dm.tokenizer, seq_len=128, n_chunks=args.up_chunks, bos_id=dm.bos_id)
    lo, hi = args.digits
    train_sets = {t: named_cipher_examples(dm.tokenizer, t, 512, 1000 + args.seed, lo, hi, dm.bos_id)
                  for t in TASKS}
    test_sets = {t: named_cipher_examples(dm.tokenizer, t, args.n_test, 99_999, lo, hi, dm.bos_id)
                 for t in TASKS}

    def measure(model) -> dict:
        out = {"A_up": next_token_accuracy(model, up)}
        for t in TASKS:
            acc = task_accuracy(model, test_sets[t], dm.pad_id)
            out[t] = acc["token_acc"]
            out[t + "_exact"] = acc["exact_match"]
        return out

    def fit(model, opt, task, stage):
        t0 = time.perf_counter()
        train(model, train_sets[task], opt, steps=args.steps, batch_size=args.batch, pad_id=dm.pad_id,
              seed=args.seed + stage, progress=False)
        return time.perf_counter() - t0

    rows = []
    earlier = _read_rows(args.rows_from) if args.rows_from else []
    run_now = {"full": "full FT", "dowser": "dowser", "protect": "dowser + protect"}
    now = {run_now[m] for m in args.methods}
    zero = next((r for r in earlier if r["method"] == "zero-shot"), None)
    if zero is None:
        zero = measure(base)
    rows.append({"method": "zero-shot", "stage": 0, "trained": "", **{k: v for k, v in zero.items()
                 if k not in ("method", "stage", "trained")}})
    rows += [r for r in earlier if r["method"] not in now and r["method"] != "zero-shot"]
    print(rows[-1], flush=True)

    def record(method, stage, model, seconds, extra=None):
        rows.append({"method": method, "stage": stage, "trained": TASKS[stage - 1],
                     "train_s": round(seconds, 1), **measure(model), **(extra or {})})
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}, flush=True)
        # what is measured so far, in case the run is cut short
        write_results("continual", rows, args.device, notes="(partial: the run has not finished)")

    if "full FT" in now:  # full fine-tuning of the last L layers
        model = copy.deepcopy(base)
        freeze_outside(model, last_layer_params(model, args.layers))
        for stage, task in enumerate(TASKS, 1):
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                    lr=args.lr_full, weight_decay=0.0)
            record("full FT", stage, model, fit(model, opt, task, stage))
        del model, opt

    probe_kw = dict(n_samples=args.n_samples, n_rademacher=args.n_rademacher,
                    seq_len=args.probe_seq_len, progress=False)

    def dowser_stage(model, stage, protect):
        t0 = time.perf_counter()
        masks = dowser.prepare(model, dm.probe_tokenizer, rho=args.rho, layers=args.layers,
                               seed=args.seed + stage, protect=protect, **probe_kw)
        if stage > 1:  # both dowser runs: only masked entries train after stage 1
            for name, p in model.named_parameters():
                p.requires_grad_(name in masks)
        select_s = time.perf_counter() - t0
        before = {n: model.get_parameter(n).detach().cpu().clone() for n in masks}
        opt = dowser.MaskedAdamW([p for p in model.parameters() if p.requires_grad], masks,
                                 model=model, lr=args.lr_sparse, weight_decay=0.0)
        seconds = fit(model, opt, TASKS[stage - 1], stage)
        moved = 0
        for n, packed in masks.items():  # frozen entries of this stage must not move
            frozen = ~dowser.ops.unpack_mask(packed.cpu(), before[n].shape)
            moved += int((model.get_parameter(n).detach().cpu() != before[n])[frozen].sum())
        return masks, seconds, {"probe_select_s": round(select_s, 1), "frozen_changed": moved}

    model = copy.deepcopy(base)
    first, seconds, extra = dowser_stage(model, 1, None)
    both = [m for m in ("dowser", "dowser + protect") if m in now]
    record(both[0], 1, model, seconds, extra)
    if len(both) == 2:
        rows.append({**rows[-1], "method": "dowser + protect"})
    after_first = copy.deepcopy(model)
    for stage in range(2, len(TASKS) + 1 if "dowser" in now else 2):
        _, seconds, extra = dowser_stage(model, stage, None)
        record("dowser", stage, model, seconds, extra)
    del model
    model, protect = after_first, first
    if "dowser + protect" not in now:
        protect_stages = []
    else:
        protect_stages = range(2, len(TASKS) + 1)
    prev = {n: model.get_parameter(n).detach().cpu().clone() for n in first}
    for stage in protect_stages:
        masks, seconds, extra = dowser_stage(model, stage, protect)
        # entries of earlier tasks: bit-identical after this stage
        extra["protected_changed"] = sum(
            int((model.get_parameter(n).detach().cpu() != prev[n])[
                dowser.ops.unpack_mask(protect[n].cpu(), prev[n].shape)].sum()) for n in protect)
        record("dowser + protect", stage, model, seconds, extra)
        protect = protect | masks
        prev = {n: model.get_parameter(n).detach().cpu().clone() for n in protect}

    summary = summarise(rows, zero)
    total_s = time.perf_counter() - t_start
    notes = (f"SmolLM2-135M-Instruct, tasks {' -> '.join(TASKS)} (ciphers of dowser.tasks), last "
             f"{args.layers} layers tuned, {args.steps} steps of batch {args.batch} per task "
             f"({args.digits[0]}-{args.digits[1]} digits), rho={args.rho}, "
             f"lr {args.lr_full} (full) / {args.lr_sparse} (masked), data-free probe "
             f"N={args.n_samples}, R={args.n_rademacher}, {args.probe_seq_len} tokens, per stage. Accuracy = teacher-forced "
             f"token accuracy on {args.n_test} test answers per task (exact match in the CSV). "
             f"A_up = next-token top-1 accuracy on {args.up_chunks} x 128 tokens of held-out "
             f"stdlib prose (zero-shot {zero['A_up']:.4f}). BWT = mean_j<T (acc_j final - "
             f"acc_j right after learning j). Whole run: {total_s / 60:.1f} min. One seed: "
             "differences of a few points are within noise.\n\n" + _summary_md(summary))
    write_results("continual", rows, args.device, notes=notes)
    _plot(rows, args)
    print(_summary_md(summary))


def _read_rows(path: str) -> list[dict]:
    import csv

    out = []
    with open(path) as fh:
        for r in csv.DictReader(fh):
            row = {}
            for k, v in r.items():
                if v == "" or k in ("method", "trained"):
                    row[k] = v
                else:
                    row[k] = int(v) if k == "stage" else float(v)
            out.append(row)
    return out


def summarise(rows: list[dict], zero: dict) -> list[dict]:
    out = []
    for method in ("full FT", "dowser", "dowser + protect"):
        by_stage = {r["stage"]: r for r in rows if r["method"] == method}
        last = by_stage[len(TASKS)]
        bwt = sum(last[t] - by_stage[j][t] for j, t in enumerate(TASKS[:-1], 1)) / (len(TASKS) - 1)
        out.append({"method": method, "BWT": bwt,
                    "mean final acc": sum(last[t] for t in TASKS) / len(TASKS),
                    "mean final exact": sum(last[t + "_exact"] for t in TASKS) / len(TASKS),
                    "A_up final": last["A_up"], "A_up drop": zero["A_up"] - last["A_up"]})
    return out


def _summary_md(summary: list[dict]) -> str:
    cols = list(summary[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in summary:
        lines.append("| " + " | ".join(f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c])
                                       for c in cols) + " |")
    return "\n".join(lines)


def _plot(rows: list[dict], args) -> None:
    plt = pyplot()
    if plt is None:
        return
    methods = ("full FT", "dowser", "dowser + protect")
    fig, axes = plt.subplots(1, len(TASKS) + 1, figsize=(4 * (len(TASKS) + 1), 3.6))
    colors = {"full FT": "tab:gray", "dowser": "tab:orange", "dowser + protect": "tab:blue"}
    zero = next(r for r in rows if r["method"] == "zero-shot")
    for ax, metric in zip(axes, TASKS + ["A_up"]):
        for m in methods:
            pts = sorted((r["stage"], r[metric]) for r in rows if r["method"] == m)
            ax.plot([0] + [s for s, _ in pts], [zero[metric]] + [v for _, v in pts], "o-",
                    color=colors[m], label=m)
        ax.set_xticks(range(len(TASKS) + 1))
        ax.set_xticklabels(["0"] + [f"{i}:{t}" for i, t in enumerate(TASKS, 1)])
        ax.set_xlabel("after stage")
        ax.set_title(f"{metric} accuracy" if metric in TASKS else "A_up (upstream)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M, 3 ciphers in sequence, last {args.layers} layers, rho={args.rho}, "
                 f"{args.steps} steps/task")
    fig.tight_layout()
    tag = "cpu" if torch.device(args.device).type == "cpu" else "gpu"
    fig.savefig(RESULTS / f"continual-{tag}.png", dpi=110)


if __name__ == "__main__":
    main()
