"""The package as users get it: one version, `dowser info`, and a compiled extension refused when
it does not belong to this Python layer (dowser/_ext.py)."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

import dowser
from dowser import _build_config, _ext
from dowser._version import __version__

ROOT = Path(__file__).resolve().parents[1]


def test_the_version_is_written_in_one_place():
    import importlib.metadata

    assert dowser.__version__ == __version__
    pyproject = ROOT / "pyproject.toml"
    if pyproject.is_file():  # source tree: pyproject takes it from dowser/_version.py
        text = pyproject.read_text()
        assert 'dynamic = ["version"]' in text and "dowser._version.__version__" in text
        assert 'name = "model-dowser"' in text
    try:
        installed = importlib.metadata.version("model-dowser")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("model-dowser is not installed")
    assert installed == __version__, "reinstall: the installed metadata is of another version"


def test_info_prints_versions_and_the_extension_build():
    proc = subprocess.run([sys.executable, "-m", "dowser.cli", "info"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    head = json.loads(proc.stdout)["dowser"]
    assert head["version"] == __version__
    assert {"torch", "triton", "transformers", "peft", "trl"} <= set(head["packages"])
    import torch

    assert head["packages"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    ext = head["extension"]
    assert {"how", "file", "stamp", "cpu_path", "cuda"} <= set(ext)
    if ext["how"] is not None:
        assert ext["stamp"] == ext["expected_stamp"]
        assert ext["cpu_path"] in ("default", "avx2", "avx512", "neon")
        assert isinstance(ext["cuda"], bool)


def test_the_stamp_follows_version_and_sources(tmp_path):
    for sub in ("cpu", "include/dowser"):
        (tmp_path / sub).mkdir(parents=True)
    (tmp_path / "ops.cpp").write_text("int x;\n")
    (tmp_path / "cpu" / "a.cpp").write_text("int a;\n")
    stamp = _build_config.build_stamp("1.2.3rc1", tmp_path)
    assert stamp.isidentifier() and stamp.startswith("v1_2_3rc1_src")  # the preprocessor's token
    assert _build_config.build_stamp("1.2.4", tmp_path) != stamp
    (tmp_path / "cpu" / "a.cpp").write_text("int a = 1;\n")
    assert _build_config.build_stamp("1.2.3rc1", tmp_path) != stamp
    changed = _build_config.build_stamp("1.2.3rc1", tmp_path)
    (tmp_path / "notes.txt").write_text("not a source")  # not part of the build
    assert _build_config.build_stamp("1.2.3rc1", tmp_path) == changed
    header = _build_config.write_stamp_header(tmp_path / "gen", stamp) / "dowser_stamp.h"
    assert f"#define DOWSER_BUILD_STAMP {stamp}" in header.read_text()


def test_a_mismatched_extension_is_named_with_how_to_rebuild():
    good = types.SimpleNamespace(__name__="dowser._C", __file__="/x/_C.so", build_stamp="vA")
    assert _ext.stamp_problem(good, "vA") is None
    why = _ext.stamp_problem(good, "vB")
    assert "vA" in why and "vB" in why and "/x/_C.so" in why and "pip install" in why
    old = types.SimpleNamespace(__name__="dowser._C", __file__="/x/_C.so")
    assert "no build stamp" in _ext.stamp_problem(old, "vB")


def test_the_extension_in_use_carries_the_expected_stamp():
    info = _ext.build_info()
    if info["how"] is None:
        pytest.skip(f"no C++ extension here: {info['reason']}")
    assert info["stamp"] == _ext.expected_stamp(), info


def test_a_stale_extension_is_refused_with_one_warning_and_the_reference_takes_over():
    """Simulate a dowser._C built from other sources: import refuses it before any op runs,
    in one warning line saying how to rebuild, and every op still works (reference)."""
    code = (
        "import json, warnings\n"
        "warnings.simplefilter('always')\n"
        "from dowser import _build_config\n"
        "_build_config.build_stamp = lambda version, csrc: 'v0_src0000000000000000'\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch, dowser\n"
        "    from dowser import _ext\n"
        "    info = _ext.build_info()\n"
        "    m = torch.rand(100) < 0.3\n"
        "    ok = torch.equal(dowser.ops.unpack_mask(dowser.ops.pack_mask(m), m.shape), m)\n"
        "mine = [str(w.message) for w in seen if 'dowser' in str(w.message)]\n"
        "print(json.dumps({'warnings': mine, 'how': info['how'], 'ok': ok}))\n")
    env = {**os.environ, "DOWSER_DISABLE_JIT": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["ok"] and out["how"] is None, out
    if _ext.build_info()["how"] != "built":
        pytest.skip("no built dowser._C here to refuse")
    assert len(out["warnings"]) == 1, out["warnings"]
    line = out["warnings"][0]
    assert "\n" not in line and "refused" in line and "v0_src0000000000000000" in line, line
    assert "pip install --no-build-isolation" in line, line
