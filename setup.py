"""Build dowser._C from csrc/ with torch's cpp_extension (ninja).

A CPU (OpenMP) build always; the CUDA sources too when the installed torch has CUDA and nvcc is
found. Sources and flags come from dowser/_build_config.py, which the JIT build
(dowser/_ext.py) uses too. A failed build does not fail the install: `import dowser` then
JIT-builds the extension or falls back to the plain-PyTorch reference.
"""

import importlib.util
import os
import sys
import warnings
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent


def _build_config():
    # By path: importing the dowser package here would need its dependencies at build time.
    spec = importlib.util.spec_from_file_location("_dowser_build_config", HERE / "dowser" / "_build_config.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def extension_config():
    if os.environ.get("DOWSER_NO_BUILD") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        warnings.warn("dowser: torch is not importable at build time; skipping dowser._C "
                      "(install torch first and build with --no-build-isolation)")
        return [], {}

    cfg = _build_config()
    removed = cfg.sanitize_env()
    if removed:
        warnings.warn(f"dowser: ignoring {removed} (they would change the kernels' rounding or "
                      "the baseline CPU; each instruction set is its own dispatched path)")
    cpp, cu = cfg.sources(HERE / "csrc")
    rel = lambda paths: [os.path.relpath(p, HERE) for p in paths]  # noqa: E731
    stamp = cfg.build_stamp(cfg.read_version(HERE / "dowser" / "_version.py"), HERE / "csrc")
    stamp_dir = cfg.write_stamp_header(HERE / "build" / "dowser_stamp", stamp)
    include_dirs = [str(p) for p in cfg.include_dirs(HERE / "csrc")] + [str(stamp_dir)]
    with_cuda, _why = cfg.cuda_decision(torch, cpp_extension.CUDA_HOME, cu)
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            "dowser._C", rel(cpp) + rel(cu), include_dirs=include_dirs,
            extra_compile_args={"cxx": cfg.cxx_flags(True), "nvcc": cfg.nvcc_flags()},
            extra_link_args=cfg.LD_FLAGS)
    else:
        ext = cpp_extension.CppExtension("dowser._C", rel(cpp), include_dirs=include_dirs,
                                         extra_compile_args={"cxx": cfg.cxx_flags(False)},
                                         extra_link_args=cfg.LD_FLAGS)

    class TolerantBuildExtension(cpp_extension.BuildExtension):
        """A failed compile leaves dowser installable; import dowser reports the fallback."""

        def finalize_options(self):
            super().finalize_options()
            if getattr(self, "editable_mode", False):
                # setuptools builds an editable install in a new temporary folder each time,
                # so every `pip install -e .` recompiled everything; a folder of the clone's
                # own lets ninja recompile only what changed (it tracks flags and headers).
                self.build_temp = str(HERE / "build" / f"temp-editable-{sys.implementation.cache_tag}")

        def build_extensions(self):
            # The whole step, not each extension: torch checks the compiler (runs `$CXX
            # --version`) before it builds any, and that raises when there is no compiler.
            try:
                super().build_extensions()
            except Exception as exc:  # no compiler, broken toolchain, ...
                if os.environ.get("DOWSER_STRICT_BUILD") == "1":
                    raise
                print(f"dowser: building dowser._C failed ({type(exc).__name__}: {exc}); "
                      "dowser will JIT-build it or use the reference ops", file=sys.stderr)

    return [ext], {"build_ext": TolerantBuildExtension.with_options(use_ninja=True)}


def editable_config():
    """`pip install -e .` that survives a clone folder named `dowser` in the working directory,
    and finds `dowser.kernels` in the clone's kernels/ folder (a folder without __init__.py).

    setuptools' editable install maps `dowser` to this checkout with an import finder that it
    appends to sys.meta_path, after the path finder. Run Python from the folder that holds a
    clone named `dowser` and the path finder takes that folder (no __init__.py) as an empty
    namespace package first: `dowser.MaskSet` -> AttributeError. One more .pth file in the
    editable wheel moves our finder in front. If setuptools changes this private hook, the
    install still works, only without that fix (tests/test_imports.py then fails, naming it).
    """
    try:
        from setuptools.command.editable_wheel import editable_wheel
    except ImportError:
        return {}
    if not hasattr(editable_wheel, "_select_strategy"):
        return {}

    # setuptools names its finder's module after the distribution (model-dowser):
    # __editable___model_dowser_<version>_finder; ours is __editable___dowser_kernels_finder.
    first = ("import __editable___dowser_kernels_finder, sys; "
             "sys.meta_path.sort(key=lambda f: not getattr(f, '__module__', '')"
             ".startswith(('__editable___model_dowser_', '__editable___dowser_')))\n")
    # kernels/ has no __init__.py (so it never shadows the `kernels` distribution), and
    # setuptools' editable finder only maps folders that have one: it would not find the
    # `dowser.kernels` package itself (its modules it finds). This finder makes it a namespace
    # package over the clone's kernels/ folder, as the wheel's dowser/kernels/ folder is.
    kernels_finder = f'''"""Editable install of dowser: `dowser.kernels` is {HERE / "kernels"}."""
import sys
from importlib.machinery import ModuleSpec


class DowserKernelsFinder:
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname != "dowser.kernels":
            return None
        spec = ModuleSpec(fullname, None, is_package=True)
        spec.submodule_search_locations = [{str(HERE / "kernels")!r}]
        return spec


sys.meta_path.append(DowserKernelsFinder)
'''

    class FinderFirst:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, wheel, files, mapping):
            self.inner(wheel, files, mapping)
            # .pth files run in name order: this one after setuptools' __editable__.*.pth
            wheel.writestr("__editable___dowser_kernels_finder.py", kernels_finder.encode())
            wheel.writestr("dowser-editable-first.pth", first.encode())

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

    class EditableWheel(editable_wheel):
        def _select_strategy(self, name, tag, build_lib):
            return FinderFirst(super()._select_strategy(name, tag, build_lib))

    return {"editable_wheel": EditableWheel}


ext_modules, cmdclass = extension_config()
setup(ext_modules=ext_modules, cmdclass={**cmdclass, **editable_config()})
