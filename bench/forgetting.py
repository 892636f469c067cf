"""Forgetting study on SmolLM2-135M (the paper's Tables 4/6/7 in miniature).

    python bench/forgetting.py                       # the required grid (see --help for the budget)
    python bench/forgetting.py --extra               # + real-data probe and all-30-layer runs
    python bench/forgetting.py --device cuda --steps 300 --seeds 0 1 2 3 4

Upstream (A_up): next-token top-1 accuracy on held-out English prose from Python's own docs
(`pydoc_data.topics`, odd topics; real-data probes use the even ones). Downstream (A_down):
exact match on the digit cipher of `dowser.tasks` (each digit -> a fixed letter), which
SmolLM2 cannot do zero-shot. Methods: zero-shot, full fine-tuning of the last L layers, a random
mask and a dowser (data-free) mask at the same rho, trained with the same MaskedAdamW step.
Every run appends a row to bench/results/forgetting-runs-<device>.csv as soon as it finishes,
so an interrupted study keeps what it measured; `--resume` skips runs already there.
"""

from __future__ import annotations

import argparse
import copy
import csv
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, pyplot, write_results  # noqa: E402

import dowser  # noqa: E402
from dowser.demo import last_layer_params, load_smollm2  # noqa: E402
from dowser.finetune import evaluate, freeze_outside, train  # noqa: E402
from dowser.probe import decoder_layers  # noqa: E402
from dowser.tasks import cipher_examples, upstream_chunks, upstream_texts  # noqa: E402

FIELDS = ["method", "rho", "layers", "seed", "probe", "A_up", "A_down", "down_token_acc", "Avg",
          "H", "train_s", "frozen_changed"]


def _runs_path(device: str) -> Path:
    return RESULTS / f"forgetting-runs-{'cpu' if device == 'cpu' else 'gpu'}.csv"


def _done(path: Path) -> set[tuple]:
    if not path.exists():
        return set()
    with open(path) as fh:
        return {(r["method"], r["rho"], r["layers"], r["seed"], r["probe"]) for r in csv.DictReader(fh)}


def _append(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerow({k: row.get(k, "") for k in FIELDS})


def _frozen_changed(model, before, masks) -> int:
    changed = 0
    for name, packed in masks.items():
        frozen = ~dowser.ops.unpack_mask(packed.cpu(), before[name].shape)
        changed += int((model.get_parameter(name).detach().cpu() != before[name])[frozen].sum())
    return changed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rhos", type=float, nargs="+", default=[0.1, 0.5])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=150, help="fine-tuning steps per run (batch 8)")
    ap.add_argument("--lr-full", type=float, default=2e-4)
    ap.add_argument("--lr-sparse", type=float, default=2e-4)
    ap.add_argument("--n-samples", type=int, default=16, help="data-free probe prompts")
    ap.add_argument("--extra", action="store_true", help="+ real-data probe and all-layer runs at rho=0.5")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--resume", action="store_true", help="skip runs already in the runs CSV")
    args = ap.parse_args()

    runs = _runs_path(args.device)
    if not args.resume and runs.exists():
        runs.unlink()
    done = _done(runs)
    dm = load_smollm2()
    base = dm.model.to(args.device)
    up = upstream_chunks(dm.tokenizer, seq_len=128, n_chunks=24, bos_id=dm.bos_id)
    test_ex = cipher_examples(dm.tokenizer, 96, seed=99_999, bos_id=dm.bos_id)
    n_layers = len(decoder_layers(base)[1])

    def record(method, rho, layers, seed, probe, model, masks=None, before=None, train_s=0.0):
        row = {"method": method, "rho": rho, "layers": layers, "seed": seed, "probe": probe,
               "train_s": round(train_s, 1), **evaluate(model, up, test_ex, dm.pad_id)}
        if masks is not None:
            row["frozen_changed"] = _frozen_changed(model, before, masks)
        _append(runs, row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)

    def key(method, rho, layers, seed, probe):
        return (method, str(rho), str(layers), str(seed), probe)

    if key("zero-shot", "", "", "", "") not in done:
        record("zero-shot", "", "", "", "", base)

    configs = [(args.layers, "data-free")]
    if args.extra:
        configs += [(args.layers, "real-data"), (n_layers, "data-free")]
    for seed in args.seeds:
        train_ex = cipher_examples(dm.tokenizer, 512, seed=1000 + seed, bos_id=dm.bos_id)

        def fit(model, opt):
            t0 = time.perf_counter()
            train(model, train_ex, opt, steps=args.steps, batch_size=8, pad_id=dm.pad_id, seed=seed,
                  progress=True, desc="fine-tune")
            return time.perf_counter() - t0

        if key("full FT", "", args.layers, seed, "") not in done:
            model = copy.deepcopy(base)
            freeze_outside(model, last_layer_params(model, args.layers))
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                    lr=args.lr_full, weight_decay=0.0)
            record("full FT", "", args.layers, seed, "", model, train_s=fit(model, opt))
        for layers, probe_kind in configs:
            rhos = args.rhos if (layers, probe_kind) == (args.layers, "data-free") else [0.5]
            probe_kw = {}
            if probe_kind == "real-data":
                probe_kw = {"prompts": upstream_texts("probe")[: args.n_samples]}
            stats = None
            for rho in rhos:
                for method in ("random", "dowser"):
                    if probe_kind != "data-free" or layers != args.layers:
                        if method == "random":
                            continue
                    if key(method, rho, layers, seed, probe_kind) in done:
                        continue
                    model = copy.deepcopy(base)
                    if stats is None:
                        stats = dowser.probe(model, dm.tokenizer, layers=layers, n_samples=args.n_samples,
                                             seed=seed, **probe_kw)
                    masks = dowser.build_masks(model, stats, rho=rho, method=method, seed=seed)
                    freeze_outside(model, last_layer_params(model, layers))
                    before = {n: model.get_parameter(n).detach().cpu().clone() for n in masks}
                    opt = dowser.MaskedAdamW([p for p in model.parameters() if p.requires_grad], masks,
                                             model=model, lr=args.lr_sparse, weight_decay=0.0)
                    record(method, rho, layers, seed, probe_kind, model, masks, before, fit(model, opt))
    summarise(runs, args)


def _mean_std(values: list[float]) -> str:
    if not values:
        return ""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def summarise(runs: Path, args) -> None:
    with open(runs) as fh:
        rows = list(csv.DictReader(fh))
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["rho"], r["layers"], r["probe"]), []).append(r)
    table = []
    for (method, rho, layers, probe), rs in groups.items():
        table.append({"method": method, "rho": rho, "layers": layers, "probe": probe, "n": len(rs),
                      **{m: _mean_std([float(r[m]) for r in rs]) for m in ("A_up", "A_down", "Avg", "H")}})
    notes = [f"SmolLM2-135M-Instruct, last {args.layers} layers tuned, {args.steps} steps of batch 8, "
             f"lr {args.lr_full} (full) / {args.lr_sparse} (masked), data-free probe N={args.n_samples}, "
             "R=8. mean ± std over seeds."]
    try:
        from scipy.stats import ttest_ind

        for metric in ("A_up", "H"):
            d = [float(r[metric]) for r in rows if r["method"] == "dowser" and r["rho"] == "0.5"
                 and r["probe"] == "data-free" and r["layers"] == str(args.layers)]
            rnd = [float(r[metric]) for r in rows if r["method"] == "random" and r["rho"] == "0.5"]
            if len(d) > 1 and len(rnd) > 1:
                t = ttest_ind(d, rnd)
                notes.append(f"t-test dowser vs random at rho=0.5 on {metric}: t={t.statistic:.3f}, "
                             f"p={t.pvalue:.4f} (n={len(d)}, {len(rnd)})")
    except ImportError:
        notes.append("scipy not installed: no t-test")
    write_results("forgetting", table, args.device, notes="\n\n".join(notes))
    _plot(rows, args)


def _plot(rows: list[dict], args) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ax = axes[0]
    for method, color in (("random", "tab:gray"), ("dowser", "tab:blue")):
        rhos = sorted({float(r["rho"]) for r in rows if r["method"] == method and r["probe"] == "data-free"
                       and r["layers"] == str(args.layers)})
        means = [statistics.mean(float(r["A_up"]) for r in rows if r["method"] == method
                                 and r["rho"] and float(r["rho"]) == rho and r["probe"] == "data-free"
                                 and r["layers"] == str(args.layers))
                 for rho in rhos]
        ax.plot(rhos, means, "o-", color=color, label=method)
    for method, style in (("zero-shot", "--"), ("full FT", ":")):
        vals = [float(r["A_up"]) for r in rows if r["method"] == method]
        if vals:
            ax.axhline(statistics.mean(vals), linestyle=style, color="k", label=method)
    ax.set_xlabel("rho (trainable fraction)")
    ax.set_ylabel("A_up (held-out next-token accuracy)")
    ax.set_title(f"upstream accuracy vs rho (last {args.layers} layers)")
    ax.legend()
    ax = axes[1]
    depth = {}
    for r in rows:
        if r["method"] == "dowser" and r["rho"] == "0.5" and r["probe"] == "data-free":
            depth.setdefault(int(r["layers"]), []).append(float(r["A_up"]))
    if depth:
        xs = sorted(depth)
        ax.plot(xs, [statistics.mean(depth[x]) for x in xs], "o-", color="tab:blue", label="dowser rho=0.5")
    ax.set_xlabel("tuned layers (depth)")
    ax.set_ylabel("A_up")
    ax.set_title("upstream accuracy vs depth")
    ax.legend()
    fig.tight_layout()
    out = RESULTS / f"forgetting-{'cpu' if args.device == 'cpu' else 'gpu'}.png"
    fig.savefig(out, dpi=120)
    print("wrote", out)


if __name__ == "__main__":
    main()
