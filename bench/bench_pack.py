"""Benchmark mask packing: each dowser backend against the bool tensor users would keep.

    python bench/bench_pack.py [--device cuda]
"""

from __future__ import annotations

import argparse

import torch
from common import write_results

from dowser import _registry
from dowser.profiling import time_fn


def run(device: str) -> list[dict]:
    rows = []
    for shape in [(4096, 4096), (4096, 11008)]:
        mask = torch.rand(shape, device=device) < 0.1
        for backend, fn in _registry.implementations("pack_mask", device).items():
            if backend == "triton" and device == "cpu":
                continue  # the interpreter is for correctness, not speed
            t = time_fn(lambda: fn(mask), device=device)
            rows.append({"op": "pack_mask", "shape": "x".join(map(str, shape)), "backend": backend,
                         "median_ms": t["median_s"] * 1e3,
                         "bool_bytes": mask.numel(), "packed_bytes": (mask.numel() + 31) // 32 * 4})
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    write_results("pack", run(args.device), args.device,
                  notes="Packed masks take 1/8 of a bool mask's memory.")
