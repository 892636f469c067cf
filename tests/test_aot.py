"""Ahead-of-time compile check (dowser.kernels.aot): every Triton kernel of dowser, for every
specialisation its wrapper can launch, compiles for sm_80 and sm_90 with the real Triton
compiler and its bundled ptxas -- no GPU needed -- with no spills, one compile per (kernel,
dtype, layout, mode), FP fusion pinned, and no fence or ordered atomic in any selection pass.
And the check itself catches broken kernels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "0")  # silences Triton 3.9's warning; launches pin it
    return env


def _has_nvidia_backend() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


pytestmark = pytest.mark.skipif(not _has_nvidia_backend(), reason="triton without its NVIDIA backend")


GROUPS = """
import json
from dowser.kernels import aot
launches = aot.enumerate_launches()
groups = {}
for launch in launches:
    assert launch.options == {"enable_fp_fusion": False}, launch.options
    groups.setdefault(aot._group_of(launch), set()).add(
        aot.spec_key(launch.kernel, launch.args, launch.constexprs))
print(json.dumps({"launches": len(launches), "groups": [[list(map(str, g)), len(s)] for g, s in groups.items()]}))
"""


def test_one_specialisation_per_kernel_dtype_layout_mode():
    """Fast half of the check (no compile): over shapes, B = 1 / B > 1, k and strides, every
    (kernel, dtype, layout, mode) launches a single specialisation, with FP fusion pinned."""
    proc = subprocess.run([sys.executable, "-c", GROUPS], capture_output=True, text=True,
                          cwd=ROOT, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    many = [g for g, n in result["groups"] if n != 1]
    assert not many, many
    names = {g[0] for g, _ in result["groups"]}
    assert {"_pass_kernel", "_pass_tile_kernel", "_scores_kernel", "_scores_tile_kernel"} <= names
    assert len(result["groups"]) == 75


@pytest.mark.slow  # ~50 CPU-seconds cold; ~2 s with Triton's compile cache warm
def test_every_kernel_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, "-m", "dowser.kernels.aot", "--json", str(out)],
                          capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=900)
    print(proc.stdout[-6000:])
    result = json.loads(out.read_text())
    assert proc.returncode == 0 and result["ok"], "\n".join(result["problems"]) + proc.stderr[-3000:]
    kernels = {r["kernel"] for r in result["kernels"]}
    assert kernels == {"_pass_kernel", "_pass_tile_kernel", "_find_bin_kernel", "_scores_kernel",
                       "_scores_tile_kernel", "_pack_kernel", "_unpack_kernel"}
    rows = result["kernels"]
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    # every selection pass, dtype and layout, both architectures
    passes = {(r["kernel"], r["dtype"], r["layout"], r["mode"], r["arch"]) for r in rows
              if "pass" in r["kernel"]}
    assert len(passes) == 2 * 3 * 3 * 3 * 2
    assert all(r["spills"] == 0 and r["regs"] > 0 for r in rows)
    for r in rows:
        if "pass" not in r["kernel"]:
            continue
        assert r["fences"] == 0
        glob = [op for op in r["atomic_ops"] if "shared" not in op]
        if r["mode"] == "HIST":
            assert glob and all(".relaxed" in op for op in glob), r
        else:
            assert not glob, r


BROKEN = '''
import json, sys
import torch
import triton
import triton.language as tl
from dowser.kernels import aot
from dowser.kernels._launch import Launch

@triton.jit
def _pass_kernel(key_ptr, hist_ptr, n, MODE: tl.constexpr, BLOCK: tl.constexpr):
    # The old histogram pass: one default (acq_rel) global atomic per element.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    key = tl.load(key_ptr + offs, mask=offs < n, other=0)
    tl.atomic_add(hist_ptr + (key >> 16), 1, mask=offs < n)

@triton.jit
def spilly(x_ptr, out_ptr, BLOCK: tl.constexpr):
    # 16384 live fp32 values in one warp: 512 per thread, far past the 255-register limit.
    x = tl.load(x_ptr + tl.arange(0, BLOCK))
    y = tl.cumsum(x * x, axis=0)
    tl.store(out_ptr + tl.arange(0, BLOCK), tl.flip(y, 0) + x)

@triton.jit
def specialised(x_ptr, B, BLOCK: tl.constexpr):
    # B is not do_not_specialize: B = 1 and B = 5 are two compiles.
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs) * B)

keys = torch.zeros(4096, dtype=torch.int32)
hist = torch.zeros(65536, dtype=torch.int32)
x = torch.zeros(16384)
pinned = {"enable_fp_fusion": False}
launches = [
    Launch(_pass_kernel, (4,), (keys, hist, 4096), {"MODE": 0, "BLOCK": 1024}, pinned),
    Launch(spilly, (1,), (x, x), {"BLOCK": 16384}, {**pinned, "num_warps": 1}),
    Launch(specialised, (1,), (x, 1), {"BLOCK": 128}, pinned),
    Launch(specialised, (1,), (x, 5), {"BLOCK": 128}, pinned),
    Launch(specialised, (1,), (x, 7), {"BLOCK": 128}, {}),  # FP fusion not pinned
]
result = aot.check(archs=(90,), launches=launches, jobs=1)
print(json.dumps(result["problems"]))
'''


def test_the_check_catches_broken_kernels(tmp_path):
    script = tmp_path / "broken_kernels.py"
    script.write_text(textwrap.dedent(BROKEN))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          cwd=ROOT, env=_env(), timeout=600)  # Triton's cache: fast reruns
    assert proc.returncode == 0, proc.stderr[-3000:]
    problems = json.loads(proc.stdout.strip().splitlines()[-1])
    text = "\n".join(problems)
    print(text)
    assert "ordered atomic" in text or "without .relaxed" in text  # the per-element atomic
    assert "bytes of spills" in text and "spilly" in text
    assert "2 compiles for one" in text and "specialised" in text
    assert "without enable_fp_fusion pinned" in text
