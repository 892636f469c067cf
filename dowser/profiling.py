"""Timing and peak-memory measurement shared by the benchmarks and the memory tests."""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable

import torch


def _read_status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux: write 5 to clear_refs); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_memory(fn: Callable[[], object], device: str | torch.device = "cpu") -> tuple[object, int]:
    """Run `fn` and return (its result, extra peak bytes it needed above the memory in use before).

    On CPU this is the process's peak resident set (reset just before `fn`) minus its resident
    set before; run it in a fresh subprocess for clean numbers. On CUDA it is
    torch.cuda.max_memory_allocated minus memory_allocated before.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        out = fn()
        torch.cuda.synchronize(dev)
        return out, torch.cuda.max_memory_allocated(dev) - before
    if not reset_peak_rss():
        raise RuntimeError("peak RSS cannot be reset here (needs Linux /proc/self/clear_refs)")
    before = _read_status_kib("VmRSS")
    out = fn()
    peak = _read_status_kib("VmHWM")
    return out, max(0, peak - before) * 1024


def time_fn(fn: Callable[[], object], *, warmup: int = 1, repeat: int = 5,
            device: str | torch.device = "cpu") -> dict[str, float]:
    """Median/min wall time of `fn` in seconds, synchronising CUDA around each call."""
    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "repeat": repeat}


def device_name(device: str | torch.device = "cpu") -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    model = "cpu"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
