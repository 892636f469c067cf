"""Benchmark the masked optimizer step against torch.optim.AdamW (foreach and fused), same run.

    python bench/bench_optim.py                       # 45M fp32 parameters on CPU
    python bench/bench_optim.py --device cuda         # 45M fp32 and a 7B-like bf16 set on GPU

Timing: a fresh subprocess per tensor set (--processes of them, rounds pooled) builds the
parameters and gradients once and times every configuration on those same tensors, in
interleaved rounds: each round builds the configuration's optimizer (fresh state), takes one
warm-up step, times `--repeat` steps (median) and frees it. Every configuration thus reads and
writes the same parameter and gradient memory (on a shared VM, which physical pages a process
gets moves step times by up to 1.5x between processes; pooling a few processes averages that
over all configurations alike). Memory: each configuration in a fresh subprocess measures the
peak memory of its first two steps (optimizer state is allocated there) above the parameters +
gradients.
Dowser rows run with nonfinite="check" (atomic NaN/Inf pre-pass, the default) unless named
"skip" (one pass; NaN/Inf entries are left untouched and reported after the step).
Masks: "random" draws each entry independently (the worst case for locality); "structured"
keeps the bottom-rho entries of a Dowser-like score |W|·psi_i·alpha_j (rank-1 row/column
factors), the shape of a real Model-Dowser mask. Optimizer-state bytes/param sum the state
tensors (dowser: exp_avg, exp_avg_sq and the cached per-word prefix sums).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

SETS = {
    "45M": [(4096, 11008)],
    # Llama-2-7B's linear layers: 32 x (q, k, v, o, gate, up, down) = 6.5B parameters.
    "7B-like": [(4096, 4096)] * 4 * 32 + [(11008, 4096)] * 2 * 32 + [(4096, 11008)] * 32,
}
CONFIGS = [
    # name, optimizer, rho, mask kind, compact, nonfinite
    ("torch AdamW foreach", "foreach", None, None, None, None),
    ("torch AdamW fused", "fused", None, None, None, None),
    ("dowser rho=0.1 compact, random mask", "dowser", 0.1, "random", True, "check"),
    ("dowser rho=0.1 compact, structured mask", "dowser", 0.1, "structured", True, "check"),
    ("dowser rho=0.1 dense state, random mask", "dowser", 0.1, "random", False, "check"),
    ("dowser rho=1 compact (all-ones mask)", "dowser", 1.0, "random", True, "check"),
    ("dowser no mask (dense AdamW)", "dowser", None, None, True, "check"),
    # nonfinite="skip": one pass, no NaN/Inf pre-pass (not atomic; see README)
    ("dowser skip: rho=0.1 compact, random mask", "dowser", 0.1, "random", True, "skip"),
    ("dowser skip: rho=0.1 compact, structured mask", "dowser", 0.1, "structured", True, "skip"),
    ("dowser skip: rho=1 compact (all-ones mask)", "dowser", 1.0, "random", True, "skip"),
    ("dowser skip: no mask (dense AdamW)", "dowser", None, None, True, "skip"),
]


def _mask(shape, rho: float, kind: str, device: str, gen: torch.Generator) -> torch.Tensor:
    from dowser.ops import pack_mask

    if rho >= 1.0:
        return pack_mask(torch.ones(shape, dtype=torch.bool, device=device))
    if kind == "random":
        return pack_mask(torch.rand(shape, device=device, generator=gen) < rho)
    w = torch.randn(shape, device=device, generator=gen).abs_()
    psi = torch.randn(shape[0], 1, device=device, generator=gen).exp_()
    alpha = torch.randn(1, shape[1], device=device, generator=gen).exp_()
    w.mul_(psi).mul_(alpha)
    k = max(1, int(rho * w.numel() + 0.5))
    thresh = w.view(-1).kthvalue(k).values if device == "cpu" else w.view(-1).float().sort().values[k - 1]
    return pack_mask(w <= thresh)


def _tensors(set_name: str, device: str) -> list[torch.nn.Parameter]:
    dtype = torch.float32 if set_name == "45M" else torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    params = []
    for shape in SETS[set_name]:
        p = torch.nn.Parameter(torch.randn(shape, device=device, dtype=dtype, generator=gen))
        p.grad = torch.randn(shape, device=device, dtype=dtype, generator=gen)
        params.append(p)
    return params


def _optimizer(params: list[torch.nn.Parameter], config: int, device: str):
    import dowser

    _, kind, rho, mask_kind, compact, nonfinite = CONFIGS[config]
    if kind == "foreach":
        return torch.optim.AdamW(params, lr=1e-4, foreach=True)
    if kind == "fused":
        return torch.optim.AdamW(params, lr=1e-4, fused=True)
    gen = torch.Generator(device=device).manual_seed(1)
    masks = {} if rho is None else {p: _mask(p.shape, rho, mask_kind, device, gen) for p in params}
    return dowser.MaskedAdamW(params, masks, lr=1e-4, compact_state=compact, nonfinite=nonfinite)


def _warm_pools(device: str) -> None:
    import dowser

    if device == "cpu":  # warm the thread pools on a small problem (kept alive, see tests)
        small = torch.nn.Parameter(torch.randn(64, 64))
        small.grad = torch.randn(64, 64)
        torch.optim.AdamW([small], fused=True).step()
        dowser.MaskedAdamW([small], {}).step()


def run_memory(set_name: str, config: int, device: str) -> dict:
    """Peak memory of the first two steps and the state bytes of one configuration (run in a
    fresh process: CPU peak is the process's peak RSS)."""
    from dowser.profiling import peak_memory

    params = _tensors(set_name, device)
    n = sum(p.numel() for p in params)
    opt = _optimizer(params, config, device)
    _warm_pools(device)
    _, peak = peak_memory(lambda: [opt.step() for _ in range(2)], device)
    state_bytes = sum(t.numel() * t.element_size() for st in opt.state.values()
                      for t in st.values() if isinstance(t, torch.Tensor) and t.dim())
    state_bytes += sum(t.numel() * t.element_size() for t in getattr(opt, "_offsets", {}).values())
    k = sum(opt.trainable_count(p) for p in params) if CONFIGS[config][1] == "dowser" else n
    return {"config": config, "trainable": round(k / n, 4), "state_bytes_per_param": state_bytes / n,
            "peak_bytes_per_param": peak / n}


def run_timing(set_name: str, device: str, repeat: int, rounds: int) -> dict:
    """Per configuration: the median step time of each round, all on the same tensors."""
    from dowser.profiling import time_fn

    params = _tensors(set_name, device)
    _warm_pools(device)
    out: dict[int, list[float]] = {i: [] for i in range(len(CONFIGS))}
    mins: dict[int, float] = {}
    errors: dict[int, str] = {}
    for _ in range(rounds):
        for i in range(len(CONFIGS)):
            try:
                opt = _optimizer(params, i, device)
                t = time_fn(opt.step, warmup=1, repeat=repeat, device=device)
            except (RuntimeError, MemoryError) as exc:  # e.g. out of memory: that row says so
                errors[i] = str(exc)[-200:]
                continue
            finally:
                opt = None
                if device != "cpu":
                    torch.cuda.empty_cache()
            out[i].append(t["median_s"] * 1e3)
            mins[i] = min(mins.get(i, float("inf")), t["min_s"] * 1e3)
    return {"params": sum(p.numel() for p in params), "dtype": str(params[0].dtype).replace("torch.", ""),
            "rounds": out, "min": mins, "errors": errors}


def _child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("ROW ")]
    if out.returncode != 0 or not line:
        print(out.stderr[-2000:], file=sys.stderr)
        raise RuntimeError(out.stderr.strip()[-300:] or f"exit {out.returncode}")
    return json.loads(line[0][4:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sets", nargs="*", default=None, help="45M and/or 7B-like (GPU)")
    parser.add_argument("--repeat", type=int, default=7, help="timed steps per process")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds over the configs")
    parser.add_argument("--processes", type=int, default=3,
                        help="timing processes per set (each gets other physical pages)")
    parser.add_argument("--memory", nargs=2, metavar=("SET", "CONFIG"), help=argparse.SUPPRESS)
    parser.add_argument("--timing", metavar="SET", help=argparse.SUPPRESS)
    parser.add_argument("--notes", default="")
    args = parser.parse_args()
    if args.memory:
        print("ROW " + json.dumps(run_memory(args.memory[0], int(args.memory[1]), args.device)))
        return
    if args.timing:
        print("ROW " + json.dumps(run_timing(args.timing, args.device, args.repeat, args.rounds)))
        return
    sets = args.sets or (["45M", "7B-like"] if args.device.startswith("cuda") else ["45M"])
    rows = []
    for set_name in sets:
        timing: dict = {}
        for _ in range(args.processes):  # rounds pooled over processes
            t = _child(["--device", args.device, "--repeat", str(args.repeat), "--rounds",
                        str(args.rounds), "--timing", set_name])
            if not timing:
                timing = t
                continue
            for i, ms in t["rounds"].items():
                timing["rounds"][i] += ms
            for i, ms in t["min"].items():
                timing["min"][i] = min(timing["min"].get(i, ms), ms)
        for i, (name, *_rest) in enumerate(CONFIGS):
            row = {"set": set_name, "dtype": timing["dtype"], "params": timing["params"], "config": name}
            try:
                mem = _child(["--device", args.device, "--memory", set_name, str(i)])
            except RuntimeError as exc:
                row["error"] = str(exc)[-200:]
                rows.append(row)
                continue
            per_round = timing["rounds"][str(i)]
            if not per_round:
                row["error"] = timing["errors"].get(str(i), "not timed")
                rows.append(row)
                continue
            row.update(trainable=mem["trainable"], step_ms=statistics.median(per_round),
                       min_ms=timing["min"][str(i)], state_bytes_per_param=mem["state_bytes_per_param"],
                       peak_bytes_per_param=mem["peak_bytes_per_param"], rounds=len(per_round))
            print(row, flush=True)
            rows.append(row)
    for set_name in sets:
        fused = [r for r in rows if r.get("set") == set_name and r["config"] == "torch AdamW fused"
                 and "step_ms" in r]
        for r in rows:
            if fused and r.get("set") == set_name and "step_ms" in r:
                r["speedup_vs_fused"] = fused[0]["step_ms"] / r["step_ms"]

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import RESULTS, write_results

    md = write_results("optim", rows, args.device, notes=(
        "Step time (median over interleaved rounds, pooled over --processes processes, of the "
        "median of --repeat steps; within a process every configuration steps the same "
        "parameter and gradient tensors) and memory "
        "(each configuration in a fresh process). state_bytes_per_param: optimizer state tensors (+ dowser's cached "
        "prefix sums) per parameter; peak_bytes_per_param: peak memory of the first two steps "
        "above params + grads (CPU: peak RSS). " + args.notes))
    _plot(rows, md.with_suffix(".png"))
    print(f"wrote {md} (and .csv, .png) under {RESULTS}")


def _plot(rows: list[dict], path: Path) -> None:
    from common import pyplot

    plt = pyplot()
    if plt is None:
        return
    ok = [r for r in rows if "step_ms" in r]
    sets = list(dict.fromkeys(r["set"] for r in ok))
    fig, axes = plt.subplots(len(sets), 2, figsize=(13, 3.2 * len(sets) + 1), squeeze=False)
    for row_axes, set_name in zip(axes, sets):
        sel = [r for r in ok if r["set"] == set_name]
        labels = [r["config"] for r in sel]
        colors = ["tab:gray" if r["config"].startswith("torch") else "tab:blue" for r in sel]
        row_axes[0].barh(labels, [r["step_ms"] for r in sel], color=colors)
        row_axes[0].set_xlabel("ms / step")
        row_axes[0].set_title(f"{set_name}: step time")
        row_axes[0].invert_yaxis()
        row_axes[1].barh(labels, [r["peak_bytes_per_param"] for r in sel], color=colors)
        row_axes[1].set_xlabel("peak bytes / parameter (first steps)")
        row_axes[1].set_title(f"{set_name}: optimizer memory")
        row_axes[1].invert_yaxis()
        row_axes[1].set_yticklabels([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
