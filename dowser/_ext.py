"""Finding the C++ extension dowser._C: the built one, else a cached JIT build, else none.

Whatever happens, `import dowser` works; when the extension is unusable, ops fall back to the
plain-PyTorch reference and one warning says why.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from types import ModuleType

_STATE: dict[str, object] = {"module": None, "how": None, "reason": None}


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
    # The same decision as setup.py (torch has CUDA and nvcc is found), not "a GPU is attached".
    with_cuda, _why = cfg.cuda_decision(torch, cpp_extension.CUDA_HOME, cu)
    return cpp_extension.load(
        name="dowser_jit_C",
        sources=[str(p) for p in cpp + (cu if with_cuda else [])],
        extra_include_paths=[str(p) for p in cfg.include_dirs(src)],
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

        _STATE.update(module=_C, how="built", reason="dowser._C built at install time")
        return _C
    except ImportError as exc:
        cause = f"dowser._C is not importable ({exc})"
    if os.environ.get("DOWSER_DISABLE_JIT") != "1":
        try:
            mod = _jit_build()
            _STATE.update(module=mod, how="jit", reason=f"{cause}; JIT-built from csrc/ instead")
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
    """How the extension was obtained: {'how': 'built'|'jit'|None, 'reason': str}."""
    load()
    return {"how": _STATE["how"], "reason": _STATE["reason"]}


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
