"""Build dowser._C from csrc/ with torch's cpp_extension (ninja).

A CPU (OpenMP) build always; the CUDA sources too when the installed torch has CUDA and nvcc is
found. That is decided from torch.version.cuda and CUDA_HOME, never from an attached GPU, so a
GPU-less build host still builds the CUDA code. A failed build does not fail the install:
`import dowser` then JIT-builds the extension or falls back to the plain-PyTorch reference.
"""

import glob
import os
import sys
import warnings

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


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

    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    cuda_sources = _sources("csrc/cuda/*.cu")
    with_cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                 and os.environ.get("DOWSER_NO_CUDA") != "1" and bool(cuda_sources))
    if with_cuda:
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
        nvcc = ["-O3", "-std=c++17"]
        if not arch:
            nvcc += ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
        ext = cpp_extension.CUDAExtension(
            "dowser._C", sources + cuda_sources,
            extra_compile_args={"cxx": cxx + ["-DDOWSER_WITH_CUDA"], "nvcc": nvcc + ["-DDOWSER_WITH_CUDA"]},
            extra_link_args=["-fopenmp"])
    else:
        ext = cpp_extension.CppExtension("dowser._C", sources, extra_compile_args={"cxx": cxx},
                                         extra_link_args=["-fopenmp"])

    class TolerantBuildExtension(cpp_extension.BuildExtension):
        """A failed compile leaves dowser installable; import dowser reports the fallback."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # no compiler, broken toolchain, ...
                if os.environ.get("DOWSER_STRICT_BUILD") == "1":
                    raise
                print(f"dowser: building {ext.name} failed ({exc}); "
                      "dowser will JIT-build it or use the reference ops", file=sys.stderr)

    return [ext], {"build_ext": TolerantBuildExtension.with_options(use_ninja=True)}


def editable_config():
    """`pip install -e .` that survives a clone folder named `dowser` in the working directory.

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

    first = ("import sys; sys.meta_path.sort(key=lambda f: not getattr(f, '__module__', '')"
             ".startswith('__editable___dowser_'))\n")

    class FinderFirst:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, wheel, files, mapping):
            self.inner(wheel, files, mapping)
            # .pth files run in name order: this one after setuptools' __editable__.*.pth
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
