"""The benchmark suite (bench/) cannot rot: its quick collection holds every case, one tiny case
runs and renders, and the default test run never collects it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CASES = ["test_select_naive", "test_select_dowser", "test_pack_reference", "test_pack_dowser",
         "test_adamw_torch", "test_adamw_dowser", "test_probe", "test_step_full_ft", "test_step_dowser"]


def _pytest(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    from tests.conftest import source_path

    source_path("bench", "conftest.py")
    env = {k: v for k, v in os.environ.items() if k != "DOWSER_CPU_CAPABILITY"}
    pytest.importorskip("pytest_benchmark")
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def _report():
    """bench/report.py, imported from the clone (skipped where the tests run outside it)."""
    from tests.conftest import source_path

    bench = str(source_path("bench", "report.py").parent)
    sys.path.insert(0, bench)
    try:
        import report
    finally:
        sys.path.remove(bench)
    return report


def test_default_run_does_not_collect_the_benchmarks():
    from tests.conftest import source_path

    cfg = tomllib.loads(source_path("pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert cfg["testpaths"] == ["tests"]
    assert not list((ROOT / "tests").glob("test_bench_*ops.py"))  # the suite stays in bench/


def test_quick_suite_collects_every_case_on_every_cpu_path():
    from dowser import _ext

    out = _pytest("bench/", "--quick", "--collect-only", "-q")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    ids = [ln for ln in out.stdout.splitlines() if "::" in ln]
    for case in CASES:
        assert any(f"::{case}[" in i for i in ids), f"{case} not collected"
    if _ext.cpu_capability():
        for path in _ext.load().cpu_capabilities().split(","):
            assert any(f"test_adamw_dowser[cpu-{path}-" in i for i in ids), path


def test_bad_cpu_path_is_one_line():
    out = _pytest("bench/", "--quick", "--collect-only", "-q", "--cpu-paths=sse9")
    assert out.returncode != 0 and "--cpu-paths: sse9 not run by this CPU" in out.stderr


def test_one_tiny_case_runs_and_renders(tmp_path):
    report = _report()
    out_json = tmp_path / "tiny.json"
    out = _pytest("bench/test_bench_ops.py", "--quick", "--benchmark-only", "--cpu-paths=default",
                  "-k", "test_pack_dowser and not unpack", f"--benchmark-json={out_json}")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    data = json.loads(out_json.read_text())
    assert [b["name"] for b in data["benchmarks"]] == ["test_pack_dowser[cpu-default-pack]"]
    assert data["machine_info"]["dowser"]["cpu_paths_run"] == "default"
    rows = report.rows_of(data)
    assert rows[0]["method"] == "dowser pack_mask" and rows[0]["cpu_path"] == "default"
    assert rows[0]["median_ms"] > 0 and "vs_baseline" not in rows[0]  # its baseline did not run


def test_report_ratios_are_against_the_case_baseline():
    report = _report()

    def bench(name, median, minimum, **info):
        return {"name": name, "group": "g", "stats": {"median": median, "min": minimum, "rounds": 3},
                "extra_info": {"case": "g", **info}}
    rows = report.rows_of({"benchmarks": [
        bench("b", 0.002, 0.001, method="ours", cpu_path="avx2"),
        bench("a", 0.004, 0.003, method="theirs", baseline=True),
    ]})
    assert [r["method"] for r in rows] == ["theirs", "ours"]  # baseline first
    assert rows[1]["vs_baseline"] == pytest.approx(2.0) and rows[1]["vs_baseline_min"] == pytest.approx(3.0)
    assert rows[0]["baseline"] == "yes" and rows[0]["vs_baseline"] == pytest.approx(1.0)


def test_dowser_bench_bad_json_path_is_a_usage_error(capsys, tmp_path):
    from dowser.cli import main

    assert main(["bench", "--quick", "--json", str(tmp_path / "missing" / "x.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
