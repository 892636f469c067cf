"""Finding the C++ extension dowser._C: the built one, else a cached JIT build, else none.

Whatever happens, `import dowser` works; when the extension is unusable, ops fall back to the
plain-PyTorch reference and one warning says why.

A built extension carries a stamp (dowser/_build_config.py build_stamp: the version and a
digest of the C++/CUDA sources). One whose stamp is not what this Python layer expects (a stale
in-place build, a .so copied from another checkout) is refused before any op is called, with one
line saying how to rebuild; the JIT build from the shipped sources, or the reference, takes over.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from types import ModuleType

_STATE: dict[str, object] = {"module": None, "how": None, "reason": None, "stamp": None}

REBUILD_HINT = ("rebuild it: `pip install --no-build-isolation -e .` in a clone, or reinstall "
                "the wheel")


def expected_stamp() -> str | None:
    """The stamp a matching dowser._C carries, or None without the sources to compute it."""
    from dowser import _build_config as cfg
    from dowser._version import __version__

    src = _csrc_dir()
    return None if src is None else cfg.build_stamp(__version__, src)


def stamp_problem(module: ModuleType, expected: str | None) -> str | None:
    """Why `module` (a compiled dowser extension) does not belong to this Python layer, or
    None when it does (or when no sources are around to tell)."""
    found = getattr(module, "build_stamp", None)
    if expected is None:
        return None
    if found is None:
        return (f"{getattr(module, '__file__', module.__name__)} has no build stamp (built "
                f"before this dowser); {REBUILD_HINT}")
    if found != expected:
        return (f"{getattr(module, '__file__', module.__name__)} was built from other sources "
                f"or another version (stamp {found}, this dowser expects {expected}); "
                f"{REBUILD_HINT}")
    return None


def _csrc_dir() -> Path | None:
    here = Path(__file__).resolve().parent
    for cand in (here / "_csrc", here.parent / "csrc"):  # installed package data, source tree
        if (cand / "ops.cpp").is_file():
            return cand
    return None


def _jit_build() -> ModuleType:
    import torch
    from torch.utils import cpp_extension

    from dowser import _build_config as cfg

    src = _csrc_dir()
    if src is None:
        raise RuntimeError("the csrc/ sources are not shipped with this install")
    cfg.sanitize_env()
    cpp, cu = cfg.sources(src)
    from dowser._version import __version__

    stamp = cfg.build_stamp(__version__, src)
    # The header's folder is named by the stamp: a new stamp is a new include path, which is
    # a new JIT build (torch keys its cache on sources and flags).
    stamp_dir = cfg.write_stamp_header(
        Path(cpp_extension.get_default_build_root()) / "dowser_stamp" / stamp, stamp)
    # The same decision as setup.py (torch has CUDA and nvcc is found), not "a GPU is attached".
    with_cuda, _why = cfg.cuda_decision(torch, cpp_extension.CUDA_HOME, cu)
    return cpp_extension.load(
        name="dowser_jit_C",
        sources=[str(p) for p in cpp + (cu if with_cuda else [])],
        extra_include_paths=[str(p) for p in cfg.include_dirs(src)] + [str(stamp_dir)],
        extra_cflags=cfg.cxx_flags(with_cuda),
        extra_cuda_cflags=cfg.nvcc_flags(),
        extra_ldflags=cfg.LD_FLAGS,
        with_cuda=with_cuda,
        verbose=False,
    )


@functools.lru_cache(maxsize=None)
def load() -> ModuleType | None:
    """Return the C++ extension module, or None (after one warning naming the cause)."""
    if os.environ.get("DOWSER_DISABLE_CPP") == "1":
        _STATE["reason"] = "disabled by DOWSER_DISABLE_CPP=1"
        warnings.warn("dowser: C++ extension disabled by DOWSER_DISABLE_CPP=1; "
                      "using the plain-PyTorch reference ops", RuntimeWarning, stacklevel=2)
        return None
    try:
        from dowser import _C  # type: ignore[attr-defined]
    except ImportError as exc:
        cause = f"dowser._C is not importable ({exc})"
    else:
        cause = stamp_problem(_C, expected_stamp())
        if cause is None:
            _STATE.update(module=_C, how="built", reason="dowser._C built at install time",
                          stamp=getattr(_C, "build_stamp", None))
            return _C
        cause = "refused " + cause
    if os.environ.get("DOWSER_DISABLE_JIT") != "1":
        try:
            mod = _jit_build()
            _STATE.update(module=mod, how="jit", reason=f"{cause}; JIT-built from csrc/ instead",
                          stamp=getattr(mod, "build_stamp", None))
            warnings.warn(f"dowser: {cause}; JIT-built the C++ ops instead "
                          "(reinstall with --no-build-isolation to build them once)",
                          RuntimeWarning, stacklevel=2)
            return mod
        except Exception as exc:  # no compiler, missing sources, ...
            cause += f"; JIT build failed ({type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''})"
    else:
        cause += "; JIT build disabled by DOWSER_DISABLE_JIT=1"
    _STATE["reason"] = cause
    warnings.warn(f"dowser: {cause}; using the plain-PyTorch reference ops (slower)",
                  RuntimeWarning, stacklevel=2)
    return None


def info() -> dict[str, object]:
    """How the extension was obtained: {'how': 'built'|'jit'|None, 'reason': str,
    'stamp': its build stamp or None}."""
    load()
    return {"how": _STATE["how"], "reason": _STATE["reason"], "stamp": _STATE["stamp"]}


def has(name: str) -> bool:
    mod = load()
    return mod is not None and hasattr(mod, name)


def with_cuda() -> bool:
    mod = load()
    return bool(mod is not None and getattr(mod, "with_cuda", False))


def cpu_capability() -> str | None:
    """The instruction-set path of the C++ CPU kernels now ('default', 'avx2', 'avx512',
    'neon'; DOWSER_CPU_CAPABILITY forces one), or None without the extension."""
    mod = load()
    if mod is None or not hasattr(mod, "cpu_capability"):
        return None
    return str(mod.cpu_capability())


def build_info() -> dict[str, object]:
    """The extension this process uses: how it was obtained, its file, stamp, CPU
    instruction-set path (and the paths this CPU runs), and whether it has CUDA kernels."""
    mod = load()
    out: dict[str, object] = {"how": _STATE["how"], "reason": _STATE["reason"],
                              "file": getattr(mod, "__file__", None), "stamp": _STATE["stamp"],
                              "expected_stamp": expected_stamp(), "cpu_path": cpu_capability(),
                              "cpu_paths": None, "cuda": with_cuda()}
    if mod is not None and hasattr(mod, "cpu_capabilities"):
        out["cpu_paths"] = str(mod.cpu_capabilities())
    return out
