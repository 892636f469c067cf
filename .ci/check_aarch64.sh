#!/usr/bin/env bash
# Cross-compile the CPU sources (csrc/*.cpp, csrc/cpu/**.cpp) for aarch64 with Debian's
# g++-aarch64-linux-gnu against the installed torch's headers (objects only, no link), so the
# NEON path and the portable kernels never rot on x86-only CI. Installs the cross compiler when
# it is missing; skips with a message when it cannot (no apt, no network, not root).
set -euo pipefail
cd "$(dirname "$0")/.."
CXX=aarch64-linux-gnu-g++
if ! command -v "$CXX" >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] &&
     timeout 300 apt-get update -qq >/dev/null 2>&1 &&
     timeout 600 apt-get install -y -qq g++-aarch64-linux-gnu >/dev/null 2>&1; then
    echo "check_aarch64: installed g++-aarch64-linux-gnu"
  else
    echo "check_aarch64: $CXX not found and apt-get could not install it (offline or not root); skipped"
    exit 0
  fi
fi
mapfile -t files < <(ls csrc/*.cpp csrc/cpu/*.cpp csrc/cpu/isa/*.cpp)
# The build configuration's flags (dowser/_build_config.py), so the cross build is the real one.
read -r -a cxxflags < <(python3 -c "
import importlib.util
spec = importlib.util.spec_from_file_location('cfg', 'dowser/_build_config.py')
cfg = importlib.util.module_from_spec(spec); spec.loader.exec_module(cfg)
print(' '.join(cfg.cxx_flags(False)))")
read -r -a incs < <(python3 - <<'PY'
import sysconfig, torch
from torch.utils.cpp_extension import include_paths
incs = include_paths() + [sysconfig.get_paths()["include"]]
print(" ".join("-I" + p for p in incs), f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
PY
)
out=$(mktemp -d)
for f in "${files[@]}"; do
  echo "$CXX $f"
  "$CXX" "${cxxflags[@]}" -fPIC -c "$f" -Icsrc/include "${incs[@]}" -DTORCH_EXTENSION_NAME=_C \
    -o "$out/$(basename "$f").o"
done
# The NEON unit must hold the NEON kernel table, and no x86 unit may leak code into an arm build.
nm -C "$out/kernels_neon.cpp.o" > "$out/neon.sym"; grep -q "kernels_neon" "$out/neon.sym" || { echo "check_aarch64: kernels_neon missing"; exit 1; }
for x in kernels_avx2 kernels_avx512; do
  if [ -n "$(nm "$out/$x.cpp.o")" ]; then echo "check_aarch64: $x.cpp is not empty on aarch64"; exit 1; fi
done
echo "check_aarch64: ${#files[@]} file(s) compiled for aarch64"
