#!/usr/bin/env bash
# Compile every csrc/cuda/*.cu with nvcc (sm_80 and sm_90 codegen) so GPU code never rots on
# CPU-only CI. The .cu files include only torch/extension.h and the CUDA runtime, which the CPU
# torch wheel's headers support.
set -euo pipefail
cd "$(dirname "$0")/.."
shopt -s nullglob
files=(csrc/cuda/*.cu)
if ! command -v nvcc >/dev/null; then
  echo "check_cuda_sources: nvcc not found; ${#files[@]} .cu file(s) not compiled"
  exit 0
fi
if [ ${#files[@]} -eq 0 ]; then
  echo "check_cuda_sources: no .cu files"
  exit 0
fi
flags=$(python - <<'PY'
import sysconfig, torch
from torch.utils.cpp_extension import include_paths
incs = include_paths() + [sysconfig.get_paths()["include"]]
print(" ".join("-I" + p for p in incs), f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
PY
)
out=$(mktemp -d)
for f in "${files[@]}"; do
  echo "nvcc $f"
  # shellcheck disable=SC2086
  nvcc -std=c++17 -O3 --fmad=false -c "$f" -Icsrc/include $flags -DDOWSER_WITH_CUDA -DTORCH_EXTENSION_NAME=_C \
    -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90 \
    -o "$out/$(basename "$f").o"
done
echo "check_cuda_sources: ${#files[@]} file(s) compiled for sm_80 and sm_90"
