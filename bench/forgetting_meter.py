"""Does the data-free forgetting meter track held-out forgetting? Analysis of the study's runs.

    python bench/forgetting_meter.py                      # bench/results/forgetting-meter-runs-cpu.csv
    python bench/forgetting_meter.py --csv PATH --tag -meter

Every run of the learning-forgetting study (bench/forgetting.py) carries the meter's columns
(meter_kl: KL(base || tuned) per token on 32 texts SmolLM2 wrote itself; meter_kl_se, meter_ce,
meter_agree, meter_s). This script reports, per regime (tuned depth) and over all runs, the
Spearman rank correlation of meter_kl with the held-out forgetting dCE_up and with dA_up, each
with a 95% bootstrap interval (runs resampled with replacement), the same for the mask runs,
LoRA and full FT separately, the runs where the two rankings disagree most, the cost of one
measurement next to one training step, and a scatter plot. It writes
bench/results/forgetting-meter-analysis-cpu.md / .png and the results block of docs/forgetting.md.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, pyplot  # noqa: E402
from forgetting import COLORS, read_rows  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs" / "forgetting.md"
BEGIN, END = "<!-- meter:begin (bench/forgetting_meter.py) -->", "<!-- meter:end -->"


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho (average ranks for ties); nan for fewer than 3 points or no spread."""
    from scipy.stats import rankdata

    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(np.corrcoef(rankdata(x), rankdata(y))[0, 1])  # = scipy's spearmanr, faster


def bootstrap_ci(x: np.ndarray, y: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of Spearman's rho over runs resampled with replacement."""
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        i = rng.integers(0, len(x), len(x))
        r = spearman(x[i], y[i])
        if not math.isnan(r):
            vals.append(r)
    if len(vals) < n_boot // 2:
        return float("nan"), float("nan")
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))


def family(r: dict) -> str:
    return {"full": "full FT", "lora": "LoRA"}.get(r["method"], "masks")


def corr_rows(runs: list[dict], depths: list[int]) -> list[str]:
    out = ["| runs | n | rho(meter KL, dCE_up) [95% CI] | rho(meter KL, dA_up) [95% CI] | "
           "rho(1 - agreement, dCE_up) |", "|---|---|---|---|---|"]
    groups: list[tuple[str, list[dict]]] = [("all", runs)]
    for L in depths:
        groups.append((f"{L} layers", [r for r in runs if int(r["layers"]) == L]))
    for fam in ("masks", "LoRA", "full FT"):
        groups.append((fam, [r for r in runs if family(r) == fam]))
    for name, rs in groups:
        if len(rs) < 3:
            out.append(f"| {name} | {len(rs)} | (fewer than 3 runs) | | |")
            continue
        kl = np.array([float(r["meter_kl"]) for r in rs])
        dce = np.array([float(r["dCE_up"]) for r in rs])
        da = np.array([float(r["dA_up"]) for r in rs])
        dis = 1 - np.array([float(r["meter_agree"]) for r in rs])
        cells = []
        for y in (dce, da):
            rho = spearman(kl, y)
            lo, hi = bootstrap_ci(kl, y)
            cells.append(f"{rho:+.3f} [{lo:+.3f}, {hi:+.3f}]")
        out.append(f"| {name} | {len(rs)} | {cells[0]} | {cells[1]} | {spearman(dis, dce):+.3f} |")
    return out


def disagreements(runs: list[dict], k: int = 6) -> list[str]:
    """The runs whose meter rank and dCE_up rank (within their regime) differ most."""
    out = ["| layers | method | lr | seed | meter KL | rank (meter) | dCE_up | rank (dCE_up) | dA_up |",
           "|---|---|---|---|---|---|---|---|---|"]
    scored = []
    for L in sorted({int(r["layers"]) for r in runs}, reverse=True):
        rs = [r for r in runs if int(r["layers"]) == L]
        n = len(rs)
        if n < 3:
            continue
        rk = _ranks([float(r["meter_kl"]) for r in rs])
        rd = _ranks([float(r["dCE_up"]) for r in rs])
        for r, a, b in zip(rs, rk, rd):
            scored.append((abs(a - b) / n, r, a, b, n))
    scored.sort(key=lambda t: -t[0])
    for gap, r, a, b, n in scored[:k]:
        out.append(f"| {r['layers']} | {r['config']} | {r['lr']} | {r['seed']} | {float(r['meter_kl']):.4f} | "
                   f"{a:.0f}/{n} | {float(r['dCE_up']):+.4f} | {b:.0f}/{n} | {float(r['dA_up']):+.4f} |")
    return out


def method_gaps(runs: list[dict]) -> list[str]:
    """Systematic disagreement per method: the mean of (meter rank - dCE_up rank) / n over its
    runs, ranks taken within each regime. > 0: the meter reads more drift for the method than
    the held-out text shows (it drifts on the base's own texts); < 0: the reverse."""
    gaps: dict[tuple[int, str], list[float]] = {}
    for L in sorted({int(r["layers"]) for r in runs}, reverse=True):
        rs = [r for r in runs if int(r["layers"]) == L]
        if len(rs) < 3:
            continue
        rk = _ranks([float(r["meter_kl"]) for r in rs])
        rd = _ranks([float(r["dCE_up"]) for r in rs])
        for r, a, b in zip(rs, rk, rd):
            gaps.setdefault((L, r["config"]), []).append((a - b) / len(rs))
    out = ["| layers | method | runs | mean rank gap (meter - dCE_up) / n | largest |", "|---|---|---|---|---|"]
    order = list(COLORS)
    for (L, c), g in sorted(gaps.items(), key=lambda kv: (-kv[0][0], order.index(kv[0][1])
                                                           if kv[0][1] in order else 99)):
        out.append(f"| {L} | {c} | {len(g)} | {statistics.mean(g):+.3f} | {max(g, key=abs):+.3f} |")
    return out


def _ranks(v: list[float]) -> list[float]:
    from scipy.stats import rankdata

    return list(rankdata(v))


def lr_table(runs: list[dict]) -> list[str]:
    """Per method and lr (mean over seeds): meter KL next to held-out dCE_up and A_down, the
    table a user would read to pick a learning rate."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((int(r["layers"]), r["config"], float(r["lr"])), []).append(r)
    out = ["| layers | method | lr | n | meter KL | meter agreement | dCE_up | dA_up | A_down |",
           "|---|---|---|---|---|---|---|---|---|"]
    order = list(COLORS)
    for (L, c, lr), rs in sorted(groups.items(), key=lambda kv: (-kv[0][0], order.index(kv[0][1])
                                                                 if kv[0][1] in order else 99, kv[0][2])):
        m = lambda k: statistics.mean(float(r[k]) for r in rs)  # noqa: E731
        out.append(f"| {L} | {c} | {lr:.0e} | {len(rs)} | {m('meter_kl'):.4f} | {m('meter_agree'):.3f} | "
                   f"{m('dCE_up'):+.4f} | {m('dA_up'):+.4f} | {m('A_down'):.3f} |")
    return out


def cost_line(runs: list[dict], conditions: str = "") -> str:
    ms = [float(r["meter_s"]) for r in runs if r.get("meter_s")]
    st = [float(r["step_s"]) for r in runs if r.get("step_s")]
    if not ms or not st:
        return "cost: no timed runs yet"
    return (f"cost of one measurement: median {statistics.median(ms):.2f} s (min {min(ms):.2f}, max {max(ms):.2f}) "
            f"vs median training step {statistics.median(st):.2f} s (min {min(st):.2f}) over {len(ms)} runs: "
            f"{statistics.median(ms) / statistics.median(st):.2f} steps per measurement"
            + (f" ({conditions})" if conditions else ""))


def plot(runs: list[dict], depths: list[int], out: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    markers = {L: m for L, m in zip(depths, "os^D")}
    for ax, col, label in ((axes[0], "dCE_up", "held-out dCE_up (nats/token)"),
                           (axes[1], "dA_up", "held-out dA_up")):
        for c in COLORS:
            for L in depths:
                rs = [r for r in runs if r["config"] == c and int(r["layers"]) == L]
                if not rs:
                    continue
                ax.errorbar([float(r["meter_kl"]) for r in rs], [float(r[col]) for r in rs],
                            xerr=[float(r["meter_kl_se"]) for r in rs], fmt=markers.get(L, "o"),
                            color=COLORS[c], alpha=0.8, markersize=5, elinewidth=0.6,
                            label=f"{c} ({L} layers)")
        ax.set_xscale("log")
        ax.set_xlabel("meter KL(base || tuned), nats/token (log scale; bars: ± 1 s.e.)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, ncol=2)
    fig.suptitle("data-free forgetting meter vs held-out forgetting, one point per run")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv", default=str(RESULTS / "forgetting-meter-runs-cpu.csv"))
    ap.add_argument("--depths", type=int, nargs="+", default=[30, 8])
    ap.add_argument("--total", type=int, default=126, help="runs in the whole grid (for the done count)")
    ap.add_argument("--out", default="forgetting-meter-analysis-cpu", help="name of the .md/.png in bench/results (not forgetting-meter-cpu: bench/forgetting.py --tag=-meter writes that)")
    ap.add_argument("--conditions", default="2 study workers of 1 torch thread each on this 2-core CPU; "
                    "the first 7 runs beside CI jobs",
                    help="how the timed runs ran, printed next to the cost")
    ap.add_argument("--no-docs", action="store_true", help="do not update docs/forgetting.md")
    args = ap.parse_args()
    path = Path(args.csv)
    rows = read_rows(path)
    runs = [r for r in rows if r["config"] != "zero-shot" and r.get("meter_kl")]
    zero = [r for r in rows if r["config"] == "zero-shot"]
    lines = [f"- runs CSV: `{os.path.relpath(path, RESULTS.parent.parent)}`: {len(runs)} of {args.total} runs "
             "of the grid measured" + (f"; zero-shot meter KL {float(zero[0]['meter_kl']):.4g} (must be 0)"
                                       if zero and zero[0].get("meter_kl") else ""),
             f"- {cost_line(runs, args.conditions)}", ""]
    if runs:
        lines += ["Spearman rank correlation over runs (95% bootstrap interval, 2000 resamples of the runs). "
                  "More forgetting is a larger dCE_up and a more negative dA_up, so agreement reads as "
                  "rho > 0 with dCE_up and rho < 0 with dA_up.", ""]
        lines += corr_rows(runs, args.depths)
        lines += ["", "Runs where the meter's rank and the dCE_up rank differ most (within their regime):", ""]
        lines += disagreements(runs)
        lines += ["", "Per method: does the meter read systematically more (> 0) or less (< 0) drift than "
                  "the held-out text shows? Mean rank gap within the regime, as a fraction of its runs:", ""]
        lines += method_gaps(runs)
        lines += ["", "Meter and held-out forgetting per method and learning rate (mean over seeds):", ""]
        lines += lr_table(runs)
    png = plot(runs, args.depths, RESULTS / f"{args.out}.png") if runs else None
    md = RESULTS / f"{args.out}.md"
    md.write_text("# forgetting meter vs held-out forgetting\n\n" + "\n".join(lines) + "\n"
                  + (f"\n![meter vs held-out]({png.name})\n" if png else ""))
    print("\n".join(lines))
    print("wrote", md, png or "")
    if not args.no_docs and DOCS.exists():
        text = DOCS.read_text()
        if BEGIN in text and END in text:
            rel = lambda p: os.path.relpath(p, DOCS.parent)  # noqa: E731
            body = [f"From `{rel(md)}` (regenerated by `python bench/forgetting_meter.py`):", ""] + lines
            if png:
                body += ["", f"![meter vs held-out forgetting]({rel(png)})"]
            head, rest = text.split(BEGIN, 1)
            DOCS.write_text(head + BEGIN + "\n" + "\n".join(body) + "\n" + END + rest.split(END, 1)[1])
            print("updated", DOCS)


if __name__ == "__main__":
    main()
