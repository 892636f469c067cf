"""Continual learning on SmolLM2-135M: a sequence of tasks learnt one after another, measured with
the paper's continual protocol (appendix H: MFT, MFN, MAA, BWT and the H-score).

    python bench/continual.py --resume                 # the grid (5 methods x 2 seeds), resumable
    python bench/continual.py --report                 # table and plot from the runs CSV only
    python bench/continual.py --tasks facts:0 facts:1 facts:2 --tag=-facts --resume   # fact sets
    python bench/continual.py --steps 200 --layers 8 --device cuda --resume

Tasks (default): the ciphers "alpha", "beta", "gamma" of dowser.tasks.CIPHERS (each digit -> a
letter, the prompt names the cipher), learnt in that order; `facts:<seed>` is a set of facts about
fictional people (dowser.tasks.make_facts, tested on held-out question wordings). After every
stage each task's accuracy (teacher-forced token accuracy on its answer tokens; exact match in
the CSV too) and A_up (next-token top-1 accuracy on held-out stdlib prose) are measured. Methods,
all on the last L decoder layers:

- full FT: AdamW on every parameter of the tuned layers, stage after stage;
- LoRA: one PEFT LoRA adapter (rank r, alpha 2r) on q/k/v/o/gate/up/down, trained on stage after
  stage;
- random: fresh random masks at rho each stage (build_masks(method="random")), MaskedAdamW;
- dowser: at every stage a fresh data-free probe of the current model and new masks
  (dowser.prepare); nothing protects the entries earlier tasks trained;
- dowser + protect: the same, but stage t's masks avoid the entries of stages < t
  (dowser.prepare(protect=...)), so those stay frozen (checked: protected_changed = 0).

The masked runs train the 1-D norms of the tuned layers at stage 1 only (from stage 2 on only
masked entries train, as prepare(protect=) requires), so they differ only in their masks.

Metrics (paper App. H; A[t][i] = accuracy on task i after stage t, T tasks; `cl_metrics`):
MFT = mean_i A[i][i]; MFN = mean_i A[T][i]; MAA = mean_t mean_{i<=t} A[t][i];
BWT = mean_i (A[T][i] - A[i][i]) over all T tasks (= MFN - MFT: the normalisation that reproduces
every row of the paper's Table 9; the last task's term is 0); H = harmonic mean of the final A_up
and MFN (the paper's H-score with A_down = MFN, as in Table 9).

Every stage appends its row to bench/results/continual<tag>-runs-<device>.csv; `--resume` skips
(method, seed) runs that are complete and reruns an incomplete one from stage 1 (a run is three
short stages; no model state is kept between sessions). Report: continual<tag>-<device>.{md,png}.
"""

from __future__ import annotations

import argparse
import copy
import csv
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, pyplot, read_rows  # noqa: E402

import dowser  # noqa: E402
from dowser.finetune import freeze_outside, hscore, train  # noqa: E402

METHODS = {"full": "full FT", "lora": "LoRA", "random": "random", "dowser": "dowser",
           "protect": "dowser + protect"}
COLORS = {"full FT": "tab:gray", "LoRA": "tab:purple", "random": "silver", "dowser": "tab:orange",
          "dowser + protect": "tab:blue"}


# ----------------------------------------------------------------------------- metrics

def cl_metrics(acc: Sequence[Sequence[float]], a_up: float) -> dict[str, float]:
    """The paper's continual-learning metrics (App. H) from the accuracy matrix `acc`, T x T with
    acc[t][i] the accuracy on task i after training stage t (0-based), and the final upstream
    accuracy `a_up`.

    MFT = (1/T) sum_i acc[i][i]; MFN = (1/T) sum_i acc[T-1][i];
    MAA = (1/T) sum_t (1/(t+1)) sum_{i<=t} acc[t][i]; BWT = (1/T) sum_i (acc[T-1][i] - acc[i][i]);
    H = 2 a_up MFN / (a_up + MFN)."""
    T = len(acc)
    if T < 2 or any(len(r) != T for r in acc):
        raise ValueError(f"acc must be a T x T matrix with T >= 2, got {[len(r) for r in acc]} rows")
    mft = sum(acc[i][i] for i in range(T)) / T
    mfn = sum(acc[T - 1]) / T
    maa = sum(sum(acc[t][: t + 1]) / (t + 1) for t in range(T)) / T
    bwt = sum(acc[T - 1][i] - acc[i][i] for i in range(T)) / T
    return {"MFT": mft, "MFN": mfn, "MAA": maa, "BWT": bwt, "A_up": a_up, "H": hscore(a_up, mfn)}


# ----------------------------------------------------------------------------- tasks

def task_sets(tokenizer, tasks: list[str], n_test: int, digits: tuple[int, int], bos: int | None,
              seed: int):
    """(train examples, test examples) per task name: a cipher of CIPHERS or facts:<seed>."""
    from dowser.tasks import CIPHERS, fact_examples, make_facts, named_cipher_examples

    train_sets, test_sets = {}, {}
    lo, hi = digits
    for t in tasks:
        if t in CIPHERS:
            train_sets[t] = named_cipher_examples(tokenizer, t, 512, 1000 + seed, lo, hi, bos)
            test_sets[t] = named_cipher_examples(tokenizer, t, n_test, 99_999, lo, hi, bos)
        elif t.startswith("facts:") and t[6:].isdigit():
            world = make_facts(int(t[6:]), n_people=max(1, n_test // 3))
            train_sets[t] = fact_examples(tokenizer, world.train, bos)
            test_sets[t] = fact_examples(tokenizer, world.test, bos)
        else:
            raise SystemExit(f"unknown task {t!r}: a cipher ({', '.join(CIPHERS)}) or facts:<seed>")
    return train_sets, test_sets


# ----------------------------------------------------------------------------- CSV

def runs_path(device: str, tag: str) -> Path:
    return RESULTS / f"continual{tag}-runs-{'cpu' if device == 'cpu' else 'gpu'}.csv"


def append_row(path: Path, row: dict, fields: list[str]) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerow({k: row.get(k, "") for k in fields})


def complete_runs(rows: list[dict], n_tasks: int) -> dict[tuple[str, str], list[dict]]:
    """(method, seed) -> its stage rows 1..T, for runs whose every stage is in the CSV (the
    last complete copy of each stage when a run was restarted)."""
    by: dict[tuple[str, str], dict[int, dict]] = {}
    for r in rows:
        if r["method"] != "zero-shot":
            by.setdefault((r["method"], r["seed"]), {})[int(r["stage"])] = r
    return {k: [v[s] for s in range(1, n_tasks + 1)] for k, v in by.items()
            if all(s in v for s in range(1, n_tasks + 1))}


# ----------------------------------------------------------------------------- runs

class Continual:
    def __init__(self, args: argparse.Namespace) -> None:
        from dowser.demo import load_smollm2
        from dowser.tasks import upstream_chunks

        self.args = args
        self.dm = load_smollm2()
        self.base = self.dm.model.to(args.device)
        tok = self.dm.tokenizer
        self.up = upstream_chunks(tok, seq_len=128, n_chunks=args.up_chunks, bos_id=self.dm.bos_id)
        self.train_sets, self.test_sets = task_sets(tok, args.tasks, args.n_test, tuple(args.digits),
                                                    self.dm.bos_id, 0)

    def measure(self, model) -> dict:
        from dowser.tasks import task_accuracy, upstream_metrics

        up = upstream_metrics(model, self.up)
        out = {"A_up": up["acc"], "CE_up": up["ce"]}
        for t in self.args.tasks:
            acc = task_accuracy(model, self.test_sets[t], self.dm.pad_id)
            out[t] = acc["token_acc"]
            out[t + "_exact"] = acc["exact_match"]
        return out

    def run(self, method: str, seed: int, emit) -> None:
        """Train `method` through every task in order; emit(row) after each stage."""
        from forgetting import tuned_targets

        a = self.args
        torch.manual_seed(seed)
        model = copy.deepcopy(self.base)
        modules, params = tuned_targets(model, a.layers)
        protect = None
        opt = None
        for stage, task in enumerate(a.tasks, 1):
            extra: dict = {}
            t0 = time.perf_counter()
            masks = None
            if method == "full FT":
                freeze_outside(model, params)
                opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                        lr=a.lr_full, weight_decay=0.0)
                lr = a.lr_full
            elif method == "LoRA":
                if stage == 1:
                    from peft import LoraConfig, get_peft_model

                    freeze_outside(model, [])
                    model = get_peft_model(model, LoraConfig(
                        r=a.lora_rank, lora_alpha=2 * a.lora_rank, lora_dropout=0.0,
                        target_modules=modules, bias="none"))
                opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                        lr=a.lr_lora, weight_decay=0.0)
                lr = a.lr_lora
            else:
                lr = a.lr_sparse
                if method == "random":
                    masks = dowser.build_masks(model, None, rho=a.rho, method="random",
                                               seed=1000 * seed + stage, targets=modules)
                    freeze_outside(model, params if stage == 1 else list(masks))
                else:
                    keep = protect if method == "dowser + protect" else None
                    masks = dowser.prepare(model, self.dm.probe_tokenizer, rho=a.rho, layers=a.layers,
                                           seed=1000 * seed + stage, protect=keep,
                                           n_samples=a.n_samples, n_rademacher=a.n_rademacher,
                                           seq_len=a.probe_seq_len, progress=False)
                    if stage > 1:  # only masked entries train after stage 1
                        for name, p in model.named_parameters():
                            p.requires_grad_(name in masks)
                opt = dowser.MaskedAdamW([p for p in model.parameters() if p.requires_grad], masks,
                                         model=model, lr=lr, weight_decay=0.0)
            extra["select_s"] = round(time.perf_counter() - t0, 1)
            before = {n: model.get_parameter(n).detach().clone() for n in masks} if masks else {}
            prev = ({n: model.get_parameter(n).detach().clone() for n in protect}
                    if protect is not None else {})
            t0 = time.perf_counter()
            train(model, self.train_sets[task], opt, steps=a.steps, batch_size=a.batch,
                  pad_id=self.dm.pad_id, seed=1000 * seed + stage, progress=False)
            extra["train_s"] = round(time.perf_counter() - t0, 1)
            if masks is not None:  # frozen entries of this stage must not move
                extra["frozen_changed"] = sum(
                    int(((model.get_parameter(n).detach() != before[n])
                         & ~dowser.ops.unpack_mask(masks[n], before[n].shape)).sum()) for n in masks)
            if method == "dowser + protect":
                if protect is not None:  # entries of earlier tasks: bit-identical
                    extra["protected_changed"] = sum(
                        int((model.get_parameter(n).detach() != prev[n])[
                            dowser.ops.unpack_mask(protect[n], prev[n].shape)].sum()) for n in protect)
                protect = masks if protect is None else protect | masks
            emit({"method": method, "seed": seed, "stage": stage, "trained": task, "lr": f"{lr:.0e}",
                  "rho": a.rho if masks is not None else "", "steps": a.steps, "batch": a.batch,
                  "layers": a.layers, **self.measure(model), **extra})


# ----------------------------------------------------------------------------- report

def summarise(rows: list[dict], tasks: list[str]) -> list[dict]:
    """Per (method, seed) run that is complete: the paper's metrics."""
    out = []
    z = _zero(rows)
    for (method, seed), stages in complete_runs(rows, len(tasks)).items():
        acc = [[float(r[t]) for t in tasks] for r in stages]
        d_ce = float(stages[-1]["CE_up"]) - float(z["CE_up"]) if z else float("nan")
        out.append({"method": method, "seed": int(seed), **cl_metrics(acc, float(stages[-1]["A_up"])),
                    "dCE_up": d_ce, "train_s": sum(float(r["train_s"] or 0) for r in stages)})
    return out


def _zero(rows: list[dict]) -> dict | None:
    return next((r for r in rows if r["method"] == "zero-shot"), None)


def _ms(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.3f} ± {sd:.3f}"


def report(path: Path, args: argparse.Namespace) -> Path | None:
    rows = read_rows(path)
    if not rows:
        print(f"no runs in {path} yet")
        return None
    tasks = args.tasks
    runs = summarise(rows, tasks)
    want = [METHODS[m] for m in args.methods]
    done = {(r["method"], r["seed"]) for r in runs}
    n_req = len(want) * len(args.seeds)
    n_done = sum(1 for m in want for s in args.seeds if (m, s) in done)
    z = _zero(rows)
    budget = sorted({(r["steps"], r["batch"], r["layers"]) for r in rows if r["method"] != "zero-shot"})
    lines = [f"# continual learning ({' -> '.join(tasks)})", ""]
    lines += [f"- {k}: {v}" for k, v in environment(args.device).items()]
    lines += [f"- runs CSV: `{path.relative_to(RESULTS.parent.parent)}`; grid done: {n_done} of {n_req} "
              f"(method, seed) runs",
              f"- command: `python bench/continual.py{' --tag=' + args.tag if args.tag else ''}"
              f"{' --tasks ' + ' '.join(tasks) if tasks != DEFAULT_TASKS else ''} --resume`",
              "- budget (from the CSV rows): " + "; ".join(f"{s} steps x batch {b} per task, last {L} layers"
                                                          for s, b, L in budget),
              f"- whole-run training time: {sum(r['train_s'] for r in runs) / 60:.1f} min of "
              "training over the complete runs (probe, masks and evaluation not included)", ""]
    if z:
        lines += ["zero-shot: A_up {:.4f}, ".format(float(z["A_up"])) +
                  ", ".join(f"{t} {float(z[t]):.3f}" for t in tasks), ""]
    lines += ["Mean ± std over seeds (n = seeds done). A[t][i] = test token accuracy on task i after "
              "stage t. MFT = mean_i A[i][i]; MFN = mean_i A[T][i]; MAA = mean_t mean_{i<=t} A[t][i]; "
              "BWT = mean_i (A[T][i] - A[i][i]); H = harmonic mean of final A_up and MFN (paper App. H). "
              "dCE_up: final held-out cross-entropy minus zero-shot (nats/token).", ""]
    cols = ["MFT", "MFN", "MAA", "BWT", "A_up", "dCE_up", "H"]
    lines += ["| method | n | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for m in METHODS.values():
        rs = [r for r in runs if r["method"] == m]
        if rs:
            lines.append(f"| {m} | {len(rs)} | " + " | ".join(_ms([r[c] for r in rs]) for c in cols) + " |")
    lines += ["", "Per run:", "", "| method | seed | " + " | ".join(cols) + " | train s |",
              "|---|---|" + "---|" * (len(cols) + 1)]
    for r in sorted(runs, key=lambda r: (list(METHODS.values()).index(r["method"]), r["seed"])):
        lines.append(f"| {r['method']} | {r['seed']} | " + " | ".join(f"{r[c]:.4f}" for c in cols)
                     + f" | {r['train_s']:.0f} |")
    stem = RESULTS / f"continual{args.tag}-{'cpu' if args.device == 'cpu' else 'gpu'}"
    png = _plot(rows, tasks, stem.with_suffix(".png"))
    if png is not None:
        lines += ["", f"![continual]({png.name})"]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.tag == "-protocol":  # the default grid's block in docs/study.md
        from forgetting import embed_in_docs

        embed_in_docs([ln for ln in lines[2:] if not ln.startswith("![")], stem.with_suffix(".md"), png,
                      grid="continual", script="bench/continual.py")
    return stem.with_suffix(".md")


def _plot(rows: list[dict], tasks: list[str], out: Path) -> Path | None:
    plt = pyplot()
    z = _zero(rows)
    if plt is None or z is None:
        return None
    fig, axes = plt.subplots(1, len(tasks) + 1, figsize=(4 * (len(tasks) + 1), 3.6))
    runs = complete_runs(rows, len(tasks))
    for ax, metric in zip(axes, tasks + ["A_up"]):
        for m in METHODS.values():
            curves = [[float(z[metric])] + [float(r[metric]) for r in st] for (mm, _), st in runs.items() if mm == m]
            if curves:
                ax.plot(range(len(tasks) + 1), [statistics.mean(c) for c in zip(*curves)], "o-",
                        color=COLORS[m], label=f"{m} (n={len(curves)})")
        ax.set_xticks(range(len(tasks) + 1))
        ax.set_xticklabels(["0"] + [f"{i}:{t}" for i, t in enumerate(tasks, 1)], fontsize=7)
        ax.set_xlabel("after stage")
        ax.set_title(f"{metric} accuracy" if metric in tasks else "A_up (upstream)")
    axes[0].legend(fontsize=7)
    fig.suptitle("SmolLM2-135M, tasks in sequence (mean over seeds)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------- main

DEFAULT_TASKS = ["alpha", "beta", "gamma"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS, help="ciphers and/or facts:<seed>, in order")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=16, help="training steps per task")
    ap.add_argument("--layers", type=int, default=2, help="last L decoder layers tuned")
    ap.add_argument("--rho", type=float, default=0.2)
    ap.add_argument("--lr-full", type=float, default=3e-4)
    ap.add_argument("--lr-lora", type=float, default=1e-3)
    ap.add_argument("--lr-sparse", type=float, default=3e-3)
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--n-samples", type=int, default=4, help="data-free probe prompts per stage")
    ap.add_argument("--n-rademacher", type=int, default=2)
    ap.add_argument("--probe-seq-len", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--digits", type=int, nargs=2, default=[2, 3], help="min and max digits")
    ap.add_argument("--n-test", type=int, default=24, help="test examples per task")
    ap.add_argument("--up-chunks", type=int, default=2, help="128-token chunks for A_up")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", default="-protocol", help="infix of the output names")
    ap.add_argument("--resume", action="store_true", help="keep the runs CSV and skip complete runs")
    ap.add_argument("--report", action="store_true", help="only rebuild the table and plot")
    ap.add_argument("--max-runs", type=int, default=None, help="stop after this many (method, seed) runs")
    args = ap.parse_args()
    if len(args.tasks) < 2:
        raise SystemExit("the continual protocol needs at least 2 tasks")
    torch.set_num_threads(args.threads)
    path = runs_path(args.device, args.tag)
    if args.report:
        report(path, args)
        return
    if not args.resume and path.exists():
        raise SystemExit(f"{path} exists: pass --resume to continue it (or delete it to start over)")
    rows = read_rows(path)
    budget = {(r["steps"], r["batch"], r["layers"]) for r in rows if r["method"] != "zero-shot"}
    if budget - {(str(args.steps), str(args.batch), str(args.layers))}:
        raise SystemExit(f"{path} holds runs of another budget {sorted(budget)}: one CSV is one budget "
                         "(use --tag for another)")
    cl = Continual(args)
    fields = (["method", "seed", "stage", "trained", "lr", "rho", "steps", "batch", "layers", "A_up", "CE_up"]
              + [k for t in args.tasks for k in (t, t + "_exact")]
              + ["select_s", "train_s", "frozen_changed", "protected_changed"])
    if rows and list(rows[0]) != fields:
        raise SystemExit(f"{path} has other columns (other tasks?): use another --tag")
    if _zero(rows) is None:
        append_row(path, {"method": "zero-shot", "seed": "", "stage": 0, **cl.measure(cl.base)}, fields)
    done = complete_runs(rows, len(args.tasks))
    new = 0
    for seed in args.seeds:
        for m in args.methods:
            method = METHODS[m]
            if (method, str(seed)) in done or (args.max_runs is not None and new >= args.max_runs):
                continue
            t0 = time.perf_counter()

            def emit(row: dict) -> None:
                append_row(path, row, fields)
                print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)

            cl.run(method, seed, emit)
            new += 1
            print(f"{method} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    report(path, args)


if __name__ == "__main__":
    main()
