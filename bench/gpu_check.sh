#!/usr/bin/env bash
# One command for a lent GPU (H100/H200): validates dowser's GPU half and writes its numbers.
#
#   bash bench/gpu_check.sh
#
# Runs, each under its own timeout and all within an 8-minute budget: the gpu-marked tests and
# the CUDA-parametrised tests, `dowser selfcheck` (every op, every backend, CPU and CUDA), and
# the select, optimizer and probe benchmarks. Writes bench/results/gpu-check-<device>.{md,csv}
# (one row per step: status, seconds) beside what the benchmarks write
# (bench/results/select-<device>.*, optim-<device>.*, probe-<device>.* where supported).
# Run it from an installed checkout (pip install --no-build-isolation -e ".[test]" with a CUDA
# torch and nvcc, so dowser._C is built with CUDA). See docs/gpu.md.
set -uo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET  # kernels must run on the GPU, not in the interpreter

BUDGET=${DOWSER_GPU_CHECK_BUDGET:-470}  # seconds in all (< 8 minutes)
start=$(date +%s)
py=${PYTHON:-python}

if ! $py -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: torch sees no CUDA device; nothing to check" >&2
  exit 2
fi
device=$($py -c "import torch; print(torch.cuda.get_device_name(0))")
tag=$(echo "$device" | tr 'A-Z' 'a-z' | sed 's/[^a-z0-9]/-/g; s/^-*//; s/-*$//')
out=bench/results
mkdir -p "$out" "$out/gpu-check-logs"
csv="$out/gpu-check-$tag.csv"
md="$out/gpu-check-$tag.md"
echo "step,status,seconds,log" >"$csv"
failed=0

step() {  # step NAME TIMEOUT CMD...
  local name=$1 limit=$2
  shift 2
  local now left t0 rc status log
  now=$(date +%s)
  left=$((BUDGET - (now - start)))
  if [ "$left" -le 5 ]; then
    echo "gpu_check: $name skipped (budget spent)"
    echo "$name,skipped (budget),0," >>"$csv"
    failed=1
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  log="$out/gpu-check-logs/$name-$tag.log"
  echo "== $name (timeout ${limit}s): $*"
  t0=$(date +%s.%N)
  timeout --signal=INT --kill-after=10 "$limit" "$@" >"$log" 2>&1
  rc=$?
  local secs
  secs=$($py -c "import time; print(f'{time.time() - $t0:.1f}')")
  case $rc in
    0) status=ok ;;
    124|137) status="timeout (${limit}s)"; failed=1 ;;
    *) status="failed (rc $rc)"; failed=1 ;;
  esac
  tail -n 3 "$log" | sed 's/^/   /'
  echo "   -> $status in ${secs}s"
  echo "$name,$status,$secs,$log" >>"$csv"
}

step environment 60 $py -c "
import torch, triton, dowser
from dowser import _ext
print('device', torch.cuda.get_device_name(0), 'capability', torch.cuda.get_device_capability(0))
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)
print('dowser._C', _ext.info(), 'with CUDA:', _ext.with_cuda())
for op, per in dowser.backend_info().items():
    if op != '_C': print(op, per['cuda']['backend'], '-', per['cuda']['why'])
assert _ext.with_cuda(), 'dowser._C was built without CUDA: the cuda backend cannot run'
"
step gpu-tests 110 $py -m pytest -q -x -m gpu -p no:cacheprovider
step cuda-tests 120 $py -m pytest -q -p no:cacheprovider -k cuda \
  tests/test_select.py tests/test_pack.py tests/test_optim.py tests/test_optim_skip.py tests/test_opcheck.py
step selfcheck 45 $py -m dowser.cli selfcheck
# The benchmark suite (bench/test_bench_*.py) on the GPU at README's sizes: every case with its
# baseline in the same process; JSON + tables named after the GPU (bench/report.py).
step bench-suite 200 $py -m pytest bench/ --benchmark-only --devices cuda -q -p no:cacheprovider \
  --benchmark-json="$out/suite-$tag.json"
step bench-report 30 $py bench/report.py "$out/suite-$tag.json"

# -- issue 31: host syncs and device guards, for real ------------------------
# The hot paths under torch.cuda.set_sync_debug_mode("error") on one GPU; with two GPUs, every
# op on cuda:1 while cuda:0 is current (the device guard) and the one-device check. On CPU the
# same classes of defect are counted by tests/test_gpu_review.py without a GPU.
step sync-debug 60 $py -m pytest -q -p no:cacheprovider tests/test_gpu_review.py -k sync_debug_mode_on_gpu
if [ "$($py -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  step two-gpus 60 $py -m pytest -q -p no:cacheprovider tests/test_gpu_review.py -k two_gpus
else
  echo "gpu_check: one GPU: the two-device test is not run"
  echo "two-gpus,not run (one GPU),0," >>"$csv"
fi
# -- end of the issue 31 block ----------------------------------------------------------------

total=$(( $(date +%s) - start ))
{
  echo "# gpu_check on $device"
  echo
  echo "\`bash bench/gpu_check.sh\`, $(date -u +%Y-%m-%dT%H:%MZ), ${total}s in all (budget ${BUDGET}s)."
  echo
  echo "| step | status | seconds |"
  echo "|---|---|---|"
  tail -n +2 "$csv" | while IFS=, read -r name status secs _; do echo "| $name | $status | $secs |"; done
  echo
  echo "Logs: bench/results/gpu-check-logs/. Benchmark tables: bench/results/*-$tag.md."
} >"$md"
cat "$md"
exit $failed
