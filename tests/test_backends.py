"""Backend choice, backend_info(), and the fallbacks when dowser._C is missing."""

import os
import subprocess
import sys
import textwrap

import pytest

import dowser
from dowser import _registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Prepended to a subprocess script: makes `import dowser._C` fail as if it had not been built.
BLOCK_BUILT_EXTENSION = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "dowser._C":
            raise ImportError("blocked by the test")
sys.meta_path.insert(0, Block())
"""


def _run(code: str, prelude: str = "", **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    script = prelude + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-W", "always", "-c", script],
                          capture_output=True, text=True, env=full_env, cwd=ROOT, timeout=600)


def test_backend_info_names_every_op_and_a_reason():
    info = dowser.backend_info()
    assert "_C" in info and "pack_mask" in info
    for op, per_device in info.items():
        if op == "_C":
            continue
        assert per_device["cpu"]["backend"] in _registry.BACKENDS
        assert per_device["cpu"]["why"]


def test_built_extension_is_used_when_present():
    from dowser import _ext

    if _ext.info()["how"] != "built":
        pytest.skip(f"dowser._C not built here: {_ext.info()['reason']}")
    assert dowser.backend_info()["pack_mask"]["cpu"]["backend"] == "cpp"


def test_forced_backend_and_bad_forced_backend(monkeypatch):
    monkeypatch.setenv("DOWSER_BACKEND", "reference")
    impl, why = _registry.choose("pack_mask", "cpu")
    assert impl.backend == "reference" and "DOWSER_BACKEND" in why
    monkeypatch.setenv("DOWSER_BACKEND", "fortran")
    with pytest.raises(ValueError, match="DOWSER_BACKEND"):
        _registry.choose("pack_mask", "cpu")


def test_disabled_extension_falls_back_with_one_warning():
    proc = _run("""
        import torch, dowser
        m = torch.rand(33, 97) < 0.5
        p = dowser.ops.pack_mask(m)
        assert torch.equal(dowser.ops.unpack_mask(p, m.shape), m)
        print("BACKEND", dowser.backend_info()["pack_mask"]["cpu"]["backend"])
    """, DOWSER_DISABLE_CPP="1")
    assert proc.returncode == 0, proc.stderr
    assert "BACKEND reference" in proc.stdout
    warnings = [line for line in proc.stderr.splitlines() if "RuntimeWarning: dowser:" in line]
    assert len(warnings) == 1 and "DOWSER_DISABLE_CPP=1" in warnings[0], proc.stderr


def test_missing_extension_without_jit_falls_back_with_cause():
    proc = _run(prelude=BLOCK_BUILT_EXTENSION, code="""
        import dowser
        print("BACKEND", dowser.backend_info()["pack_mask"]["cpu"]["backend"])
    """, DOWSER_DISABLE_JIT="1")
    assert proc.returncode == 0, proc.stderr
    assert "BACKEND reference" in proc.stdout
    warnings = [line for line in proc.stderr.splitlines() if "RuntimeWarning: dowser:" in line]
    assert len(warnings) == 1 and "blocked by the test" in warnings[0], proc.stderr


@pytest.mark.slow
def test_missing_extension_is_jit_built():
    from torch.utils.cpp_extension import verify_ninja_availability

    try:
        verify_ninja_availability()
    except RuntimeError:
        pytest.skip("ninja is not installed")
    proc = _run(prelude=BLOCK_BUILT_EXTENSION, code="""
        import torch, dowser
        info = dowser.backend_info()
        print("HOW", info["_C"]["how"], "BACKEND", info["pack_mask"]["cpu"]["backend"])
        m = torch.rand(70) < 0.5
        assert torch.equal(dowser.ops.unpack_mask(dowser.ops.pack_mask(m), m.shape), m)
    """)
    assert proc.returncode == 0, proc.stderr
    assert "HOW jit BACKEND cpp" in proc.stdout, proc.stdout + proc.stderr


def test_cli_info_and_selfcheck():
    import json

    info = subprocess.run([sys.executable, "-m", "dowser.cli", "info"], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert info.returncode == 0, info.stderr
    table = json.loads(info.stdout)
    assert {"_C", "pack_mask", "scores", "select_mask"} <= set(table)
    assert table["pack_mask"]["cpu"]["backend"] in ("reference", "cpp", "triton")
    check = subprocess.run([sys.executable, "-m", "dowser.cli", "selfcheck"], capture_output=True,
                           text=True, cwd=ROOT, timeout=300)
    assert check.returncode == 0, check.stderr
    rows = [line.split() for line in check.stdout.strip().splitlines()]
    assert rows and all(len(r) == 4 and r[3] == "ok" for r in rows), check.stdout
    assert {"pack_mask", "scores", "select_mask"} <= {r[0] for r in rows}
    assert set(_registry.OPS) <= {r[0] for r in rows}, check.stdout


def test_selfcheck_covers_every_op_and_backend():
    rows = dowser.selfcheck()
    assert {r["op"] for r in rows} == set(_registry.OPS)
    for op in _registry.OPS:
        assert {r["backend"] for r in rows if r["op"] == op} == set(_registry.implementations(op, "cpu"))


def test_backends_come_from_the_registry():
    """Every op has its reference; kernels are registered per device by the backend modules."""
    for op, decl in _registry.OPS.items():
        assert _registry.backends(op)[0] == "reference"
        assert _registry._IMPLS[op]["reference"].fn is decl.reference
        for backend in _registry.backends(op):
            assert set(_registry._IMPLS[op][backend].devices) <= set(_registry.DEVICES)
    assert _registry.backends("count_nonfinite") == ("reference", "cpp", "cuda")


@pytest.mark.gpu
def test_cuda_selfcheck_uses_the_gpu_kernels():
    """On a GPU: every op's CUDA-side backends agree with the reference, and the hot-path ops
    run their GPU kernels (not the reference)."""
    rows = dowser.selfcheck("cuda")
    got = {(r["op"], r["backend"]) for r in rows}
    for op in ("count_nonfinite", "masked_adamw_step", "masked_sgd_step"):
        assert (op, "cuda") in got, op
    for op in ("scores", "select_mask", "select_masks_global", "pack_mask", "unpack_mask"):
        assert (op, "triton") in got, op
    info = dowser.backend_info()
    assert all(info[op]["cuda"]["backend"] != "reference" for op in _registry.OPS), info


@pytest.mark.gpu
def test_hot_path_ops_do_not_synchronise():
    """The masked steps, count_nonfinite and a mask build issue no host synchronisation
    (torch's sync debug mode turns any into an error)."""
    import importlib

    import torch

    sc = importlib.import_module("dowser.selfcheck")
    calls = {op: sc.inputs(op, "cuda") for op in ("count_nonfinite", "masked_adamw_step",
                                                  "masked_sgd_step", "select_mask",
                                                  "select_masks_global")}
    for op, args in calls.items():  # warm up (Triton compiles, allocator)
        getattr(torch.ops.dowser, op)(*sc.inputs(op, "cuda"))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for op, args in calls.items():
            getattr(torch.ops.dowser, op)(*args)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
