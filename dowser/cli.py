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
    print("dowser demo: op self-check against the plain-PyTorch reference")
    _cmd_selfcheck(args)
    print("\nbackends:")
    return _cmd_info(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dowser", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print which backend each op uses and why").set_defaults(func=_cmd_info)
    sub.add_parser("selfcheck", help="check every backend against the reference").set_defaults(
        func=_cmd_selfcheck)
    sub.add_parser("demo", help="the main job on a small built-in default").set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
