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


ext_modules, cmdclass = extension_config()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
