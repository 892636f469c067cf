"""The pytest-benchmark suite of dowser (bench/test_bench_*.py): every op and a training step
against what users would otherwise run, each baseline timed in the same process.

    pytest bench/ --benchmark-only [--quick] [--benchmark-json out.json]
    dowser bench [--quick]          # the same, JSON and tables into bench/results/

Options: --quick (every case at a small size; the whole suite in under 2 minutes on a 2-core
CPU), --cpu-paths (CPU instruction-set paths for the dowser rows, default: every path this
CPU runs; forced with DOWSER_CPU_CAPABILITY), --devices (default: cpu, and cuda when torch
sees a GPU). Not collected by the default `python -m pytest` (testpaths = tests).
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_addoption(parser):
    group = parser.getgroup("dowser bench")
    group.addoption("--quick", action="store_true",
                    help="every case at a small size (the suite in < 2 min on a 2-core CPU)")
    group.addoption("--cpu-paths", default=None,
                    help="comma-separated CPU instruction-set paths for the dowser rows "
                         "(default: every path this CPU runs, e.g. default,avx2)")
    group.addoption("--devices", default=None,
                    help="comma-separated devices (default: cpu, plus cuda when available)")


def _paths(config) -> list[str]:
    from dowser import _ext

    supported = _ext.load().cpu_capabilities().split(",") if _ext.cpu_capability() else ["-"]
    want = config.getoption("--cpu-paths")
    if not want:
        return supported
    paths = [p.strip() for p in want.split(",") if p.strip()]
    bad = [p for p in paths if p not in supported]
    if bad:
        raise pytest.UsageError(f"--cpu-paths: {', '.join(bad)} not run by this CPU "
                                f"(it runs {', '.join(supported)})")
    return paths


def _devices(config) -> list[str]:
    want = config.getoption("--devices")
    devices = [d.strip() for d in want.split(",")] if want else (
        ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    bad = [d for d in devices if d not in ("cpu", "cuda")]
    if bad:
        raise pytest.UsageError(f"--devices: unknown {', '.join(bad)} (cpu, cuda)")
    return devices


def pytest_configure(config):
    config._dowser_paths = _paths(config)
    config._dowser_devices = _devices(config)


def pytest_generate_tests(metafunc):
    """`target` = (device, cpu path) of a dowser row: every CPU path on cpu, '-' on cuda;
    `device` = a device alone (baselines, and cases whose cost is not the CPU kernels')."""
    cfg = metafunc.config
    if "target" in metafunc.fixturenames:
        targets = [("cpu", p) for p in cfg._dowser_paths if "cpu" in cfg._dowser_devices]
        targets += [("cuda", "-")] if "cuda" in cfg._dowser_devices else []
        metafunc.parametrize("target", targets, ids=[f"{d}-{p}" if d == "cpu" else d for d, p in targets])
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", cfg._dowser_devices)


@pytest.fixture(scope="session")
def quick(request) -> bool:
    return bool(request.config.getoption("--quick"))


@pytest.fixture
def use_path(monkeypatch):
    """Route dowser's CPU ops to an instruction-set path for this test (read at every call)."""
    def use(path: str) -> None:
        if path == "-":
            monkeypatch.delenv("DOWSER_CPU_CAPABILITY", raising=False)
        else:
            monkeypatch.setenv("DOWSER_CPU_CAPABILITY", path)
    return use


def pytest_benchmark_update_machine_info(config, machine_info):
    """Name the machine in the JSON: CPU model, instruction-set paths, GPU, versions, load."""
    from common import environment

    info = environment("cpu")
    info["cpu_paths_run"] = ",".join(config._dowser_paths)
    info["devices_run"] = ",".join(config._dowser_devices)
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    info["quick"] = str(bool(config.getoption("--quick")))
    info["machine"] = platform.machine()
    info["load_average_1min_at_start"] = f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "?"
    machine_info["dowser"] = info
