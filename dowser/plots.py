"""Every plot of dowser in one place: `dowser inspect --plot` (plot_masks) and the
benchmark plots (plot_bench: the pytest-benchmark suite's results, bench/report.py and
`dowser bench`). matplotlib is imported lazily, on the headless Agg backend."""

from __future__ import annotations

import re
from typing import Any


def pyplot() -> Any:
    """matplotlib.pyplot on the headless Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig: Any, path: Any, dpi: int) -> None:
    """Write `fig` to `path` atomically (a crash leaves the previous picture), in the format
    that the target's name says, and close it."""
    import os

    from dowser._artifacts import atomic_path

    with atomic_path(path) as tmp:  # the format from the target's name, not the temp file's
        fig.savefig(tmp, dpi=dpi, format=os.path.splitext(str(path))[1].lstrip(".") or "png")
    pyplot().close(fig)


def _short(name: str) -> str:
    return re.sub(r"^.*?layers\.", "", name).replace(".weight", "").replace("self_attn.", "")


def mask_method(masks) -> str:
    """The scoring method a MaskSet was built with (metadata key `method`; "dowser" before
    that key existed)."""
    return str(masks.metadata.get("method") or "dowser")


def _matrix_type(name: str) -> str:
    return name.rsplit(".", 2)[-2] if name.endswith(".weight") else name


def _binned(values, n_bins: int):
    """Mean of `values` (1-D) over n_bins contiguous bins (each value repeated over several
    bins when there are fewer values than bins)."""
    import torch

    n = values.numel()
    if n < n_bins:
        return values[torch.arange(n_bins) * n // n_bins].float()
    idx = torch.arange(n) * n_bins // n
    sums = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, values.double())
    counts = torch.bincount(idx, minlength=n_bins).double()
    return (sums / counts).float()


def plot_masks(masks, path: str) -> None:
    """Where the trainable entries sit and how the scores fall around the threshold.

    Top row: the trainable fraction of every matrix by output row and by input column (64
    bins each; one heat-map row per matrix, in layer order), and the trainable fraction per
    layer (flat at rho for the per-matrix scope, informative for scope="global").
    Bottom row: one histogram of sampled scores per matrix type, with the selection threshold
    estimated from the samples: the rho-quantile of the type's samples (scope "matrix": the
    median over its matrices; "global": the rho-quantile of every sample, one threshold)."""
    import torch

    plt = pyplot()
    if plt is None:
        raise RuntimeError("plotting needs matplotlib: pip install matplotlib")

    from dowser.ops import unpack_mask

    meta = masks.metadata
    rho, scope, method = meta.get("rho"), meta.get("scope"), mask_method(masks)
    counts = masks.counts()
    names = list(counts)
    types = list(dict.fromkeys(_matrix_type(n) for n in names))
    palette = plt.get_cmap("tab10")
    colors = {t: palette(i % 10) for i, t in enumerate(types)}
    n_bins = 64
    rows_map, cols_map, labels = [], [], []
    for name in names:
        shape = masks.shapes[name]
        if len(shape) != 2:
            continue
        bits = unpack_mask(masks[name].cpu(), shape).float()
        rows_map.append(_binned(bits.mean(1), n_bins))
        cols_map.append(_binned(bits.mean(0), n_bins))
        labels.append(name)

    fig = plt.figure(figsize=(15, 8.5))
    grid = fig.add_gridspec(2, max(3, len(types)), height_ratios=[1.25, 1])
    n_top = max(3, len(types))
    split = [n_top // 3, 2 * n_top // 3]
    ax_rows = fig.add_subplot(grid[0, :split[0]])
    ax_cols = fig.add_subplot(grid[0, split[0]:split[1]])
    ax_layer = fig.add_subplot(grid[0, split[1]:])
    vmax = max([float(m.max()) for m in rows_map + cols_map] + [1e-6])
    for ax, maps, what in ((ax_rows, rows_map, "output row"), (ax_cols, cols_map, "input column")):
        if maps:
            im = ax.imshow(torch.stack(maps).numpy(), aspect="auto", interpolation="nearest",
                           cmap="viridis", vmin=0, vmax=vmax)
            fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02, label="trainable fraction")
            step = max(1, len(labels) // 12)
            ax.set_yticks(range(0, len(labels), step))
            ax.set_yticklabels([_short(labels[i]) for i in range(0, len(labels), step)],
                               fontsize=6)
        ax.set_xlabel(f"{what} ({n_bins} bins, first to last)")
        ax.set_title(f"trainable entries by {what}", fontsize=10)

    for mtype in types:
        pts = []
        for i, name in enumerate(names):
            if _matrix_type(name) == mtype:
                nums = re.findall(r"\.(\d+)\.", name)
                t, n = counts[name]
                pts.append((int(nums[-1]) if nums else i, t / n if n else 0.0))
        pts.sort()
        ax_layer.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=mtype,
                      color=colors[mtype])
    if isinstance(rho, (int, float)):
        ax_layer.axhline(rho, color="grey", ls=":", lw=1, label=f"rho={rho}")
    top = max([t / n for t, n in counts.values() if n] + [float(rho or 0), 1e-3])
    ax_layer.set_ylim(0, top * 1.2)
    ax_layer.xaxis.get_major_locator().set_params(integer=True)
    ax_layer.set_xlabel("layer")
    ax_layer.set_ylabel("trainable fraction")
    ax_layer.set_title("trainable fraction per layer" + (" (exactly rho at scope=matrix)"
                       if scope == "matrix" else ""), fontsize=10)
    ax_layer.legend(fontsize=7, ncol=2)

    samples = {n: s.float() for n, s in masks.score_samples.items() if s.numel()}
    q = float(rho) if isinstance(rho, (int, float)) else None
    global_thr = None
    if scope == "global" and q is not None and samples:
        global_thr = float(torch.quantile(torch.cat(list(samples.values())).double(), q))
    for j, mtype in enumerate(types):
        ax = fig.add_subplot(grid[1, j])
        parts = [s for n, s in samples.items() if _matrix_type(n) == mtype]
        if not parts:
            ax.set_title(f"{mtype}: no score samples", fontsize=9)
            continue
        vals = torch.cat(parts)
        pos = vals[vals > 0]
        if pos.numel():
            ax.hist(pos.log10().numpy(), bins=50, color=colors[mtype], alpha=0.8)
        thr = global_thr
        if thr is None and q is not None:
            thr = float(torch.stack([torch.quantile(s.double(), q) for s in parts]).median())
        if thr is not None and thr > 0:
            ax.axvline(torch.tensor(thr).log10().item(), color="red", lw=1.2,
                       label=f"threshold ({'global' if global_thr is not None else 'median'})")
            ax.legend(fontsize=6, loc="upper left")
        ax.set_title(f"{mtype}\n({len(parts)} matrices)", fontsize=8)
        ax.set_xlabel("log10 score", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"{method} masks: rho={rho}, scope={scope}, "
                 f"{meta.get('model_name', '')}; left of the red line trains", fontsize=11)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def plot_bench(rows: list[dict], path, title: str = "dowser benchmark suite") -> None:
    """The benchmark suite's results (bench/report.py rows): one panel per case, a bar per
    method and CPU path, labelled with its time relative to the case's baseline (grey)."""
    plt = pyplot()
    if plt is None:
        return
    cases = list(dict.fromkeys(r["case"] for r in rows))
    heights = [sum(1 for r in rows if r["case"] == c) for c in cases]
    fig, axes = plt.subplots(len(cases), 1, figsize=(13, 0.35 * sum(heights) + 0.9 * len(cases) + 0.5),
                             squeeze=False, gridspec_kw={"height_ratios": heights})
    for ax, case in zip(axes[:, 0], cases):
        sel = [r for r in rows if r["case"] == case]
        labels = [r["method"] + ("" if r.get("cpu_path", "-") == "-" else f" [{r['cpu_path']}]") for r in sel]
        vals = [r["median_ms"] for r in sel]
        colors = ["tab:gray" if r.get("baseline") else "tab:blue" for r in sel]
        ax.barh(labels, vals, color=colors)
        for y, r in enumerate(sel):
            if "vs_baseline" in r:
                ax.text(r["median_ms"], y, f" {r['vs_baseline']:.2f}x", va="center", fontsize=7)
        ax.invert_yaxis()
        ax.set_title(case, fontsize=9, loc="left")
        ax.tick_params(labelsize=7)
        ax.set_xlabel("median ms (grey: baseline; label: baseline / row)", fontsize=7)
        ax.set_xlim(0, max(vals) * 1.25)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_size_inches()[1]))  # room for the title
    save_figure(fig, path, dpi=90)
