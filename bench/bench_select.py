"""Benchmark exact bottom-rho mask building against the naive approach users write today
(materialise S in fp32, torch.kthvalue, compare): time and peak extra memory, side by side.

    python bench/bench_select.py [--device cuda] [--repeat 3]

Every (shape, method) runs in a fresh subprocess so CPU peak RSS is clean. CPU: 4096x4096,
4096x11008, 11008x4096 and one 7B decoder layer's 7 matrices; with --device cuda also the full
32-layer set (224 matrices). B = 16 probe batches, fp32 weights, rho = 0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import naive_select, select_inputs  # noqa: E402
RHO, B = 0.1, 16
LAYER_7B = [("q", 4096, 4096), ("k", 4096, 4096), ("v", 4096, 4096), ("o", 4096, 4096),
            ("gate", 11008, 4096), ("up", 11008, 4096), ("down", 4096, 11008)]


def _inputs(shapes, device, dtype):
    return select_inputs(shapes, device, dtype, B)


def _naive(w, psi, a, bw):
    return naive_select(w, psi, a, bw, RHO)


def _use_previous_build(path: str) -> None:
    """Route dowser's ops to a previous build of dowser._C (--baseline-so)."""
    import importlib.util

    from dowser import _ext

    spec = importlib.util.spec_from_file_location("dowser_previous._C", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    _ext.load = lambda: mod  # the ops look the module up through _ext.load() per call


def worker(method: str, shapes: list[tuple[int, int]], device: str, dtype: str, repeat: int,
           so: str | None = None) -> dict:
    from dowser import ops
    from dowser.profiling import peak_memory, time_fn

    if so:
        _use_previous_build(so)

    layers = _inputs(shapes, device, getattr(torch, dtype))
    if method == "naive":
        fn = lambda: [_naive(*layer) for layer in layers]  # noqa: E731
    elif method == "read-w":  # the floor: one read of every weight (torch.sum)
        fn = lambda: [w.sum() for w, _, _, _ in layers]  # noqa: E731
    elif method == "dowser":
        fn = lambda: [ops.build_mask(w, p, a, RHO, batch_weights=bw) for w, p, a, bw in layers]  # noqa: E731
    else:  # dowser-global: one threshold over all matrices
        fn = lambda: ops.build_masks_global(layers, RHO)  # noqa: E731
    if method.startswith("dowser"):
        # One tiny call first: a process's first custom-op call pays torch's one-time imports
        # (torch._dynamo, and triton through it: ~150 MB RSS), which are not this method's
        # memory; its few freed pages cannot hide the measured call's peak.
        w, p, a, bw = _inputs([(64, 64)], device, getattr(torch, dtype))[0]
        ops.build_mask(w, p, a, RHO, batch_weights=bw)
    # Memory of the first full-size call: a full warm-up's freed pages would hide its peak.
    _, extra = peak_memory(fn, device)
    t = time_fn(fn, warmup=1, repeat=repeat, device=device)
    return {"median_s": t["median_s"], "min_s": t["min_s"], "extra_mb": extra / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "SHAPES"))
    parser.add_argument("--so", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--paths", nargs="*", default=None,
                        help="CPU instruction-set paths to force for the dowser rows "
                             "(DOWSER_CPU_CAPABILITY), e.g. default avx2; default: the automatic one")
    parser.add_argument("--baseline-so", default=None,
                        help="also time the dowser rows with this previous build of dowser._C")
    parser.add_argument("--cases", nargs="*", default=None, help="only these cases (e.g. 4096x11008)")
    parser.add_argument("--suffix", default="",
                        help="results file suffix: bench/results/select-cpu<suffix>.md/.csv/.png")
    args = parser.parse_args()
    if args.worker:
        shapes = [tuple(map(int, s.split("x"))) for s in args.worker[1].split(",")]
        print(json.dumps(worker(args.worker[0], shapes, args.device, args.dtype, args.repeat, args.so)))
        return
    from dowser import _ext

    auto = _ext.cpu_capability() or "-"
    paths = args.paths or [auto]

    from common import write_results

    cases = [("4096x4096", [(4096, 4096)]), ("4096x11008", [(4096, 11008)]),
             ("11008x4096", [(11008, 4096)]),
             ("7b-layer (7 matrices)", [(o, i) for _, o, i in LAYER_7B])]
    if args.device != "cpu":
        cases.append(("7b-32-layers (224 matrices)", [(o, i) for _, o, i in LAYER_7B] * 32))
    if args.cases:
        cases = [c for c in cases if c[0] in args.cases]
    # (method, cpu path): naive and read-w are torch alone; dowser rows on each forced path
    # (and the previous build with --baseline-so).
    rows = []
    for name, shapes in cases:
        dowser_methods = ["dowser"] + (["dowser-global"] if len(shapes) > 1 else [])
        runs = [("naive", "-"), ("read-w", "-")] + [(m, p) for p in paths for m in dowser_methods]
        if args.baseline_so:
            runs += [(m, "previous build") for m in dowser_methods]
        res = {}
        for method, path in runs:
            cmd = [sys.executable, os.path.abspath(__file__), "--device", args.device, "--dtype",
                   args.dtype, "--repeat", str(args.repeat), "--worker", method,
                   ",".join(f"{o}x{i}" for o, i in shapes)]
            env = dict(os.environ)
            env.pop("DOWSER_CPU_CAPABILITY", None)
            if path == "previous build":
                cmd += ["--so", args.baseline_so]
            elif path != "-" and method.startswith("dowser"):
                env["DOWSER_CPU_CAPABILITY"] = path
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, env=env)
            if out.returncode != 0:
                print(out.stderr, file=sys.stderr)
                res[(method, path)] = None
                continue
            res[(method, path)] = json.loads(out.stdout.strip().splitlines()[-1])
        base = res.get(("naive", "-"))
        for method, path in runs:
            r = res[(method, path)]
            if r is None:
                rows.append({"case": name, "method": method, "cpu_path": path, "status": "failed"})
                continue
            row = {"case": name, "method": method, "cpu_path": path, "entries": sum(o * i for o, i in shapes),
                   "median_s": r["median_s"], "min_s": r["min_s"], "extra_mb": r["extra_mb"]}
            if base:
                row["speedup_vs_naive"] = base["median_s"] / r["median_s"]
                row["memory_vs_naive"] = r["extra_mb"] / max(base["extra_mb"], 1e-9)
            rows.append(row)
            print(row, flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    notes = (f"B={B} probe batches, rho={RHO}, weights {args.dtype}. naive = materialise S in fp32 + "
             "torch.kthvalue + `S <= threshold` (torch.quantile refuses > 2^24 elements). "
             "dowser = ops.build_mask per matrix (exact k, packed int32 words); dowser-global = "
             "ops.build_masks_global (one threshold); read-w = one torch.sum over every weight, the time "
             "to read W once (the Triton path makes 4 passes, the CPU fast path 1). extra_mb = peak memory above the inputs "
             "(CPU: peak RSS in a fresh subprocess; CUDA: max_memory_allocated). "
             "cpu_path: the CPU instruction-set path of the dowser rows (DOWSER_CPU_CAPABILITY; "
             "'previous build': --baseline-so). "
             f"Load average at the end: {load:.1f}.")
    md = write_results("select", rows, args.device, notes, suffix=args.suffix)
    _plot(rows, md.with_suffix(".png"))
    print(f"wrote {md}")


def _plot(rows: list[dict], path) -> None:
    from common import pyplot

    plt = pyplot()
    if plt is None:
        return
    ok = [r for r in rows if "median_s" in r]
    cases = list(dict.fromkeys(r["case"] for r in ok))
    label = lambda r: r["method"] if r.get("cpu_path", "-") == "-" else f"{r['method']} [{r['cpu_path']}]"  # noqa: E731
    methods = list(dict.fromkeys(label(r) for r in ok))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(methods)
    for m_i, method in enumerate(methods):
        xs, ts, ms = [], [], []
        for c_i, case in enumerate(cases):
            r = next((r for r in ok if r["case"] == case and label(r) == method), None)
            if r:
                xs.append(c_i + m_i * width)
                ts.append(r["median_s"])
                ms.append(r["extra_mb"])
        axes[0].bar(xs, ts, width, label=method)
        axes[1].bar(xs, ms, width, label=method)
    for ax, title in zip(axes, ["time (s, median)", "peak extra memory (MB)"]):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
        ax.set_xticklabels(cases, rotation=15, fontsize=8)
        ax.set_title(title)
        ax.legend()
    fig.suptitle("bottom-rho mask build: dowser vs naive (materialise + kthvalue)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
