#!/usr/bin/env bash
# Execute the NEON kernels: cross-compile csrc/test/isa_harness.cpp with the CPU kernel units
# (csrc/cpu/isa/*.cpp, torch-free) for aarch64 and run it under qemu-aarch64, comparing every
# NEON kernel with the DEFAULT path of the same source bit for bit (the test suite's NEON cases
# skip on x86). The same harness runs natively first (avx2/avx512 against default, where this
# CPU has them). Installs g++-aarch64-linux-gnu and qemu-user with apt-get when missing (CI runs
# as root); skips with a message when it cannot. Exit status 1 when a kernel differs.
#
#   bash .ci/neon.sh        # prints "isa_harness: N passed, M failed" per build
set -euo pipefail
cd "$(dirname "$0")/.."
CXX=aarch64-linux-gnu-g++
QEMU=qemu-aarch64
if ! command -v "$CXX" >/dev/null || ! command -v "$QEMU" >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] &&
     timeout 300 apt-get update -qq >/dev/null 2>&1 &&
     timeout 900 apt-get install -y -qq g++-aarch64-linux-gnu qemu-user >/dev/null 2>&1; then
    echo "neon: installed g++-aarch64-linux-gnu and qemu-user"
  else
    echo "neon: $CXX or $QEMU not found and apt-get could not install them (offline or not root); skipped"
    exit 0
  fi
fi
# The build configuration's host flags (dowser/_build_config.py): -ffp-contract=off etc.
read -r -a cxxflags < <(python3 -c "
import importlib.util
spec = importlib.util.spec_from_file_location('cfg', 'dowser/_build_config.py')
cfg = importlib.util.module_from_spec(spec); spec.loader.exec_module(cfg)
print(' '.join(cfg.cxx_flags(False)))")
srcs=(csrc/test/isa_harness.cpp csrc/cpu/isa/kernels_*.cpp)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# Two threads with a passive wait policy: the OpenMP paths run, without spinning under qemu.
export OMP_NUM_THREADS=2 OMP_WAIT_POLICY=passive
if command -v "${HOST_CXX:-g++}" >/dev/null; then
  "${HOST_CXX:-g++}" "${cxxflags[@]}" -Icsrc/include "${srcs[@]}" -o "$out/isa_native"
  echo "neon: native $(uname -m) build"
  "$out/isa_native" | grep -E '^(FAIL|isa_harness)'
fi
"$CXX" "${cxxflags[@]}" -Icsrc/include "${srcs[@]}" -o "$out/isa_aarch64"
echo "neon: aarch64 build under $QEMU"
"$QEMU" -L /usr/aarch64-linux-gnu "$out/isa_aarch64" | grep -E '^(FAIL|isa_harness)'
