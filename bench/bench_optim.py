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
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make_mask, optim_params  # noqa: E402

SETS = {
    "45M": [(4096, 11008)],
    "smoke": [(256, 300)],  # a quick check that every row runs
    # Llama-2-7B's linear layers: 32 x (q, k, v, o, gate, up, down) = 6.5B parameters.
    "7B-like": [(4096, 4096)] * 4 * 32 + [(11008, 4096)] * 2 * 32 + [(4096, 11008)] * 32,
}
# name, optimizer, rho, mask kind, compact, nonfinite
TORCH_CONFIGS = [
    ("torch AdamW foreach", "foreach", None, None, None, None),
    ("torch AdamW fused", "fused", None, None, None, None),
]
DOWSER_CONFIGS = [
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
# Byte floors (CPU): the bytes a step of that mode must move, as plain torch reads/writes of
# the same tensors: the 64-byte lines of param and grad that hold a trainable entry (read;
# param written back), grad once more in check mode (the NaN/Inf pass), the compact state read
# and written, mask and offsets read.
FLOOR_CONFIGS = [
    ("byte floor rho=0.1 compact, random mask", "floor", 0.1, "random", True, "check"),
    ("byte floor rho=0.1 compact, structured mask", "floor", 0.1, "structured", True, "check"),
    ("byte floor no mask (dense AdamW)", "floor", None, None, True, "check"),
    ("byte floor skip: rho=0.1 compact, random mask", "floor", 0.1, "random", True, "skip"),
    ("byte floor skip: rho=0.1 compact, structured mask", "floor", 0.1, "structured", True, "skip"),
    ("byte floor skip: no mask (dense AdamW)", "floor", None, None, True, "skip"),
]
# Dense state is the same code on every path: timed on the first path only.
PER_PATH_ONLY_FIRST = {"dowser rho=0.1 dense state, random mask"}
PREVIOUS = "previous build"


def configs(paths: list[str], device: str, baseline: bool = False) -> list[tuple]:
    """(name, optimizer, rho, mask kind, compact, nonfinite, cpu path) of every timed row:
    torch's optimizers once, dowser's on each forced CPU instruction-set path (CPU), the byte
    floors, and with --baseline-so the dowser rows of a previous build of dowser._C."""
    out = [c + ("-",) for c in TORCH_CONFIGS]
    if device != "cpu":
        return out + [c + ("-",) for c in DOWSER_CONFIGS]
    for i, path in enumerate(paths):
        out += [c + (path,) for c in DOWSER_CONFIGS if i == 0 or c[0] not in PER_PATH_ONLY_FIRST]
    if baseline:
        out += [c + (PREVIOUS,) for c in DOWSER_CONFIGS if c[0] not in PER_PATH_ONLY_FIRST]
    return out + [c + ("-",) for c in FLOOR_CONFIGS]


CONFIGS: list[tuple] = []


class _PreviousBuild:
    """A previous build of dowser._C (--baseline-so) behind today's calling convention: builds
    from before fp32 master weights take no masters argument (their doc names no arg14)."""

    def __init__(self, path: str):
        import importlib.util

        spec = importlib.util.spec_from_file_location("dowser_previous._C", path)
        self._mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self._mod)
        self._masters = "arg14" in (self._mod.masked_adamw_cpu.__doc__ or "")

    def __getattr__(self, name):
        return getattr(self._mod, name)

    def masked_adamw_cpu(self, *args):
        return self._mod.masked_adamw_cpu(*(args if self._masters else args[:14]))

    def masked_sgd_cpu(self, *args):
        return self._mod.masked_sgd_cpu(*(args if self._masters else args[:12]))

    def cpu_capability(self) -> str:
        return PREVIOUS


def _use_path(path: str, previous) -> None:
    """Route dowser's CPU ops to `path`: an instruction set (DOWSER_CPU_CAPABILITY) or the
    previous build."""
    import os

    from dowser import _ext

    if not hasattr(_ext, "_load_current"):
        _ext._load_current = _ext.load
    if path == PREVIOUS:
        _ext.load = lambda: previous  # the ops look the module up through _ext.load() per call
        os.environ.pop("DOWSER_CPU_CAPABILITY", None)
        return
    _ext.load = _ext._load_current
    if path == "-":
        os.environ.pop("DOWSER_CPU_CAPABILITY", None)
    else:
        os.environ["DOWSER_CPU_CAPABILITY"] = path


def _mask(shape, rho: float, kind: str, device: str, gen: torch.Generator) -> torch.Tensor:
    return make_mask(shape, rho, kind, device, gen)


def _tensors(set_name: str, device: str) -> list[torch.nn.Parameter]:
    dtype = torch.bfloat16 if set_name == "7B-like" else torch.float32
    return optim_params(SETS[set_name], dtype, device)


_MASKS: dict = {}


def _masks(params, rho, mask_kind, device) -> dict:
    """The masks of one (rho, kind), built once per process (seeded: the same in every process)."""
    key = (rho, mask_kind)
    if key not in _MASKS:
        gen = torch.Generator(device=device).manual_seed(1)
        _MASKS[key] = [_mask(p.shape, rho, mask_kind, device, gen) for p in params]
    return dict(zip(params, _MASKS[key]))


class _Floor:
    """A byte floor of one mode: `step()` moves the bytes that mode's masked step must move
    (see FLOOR_CONFIGS), with plain torch ops on the same parameter and gradient tensors."""

    def __init__(self, params, masks: dict, check: bool):
        from dowser import reference

        self.work = []
        for p in params:
            mask = masks.get(p)
            n = p.numel()
            if mask is None:
                lines, k, extra = n, n, []
            else:  # fp32: 16 entries per 64-byte line, two lines per 32-bit word
                w = mask.to(torch.int64) & 0xFFFFFFFF
                frac = (((w & 0xFFFF) != 0).sum() + ((w >> 16) != 0).sum()).item() / (2 * w.numel())
                lines = int(frac * n)
                off = reference.word_offsets(mask)
                k = reference.count_trainable(mask, off)
                extra = [mask, off]
            pf, gf = p.detach().view(-1)[:lines], p.grad.view(-1)[:lines]
            self.work.append((pf, gf, torch.zeros(k), torch.zeros(k), extra))
        self.check = check
        self.state = {}

    def step(self):
        for pf, gf, m, v, extra in self.work:
            for t in extra:
                t.max()
            if self.check:
                gf.max()
            torch.add(pf, gf, alpha=0.0, out=pf)  # read param and grad lines, write param
            m.mul_(1.0)
            v.mul_(1.0)

    def zero_grad(self, set_to_none=True):
        pass


def _optimizer(params: list[torch.nn.Parameter], config: int, device: str):
    import dowser

    _, kind, rho, mask_kind, compact, nonfinite, _path = CONFIGS[config]
    if kind == "foreach":
        return torch.optim.AdamW(params, lr=1e-4, foreach=True)
    if kind == "fused":
        return torch.optim.AdamW(params, lr=1e-4, fused=True)
    masks = {} if rho is None else _masks(params, rho, mask_kind, device)
    if kind == "floor":
        return _Floor(params, masks, nonfinite == "check")
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
    _use_path(CONFIGS[config][6], None)
    opt = _optimizer(params, config, device)
    _warm_pools(device)
    _, peak = peak_memory(lambda: [opt.step() for _ in range(2)], device)
    state_bytes = sum(t.numel() * t.element_size() for st in opt.state.values()
                      for t in st.values() if isinstance(t, torch.Tensor) and t.dim())
    state_bytes += sum(t.numel() * t.element_size() for t in getattr(opt, "_offsets", {}).values())
    k = sum(opt.trainable_count(p) for p in params) if CONFIGS[config][1] == "dowser" else n
    return {"config": config, "trainable": round(k / n, 4), "state_bytes_per_param": state_bytes / n,
            "peak_bytes_per_param": peak / n}


def run_timing(set_name: str, device: str, repeat: int, rounds: int, baseline_so: str | None) -> dict:
    """Per configuration: the median step time of each round, all on the same tensors."""
    from dowser.profiling import time_fn

    previous = _PreviousBuild(baseline_so) if baseline_so else None
    params = _tensors(set_name, device)
    _warm_pools(device)
    out: dict[int, list[float]] = {i: [] for i in range(len(CONFIGS))}
    mins: dict[int, float] = {}
    errors: dict[int, str] = {}
    for _ in range(rounds):
        for i in range(len(CONFIGS)):
            try:
                _use_path(CONFIGS[i][6], previous)
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
    parser.add_argument("--paths", nargs="*", default=None,
                        help="CPU instruction-set paths to force (DOWSER_CPU_CAPABILITY), e.g. "
                             "default avx2 avx512; default: every path this CPU runs")
    parser.add_argument("--baseline-so", default=None,
                        help="also time the dowser rows with this previous build of dowser._C")
    parser.add_argument("--no-foreach", action="store_true", help="skip torch's foreach AdamW")
    parser.add_argument("--no-memory", action="store_true",
                        help="time only (no fresh process per configuration for peak memory)")
    parser.add_argument("--suffix", default="",
                        help="results file suffix: bench/results/optim-cpu<suffix>.md/.csv/.png")
    args = parser.parse_args()
    from dowser import _ext

    if args.paths is None:
        args.paths = _ext.load().cpu_capabilities().split(",") if _ext.cpu_capability() else ["-"]
    CONFIGS[:] = [c for c in configs(args.paths, args.device, bool(args.baseline_so))
                  if not (args.no_foreach and c[1] == "foreach")]
    common = ["--device", args.device, "--paths", *args.paths] + (
        ["--baseline-so", args.baseline_so] if args.baseline_so else []) + (
        ["--no-foreach"] if args.no_foreach else [])
    if args.memory:
        print("ROW " + json.dumps(run_memory(args.memory[0], int(args.memory[1]), args.device)))
        return
    if args.timing:
        print("ROW " + json.dumps(run_timing(args.timing, args.device, args.repeat, args.rounds,
                                             args.baseline_so)))
        return
    sets = args.sets or (["45M", "7B-like"] if args.device.startswith("cuda") else ["45M"])
    rows = []
    for set_name in sets:
        timing: dict = {}
        for _ in range(args.processes):  # rounds pooled over processes
            t = _child(common + ["--repeat", str(args.repeat), "--rounds", str(args.rounds),
                                 "--timing", set_name])
            if not timing:
                timing = t
                continue
            for i, ms in t["rounds"].items():
                timing["rounds"][i] += ms
            for i, ms in t["min"].items():
                timing["min"][i] = min(timing["min"].get(i, ms), ms)
        memory: dict[str, dict] = {}  # by config name: the same on every path, measured once
        for i, (name, kind, *_rest, path) in enumerate(CONFIGS):
            row = {"set": set_name, "dtype": timing["dtype"], "params": timing["params"], "config": name,
                   "cpu_path": path}
            if kind == "floor" or args.no_memory:
                mem = {"trainable": "", "state_bytes_per_param": "", "peak_bytes_per_param": ""}
            elif name in memory:
                mem = memory[name]
            else:
                try:
                    mem = memory[name] = _child(common + ["--memory", set_name, str(i)])
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
        floors = {r["config"].replace("byte floor", "dowser"): r["step_ms"] for r in rows
                  if r.get("set") == set_name and r["config"].startswith("byte floor") and "step_ms" in r}
        for r in rows:
            if fused and r.get("set") == set_name and "step_ms" in r:
                r["speedup_vs_fused"] = fused[0]["step_ms"] / r["step_ms"]
            if r.get("set") == set_name and r["config"] in floors and "step_ms" in r:
                r["vs_byte_floor"] = r["step_ms"] / floors[r["config"]]

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import RESULTS, write_results

    md = write_results("optim", rows, args.device, notes=(
        "Step time (median over interleaved rounds, pooled over --processes processes, of the "
        "median of --repeat steps; within a process every configuration steps the same "
        "parameter and gradient tensors) and memory "
        "(each configuration in a fresh process). state_bytes_per_param: optimizer state tensors (+ dowser's cached "
        "prefix sums) per parameter; peak_bytes_per_param: peak memory of the first two steps "
        "above params + grads (CPU: peak RSS). cpu_path: the CPU instruction-set path the dowser "
        "row ran on (forced with DOWSER_CPU_CAPABILITY; 'previous build': --baseline-so). "
        "vs_byte_floor: step time over the byte floor of the same mode and mask (1 = at the floor). "
        f"Load average at the end: {os.getloadavg()[0]:.1f}. " + args.notes), suffix=args.suffix)
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
        # rows without a fresh-process memory measurement (floors, --no-memory) draw no bar
        peaks = [r.get("peak_bytes_per_param") for r in sel]
        row_axes[1].barh(labels, [v if isinstance(v, (int, float)) else 0.0 for v in peaks], color=colors)
        row_axes[1].set_xlabel("peak bytes / parameter (first steps)")
        row_axes[1].set_title(f"{set_name}: optimizer memory")
        row_axes[1].invert_yaxis()
        row_axes[1].set_yticklabels([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
