"""Shared pieces of the benchmarks: result tables (CSV + markdown under bench/results/, with
the device named, the versions and the date) and the inputs and baselines that the scripts
(bench/bench_*.py) and the pytest-benchmark suite (bench/test_bench_*.py) both time."""

from __future__ import annotations

import csv
import datetime
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import dowser  # noqa: E402
from dowser.profiling import device_name  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def environment(device: str = "cpu") -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {
        "device": device_name(device),
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": str(torch.version.cuda) if torch.cuda.is_available() else "none",
        "dowser": dowser.__version__,
        "dowser._C": str(dowser.backend_info()["_C"]["how"]),
        # the CPU ops' instruction-set path (DOWSER_CPU_CAPABILITY or the best supported; rows
        # that force another name it in a cpu_path column)
        "dowser CPU path": str(dowser.backend_info()["_C"].get("cpu_capability", "none")),
    }


def read_rows(path: Path) -> list[dict]:
    """The rows of a results CSV (none when it does not exist yet: a study starts or resumes)."""
    if not path.exists():
        return []
    with open(path) as fh:
        return list(csv.DictReader(fh))


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def write_results(name: str, rows: list[dict], device: str = "cpu", notes: str = "",
                  suffix: str = "", env: dict[str, str] | None = None, tag: str | None = None,
                  command: str | None = None) -> Path:
    """Write rows as bench/results/<name>-<device><suffix>.csv and .md; returns the markdown path.
    (A suffix names a variant run, e.g. -xeon-paths, without touching the main result files.)
    `env`, `tag` and `command` replace this process's environment, the device tag of the file
    name and the command line (bench/report.py renders a run made elsewhere)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    env = env if env is not None else environment(device)
    if tag is None:
        tag = "cpu" if torch.device(device).type == "cpu" else slug(env["device"])
    stem = RESULTS / f"{name}-{tag}{suffix}"
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(stem.with_suffix(".csv"), "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# {name}", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    if command is None:
        command = " ".join([Path(sys.argv[0]).name] + sys.argv[1:])
    lines += [f"- command: `{command}`"]
    if notes:
        lines += ["", notes]
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return stem.with_suffix(".md")


def pyplot():
    """matplotlib.pyplot on the headless Agg backend, or None when matplotlib is missing."""
    from dowser.plots import pyplot as _pyplot

    return _pyplot()


# ---- inputs and baselines shared by the scripts and the suite --------------------------------

def select_inputs(shapes, device: str = "cpu", dtype=torch.float32, batches: int = 16):
    """(W, psi, A, batch weights) per (d_out, d_in): random weights, B probe batches of
    non-negative row/column factors, integer batch weights; seeded."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for d_out, d_in in shapes:
        w = torch.randn(d_out, d_in, generator=gen).to(dtype).to(device)
        out.append((w, torch.rand(batches, d_out, generator=gen).to(device),
                    torch.rand(batches, d_in, generator=gen).to(device),
                    torch.randint(1, 5, (batches,), generator=gen).float().to(device)))
    return out


def naive_select(w, psi, a, bw, rho: float):
    """What users write today: materialise S in fp32, torch.kthvalue, compare."""
    s = w.abs().float() * ((psi * bw[:, None]).t() @ a) / bw.sum()
    k = int(rho * s.numel() + 0.5)
    thr = torch.kthvalue(s.flatten(), k).values
    return s <= thr


def make_mask(shape, rho: float, kind: str, device: str, gen: torch.Generator) -> torch.Tensor:
    """A packed mask of density rho: "random" (independent entries, the worst case for
    locality) or "structured" (bottom-rho of a rank-1-scaled |W|, like a Model-Dowser mask)."""
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


def optim_params(shapes, dtype=torch.float32, device: str = "cpu") -> list[torch.nn.Parameter]:
    """Parameters with random gradients, seeded."""
    gen = torch.Generator(device=device).manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, device=device, dtype=dtype, generator=gen))
        p.grad = torch.randn(shape, device=device, dtype=dtype, generator=gen)
        params.append(p)
    return params


def probe_batch(model, tok, layers: int, batch: int, seq: int, rademacher_draws: int):
    """One probe batch on `model`: (dowser.probe call, the authors' loop call, target names).
    Both callables probe the same synthetic prompts with R draws over the last `layers` layers."""
    from dowser import reference
    from dowser.probe import find_targets, rademacher, synthetic_prompts

    ids = synthetic_prompts(model, tok, batch=0, n_rows=batch, seq_len=seq, seed=0)
    names = list(find_targets(model, layers=layers))
    xi = rademacher(0, 0, rademacher_draws, batch, model.config.vocab_size)
    dev = next(model.parameters()).device  # the authors' loop moves nothing itself
    data = [{"input_ids": ids.to(dev), "attention_mask": torch.ones_like(ids, device=dev)}]
    xi = xi.to(dev)

    def ours():
        return dowser.probe(model, tok, layers=layers, prompts=ids, batch_size=batch,
                            n_rademacher=rademacher_draws, progress=False)

    def theirs():
        return reference.authors_probe_loop(model, data, names, [xi])
    return ours, theirs, names


def train_step(model, params, opt, batch, loss_fn) -> None:
    """One step as dowser.finetune.train takes it: forward with `loss_fn`, backward, clip the
    gradient norm to 1, step (MaskedAdamW with grads_finite=True when the clipped norm is
    finite: it proves every gradient finite), zero_grad."""
    loss = loss_fn(model, batch)
    loss.backward()
    finite = bool(torch.isfinite(torch.nn.utils.clip_grad_norm_(params, 1.0)))
    if finite and isinstance(opt, dowser.MaskedAdamW):
        opt.step(grads_finite=True)
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


RHO_DEFAULT = 0.1  # the bottom-rho fraction the benchmarks select


def measure(benchmark, fn, *, device: str, rounds: int | None, group: str, method: str,
            baseline: bool = False, cpu_path: str = "-", warmup: int = 1, **info) -> None:
    """Time `fn` with pytest-benchmark (CUDA synchronised around each call) and label the row
    for bench/report.py: group (the case), method, whether it is the case's baseline, the CPU
    path and any other facts (sizes, counts) in extra_info. `rounds` calls after `warmup`;
    rounds=None: pytest-benchmark's own calibration (as many rounds as fit its
    --benchmark-max-time, 1 s by default), for ops of a few ms whose single rounds a loaded
    machine's scheduler can stretch many times over."""
    if device.startswith("cuda"):
        def timed():
            fn()
            torch.cuda.synchronize()
    else:
        timed = fn
    benchmark.group = group
    benchmark.extra_info.update(case=group, method=method, baseline=baseline,
                                device=device_name(device) if device != "cpu" else "cpu",
                                cpu_path=cpu_path if device == "cpu" else "-", **info)
    if rounds is None:
        for _ in range(warmup):
            timed()
        benchmark(timed)
    else:
        benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=warmup)
