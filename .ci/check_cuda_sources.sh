#!/usr/bin/env bash
# Compile every csrc/cuda/*.cu with nvcc (the build's arch flags) so GPU code never rots on
# CPU-only CI. The .cu files include only torch/extension.h (+ torch/library.h) and the CUDA
# runtime, which the CPU torch wheel's headers support. ptxas reports registers and spills of
# every kernel; any spill fails the check.
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
# The build's own architecture flags (dowser/_build_config.py: sm_80 + sm_90 SASS, compute_90
# PTX), so this check compiles exactly what setup.py builds.
arch=$(python - <<'PY'
import importlib.util
spec = importlib.util.spec_from_file_location("bc", "dowser/_build_config.py")
bc = importlib.util.module_from_spec(spec); spec.loader.exec_module(bc)
print(" ".join(bc.CUDA_ARCH_FLAGS))
PY
)
# csrc/include holds shared headers (dowser/update_math.h) when present.
[ -d csrc/include ] && flags="$flags -Icsrc/include"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# Host compiles in parallel (the torch headers dominate); one log per file.
pids=()
for f in "${files[@]}"; do
  log="$out/$(basename "$f").log"
  # shellcheck disable=SC2086
  (nvcc -std=c++17 -O3 --fmad=false -c "$f" $flags -DDOWSER_WITH_CUDA -DTORCH_EXTENSION_NAME=_C \
    -Xptxas -v -diag-suppress 3306 \
    $arch \
    -o "$out/$(basename "$f").o" >"$log" 2>&1; echo $? >"$log.rc") &
  pids+=($!)
done
wait "${pids[@]}"
status=0
for f in "${files[@]}"; do
  log="$out/$(basename "$f").log"
  if [ "$(cat "$log.rc")" != 0 ]; then
    echo "check_cuda_sources: nvcc failed on $f:"; grep -v "warning\|^ *\^\|^$" "$log" | tail -40
    status=1
    continue
  fi
  # ptxas -v: "Compiling entry function 'NAME' for 'sm_XX'" then "Used N registers", spills.
  awk -v file="$f" '
    /Compiling entry function/ { match($0, /'"'"'[^'"'"']+'"'"'/); fn = substr($0, RSTART + 1, RLENGTH - 2);
                                 match($0, /sm_[0-9]+/); arch = substr($0, RSTART, RLENGTH) }
    /bytes spill stores/ { split($0, a, " "); for (i = 1; i <= NF; i++) { if (a[i] == "bytes" && a[i+1] == "spill") { s += a[i-1] } } spill = s; s = 0 }
    /Used [0-9]+ registers/ { match($0, /Used [0-9]+ registers/); regs = substr($0, RSTART + 5, RLENGTH - 15);
                              printf "  %-28s %-6s %4s registers, %s bytes spilled  %s\n", file, arch, regs, spill + 0, fn;
                              if (spill + 0 > 0) bad = 1 }
    END { exit bad }' "$log" >"$log.regs" || { echo "check_cuda_sources: spills in $f"; status=1; }
  if command -v c++filt >/dev/null; then c++filt <"$log.regs"; else cat "$log.regs"; fi
done
[ $status -eq 0 ] && echo "check_cuda_sources: ${#files[@]} file(s) compiled ($arch), no spills"
exit $status
