"""Render a pytest-benchmark JSON of the suite (bench/test_bench_*.py) as dowser's result
tables: bench/results/suite-<machine><suffix>.{md,csv,png} (and the JSON copied beside them
as .json), the machine named (CPU model,
instruction-set paths or GPU, torch/triton/CUDA versions) from the JSON itself, so a file a
user sends back renders the same here.

    python bench/report.py bench/results/suite-cpu-amd-epyc-quick.json
    pytest-benchmark compare A.json B.json     # two runs or two machines, op by op

Each row: the case (a pytest-benchmark group), the method, the CPU path of dowser rows, the
median and min time, and vs_baseline = the case baseline's median / this row's median (> 1:
faster than the baseline, timed in the same process).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import slug, write_results  # noqa: E402


def rows_of(data: dict) -> list[dict]:
    """One row per benchmark of a pytest-benchmark JSON, with vs_baseline per case."""
    rows = []
    for b in data["benchmarks"]:
        x = b.get("extra_info", {})
        row = {"case": x.get("case", b.get("group") or b["name"]), "method": x.get("method", b["name"]),
               "cpu_path": x.get("cpu_path", "-"), "median_ms": b["stats"]["median"] * 1e3,
               "min_ms": b["stats"]["min"] * 1e3}
        row["rounds"] = b["stats"]["rounds"]
        for key in ("entries", "trainable", "targets"):
            if key in x:
                row[key] = x[key]
        row["_baseline"] = bool(x.get("baseline"))
        rows.append(row)
    for row in rows:
        base = [r for r in rows if r["case"] == row["case"] and r["_baseline"]]
        if base:
            row["vs_baseline"] = base[0]["median_ms"] / row["median_ms"]
            # min/min as well: on a loaded machine the fastest round is the least disturbed
            row["vs_baseline_min"] = base[0]["min_ms"] / row["min_ms"]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    rows.sort(key=lambda r: (cases.index(r["case"]), not r["_baseline"]))  # stable: run order
    order = ["case", "method", "cpu_path", "baseline", "median_ms", "min_ms", "vs_baseline",
             "vs_baseline_min", "rounds", "entries", "trainable", "targets"]
    for row in rows:
        row["baseline"] = "yes" if row.pop("_baseline") else ""
    present = [k for k in order if any(k in r for r in rows)]  # same columns, same order, every row
    return [{k: row.get(k, "") for k in present} for row in rows]


def machine_tag(data: dict) -> str:
    """suite-<tag>: the GPU when one ran, else the CPU model; -quick for quick runs."""
    info = data.get("machine_info", {}).get("dowser", {})
    cpu = data.get("machine_info", {}).get("cpu", {}).get("brand_raw") or info.get("device", "cpu")
    gpu = info.get("gpu", "none")
    name = gpu if gpu != "none" and "cuda" in info.get("devices_run", "") else "cpu-" + cpu.split("(")[0]
    return slug(name) + ("-quick" if info.get("quick") == "True" else "")


def render(path: Path, suffix: str = "") -> Path:
    data = json.loads(Path(path).read_text())
    rows = rows_of(data)
    info = dict(data.get("machine_info", {}).get("dowser", {}))
    env = {k: info.pop(k) for k in list(info) if k in ("device", "date", "python", "torch", "triton",
                                                         "cuda", "dowser", "dowser._C", "dowser CPU path")}
    env["CPU paths run"] = info.get("cpu_paths_run", "?")
    env["GPU"] = info.get("gpu", "none")
    env["load average (1 min) at start"] = info.get("load_average_1min_at_start", "?")
    env["json"] = f"suite-{machine_tag(data)}{suffix}.json"
    notes = ("pytest-benchmark suite (bench/test_bench_*.py). Each case (a pytest-benchmark group) "
             "times its baseline in the same process; vs_baseline = baseline median / row median "
             "(> 1: faster). cpu_path: the CPU instruction-set path the dowser row was forced to "
             "(DOWSER_CPU_CAPABILITY). Wall-clock medians: on a shared machine they move with "
             "the load (see the load average above).")
    command = data.get("commit_info", {}).get("id", "")
    md = write_results("suite", rows, "cpu", notes, suffix=suffix, env=env, tag=machine_tag(data),
                       command="pytest bench/ --benchmark-only" + (" --quick" if info.get("quick") == "True" else "")
                       + (f" (commit {command[:10]})" if command else ""))
    from dowser.plots import plot_bench

    plot_bench(rows, md.with_suffix(".png"), title=f"dowser benchmark suite: {env.get('device', '')}")
    keep = md.with_suffix(".json")  # the JSON beside its tables, under the same machine name
    if Path(path).resolve() != keep.resolve():
        shutil.copyfile(path, keep)
    return md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("json", nargs="+", type=Path, help="pytest-benchmark JSON file(s)")
    ap.add_argument("--suffix", default="", help="results file suffix")
    args = ap.parse_args(argv)
    for path in args.json:
        if not path.is_file():
            ap.error(f"{path}: no such file")
        print(f"wrote {render(path, args.suffix)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
