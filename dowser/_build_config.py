"""The one build configuration of dowser._C, shared by setup.py and the JIT build (dowser/_ext.py).

Imported by file path from setup.py (no dowser import at build time), so it needs only the
standard library; torch is passed in by the caller.

Flags that matter for results: ``-ffp-contract=off`` always (GCC would otherwise fuse
``p = b*c; a + p`` into an FMA wherever the target has one, and the kernels are tested bit for
bit against the plain-PyTorch reference, which rounds every operation), and never
``-march=native``: each CPU instruction-set path is one unit of csrc/cpu/isa/ with its own
``#pragma GCC target`` (its -m flags), chosen at run time, so the build is the same on every
host and a wheel runs on any CPU of its architecture.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

# The files of csrc/ that make up dowser._C (pyproject's package-data for dowser._csrc ships
# the same set, so an installed package can rebuild and re-stamp it).
SOURCE_GLOBS = ("*.cpp", "*.h", "cpu/*.cpp", "cpu/*.h", "cpu/isa/*.cpp", "include/dowser/*.h",
                "cuda/*.cu", "cuda/*.cuh", "cuda/*.h")

# Host C++ flags of every unit. -fno-math-errno keeps sqrtf one (vectorisable) instruction; it
# changes no result. -ffp-contract=off is last so it wins over anything before it.
CXX_FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-ffp-contract=off"]
# nvcc: the device math uses explicitly rounded intrinsics; --fmad=false keeps any plain
# expression from being contracted too, and the host side gets the same contraction rule.
NVCC_FLAGS = ["-O3", "-std=c++17", "--fmad=false", "-Xcompiler", "-ffp-contract=off"]
LD_FLAGS = ["-fopenmp"]
# Machine code (SASS) for sm_80 (A100; runs on every 8.x: A10, L4, RTX 30/40) and sm_90 (H100/H200),
# plus compute_90 PTX, which the driver JIT-compiles for any newer GPU (Blackwell sm_100/sm_120)
# on first use. Nothing runs on sm_70/sm_75 (V100, T4): `_registry._cpp_unavailable` then
# reports the cuda backend unavailable and the op falls back (Triton or the reference).
CUDA_ARCH_FLAGS = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                   "-gencode=arch=compute_90,code=compute_90"]
# Flags a user's CFLAGS/CXXFLAGS must not bring in: they change the rounding of the kernels or
# what the DEFAULT path may assume about the CPU.
FORBIDDEN = ("-march=native", "-ffast-math", "-Ofast", "-ffp-contract=fast", "-funsafe-math-optimizations")


def sources(csrc: Path) -> tuple[list[Path], list[Path]]:
    """(C++ sources, CUDA sources) under csrc/: ops.cpp, cpu/*.cpp, cpu/isa/*.cpp, cuda/*.cu."""
    cpp = sorted(csrc.glob("*.cpp")) + sorted((csrc / "cpu").glob("*.cpp")) + sorted((csrc / "cpu" / "isa").glob("*.cpp"))
    return cpp, sorted((csrc / "cuda").glob("*.cu"))


def include_dirs(csrc: Path) -> list[Path]:
    """Header roots: csrc/include holds dowser/update_math.h (shared by CPU and CUDA)."""
    return [csrc / "include"]


def cuda_decision(torch_module, cuda_home: str | None, cuda_sources: list) -> tuple[bool, str]:
    """Whether to build the CUDA sources, and why: torch has CUDA and nvcc's CUDA_HOME is found.
    Never decided from an attached GPU, so a GPU-less build host still builds the CUDA code."""
    if os.environ.get("DOWSER_NO_CUDA") == "1":
        return False, "DOWSER_NO_CUDA=1"
    if not cuda_sources:
        return False, "no csrc/cuda sources"
    if getattr(torch_module.version, "cuda", None) is None:
        return False, "torch is built without CUDA"
    if cuda_home is None:
        return False, "CUDA_HOME (nvcc) not found"
    return True, f"torch CUDA {torch_module.version.cuda}, CUDA_HOME={cuda_home}"


def cxx_flags(with_cuda: bool) -> list[str]:
    return CXX_FLAGS + (["-DDOWSER_WITH_CUDA"] if with_cuda else [])


def nvcc_flags() -> list[str]:
    arch = [] if os.environ.get("TORCH_CUDA_ARCH_LIST") else CUDA_ARCH_FLAGS
    return NVCC_FLAGS + arch + ["-DDOWSER_WITH_CUDA"]


def emitted_archs(flags: list[str]) -> tuple[set[int], set[int]]:
    """(SASS architectures, PTX architectures) that nvcc `flags` embed, from their -gencode
    options: {80, 90}, {90} for CUDA_ARCH_FLAGS."""
    sass, ptx = set(), set()
    for flag in flags:
        m = re.fullmatch(r"-gencode=arch=compute_(\d+),code=(.+)", flag)
        if not m:
            continue
        for code in m.group(2).strip("[]\"'").split(","):
            kind, num = re.fullmatch(r"(sm|compute)_(\d+)", code).groups()
            (sass if kind == "sm" else ptx).add(int(num))
    return sass, ptx


def runs_on(capability: tuple[int, int], flags: list[str]) -> bool:
    """Whether code built with `flags` runs on a GPU of `capability` (major, minor): SASS of
    sm_XY runs on X.Z for Z >= Y (same major); PTX of compute_XY is JIT-compiled for any
    capability >= X.Y."""
    sass, ptx = emitted_archs(flags)
    cc = capability[0] * 10 + capability[1]
    return any(a // 10 == capability[0] and a <= cc for a in sass) or any(a <= cc for a in ptx)


def forbidden_env_flags(environ=os.environ) -> list[str]:
    """Flags from CFLAGS/CXXFLAGS that this build refuses (see FORBIDDEN)."""
    found = []
    for var in ("CFLAGS", "CXXFLAGS", "CPPFLAGS"):
        for flag in environ.get(var, "").split():
            if flag in FORBIDDEN or flag.startswith("-march=native"):
                found.append(f"{var}: {flag}")
    return found


def check_flags(flags: list[str]) -> None:
    """Raise ValueError unless `flags` pin -ffp-contract=off as the last contraction flag and
    hold nothing from FORBIDDEN (the test suite checks the shared configuration with this)."""
    bad = [f for f in flags if f in FORBIDDEN or f.startswith("-march=native")]
    if bad:
        raise ValueError(f"build flags must not contain {bad}")
    contract = [f for f in flags if f.startswith("-ffp-contract=")]
    if not contract or contract[-1] != "-ffp-contract=off":
        raise ValueError(f"build flags must end contraction with -ffp-contract=off, got {contract or 'none'}")


def sanitize_env(environ=os.environ) -> list[str]:
    """Remove FORBIDDEN flags from CFLAGS/CXXFLAGS/CPPFLAGS in place; returns what was removed
    (compilers append these variables to every command, before our flags)."""
    removed = forbidden_env_flags(environ)
    for var in ("CFLAGS", "CXXFLAGS", "CPPFLAGS"):
        if var in environ:
            keep = [f for f in environ[var].split() if not (f in FORBIDDEN or f.startswith("-march=native"))]
            environ[var] = " ".join(keep)
    return removed


def source_digest(csrc: Path) -> str:
    """sha256 (16 hex) over every source file of dowser._C: relative path and bytes."""
    h = hashlib.sha256()
    files = sorted({p for g in SOURCE_GLOBS for p in Path(csrc).glob(g) if p.is_file()})
    for p in files:
        h.update(p.relative_to(csrc).as_posix().encode() + b"\0")
        h.update(p.read_bytes().replace(b"\r\n", b"\n") + b"\0")
    return h.hexdigest()[:16]


def read_version(version_file: Path) -> str:
    """The version string of dowser/_version.py, read without importing dowser."""
    m = re.search(r'^__version__\s*=\s*"([^"]+)"', Path(version_file).read_text(), re.M)
    if m is None:
        raise ValueError(f"no __version__ in {version_file}")
    return m.group(1)


def build_stamp(version: str, csrc: Path) -> str:
    """What dowser._C is stamped with, and what the Python layer expects of it: the version
    and the digest of the sources (one C identifier, so the preprocessor can stringify it)."""
    return "v" + re.sub(r"[^0-9A-Za-z]", "_", version) + "_src" + source_digest(csrc)


def write_stamp_header(folder: Path, stamp: str) -> Path:
    """Write dowser_stamp.h (included by csrc/ops.cpp only, so a new stamp recompiles one
    unit) into `folder`; rewritten only when it changes. Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = f"#pragma once\n#define DOWSER_BUILD_STAMP {stamp}\n"
    header = folder / "dowser_stamp.h"
    if not header.is_file() or header.read_text() != text:
        header.write_text(text)
    return folder
