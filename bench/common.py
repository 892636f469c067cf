"""Result tables for benchmarks: CSV + markdown under bench/results/, with the device named,
the versions and the date, and an optional plot beside them."""

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
        "dowser": dowser.__version__,
        "dowser._C": str(dowser.backend_info()["_C"]["how"]),
        # the CPU ops' instruction-set path (DOWSER_CPU_CAPABILITY or the best supported; rows
        # that force another name it in a cpu_path column)
        "dowser CPU path": str(dowser.backend_info()["_C"].get("cpu_capability", "none")),
    }


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def write_results(name: str, rows: list[dict], device: str = "cpu", notes: str = "",
                  suffix: str = "") -> Path:
    """Write rows as bench/results/<name>-<device><suffix>.csv and .md; returns the markdown path.
    (A suffix names a variant run, e.g. -xeon-paths, without touching the main result files.)"""
    RESULTS.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    tag = "cpu" if torch.device(device).type == "cpu" else slug(env["device"])
    stem = RESULTS / f"{name}-{tag}{suffix}"
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(stem.with_suffix(".csv"), "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# {name}", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += [f"- command: `{' '.join([Path(sys.argv[0]).name] + sys.argv[1:])}`"]
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
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
