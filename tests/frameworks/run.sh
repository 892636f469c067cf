#!/usr/bin/env bash
# Real training runs of dowser's framework plugins, each in the framework's own environment
# (Axolotl, ms-swift and LLaMA-Factory pin transformers/peft/trl versions that clash with
# dowser's test stack and with each other).
#
#   bash tests/frameworks/run.sh axolotl|swift|llamafactory [WORKDIR]
#
# Builds the venv $DOWSER_FRAMEWORK_VENVS/<name> once (default ~/.cache/dowser-frameworks),
# installs torch 2.13.0 (CPU) first and the framework with torch pinned, then dowser itself
# (editable, no rebuild: the C++ extension built in the repository is used when present),
# and runs tests/frameworks/check_<name>.py: the framework's own entry point on a tiny local
# Llama and dataset, then the checks. Not in .ci/run: see docs/integrations.md for the times.
set -euo pipefail
name=${1:?usage: run.sh axolotl|swift|llamafactory [WORKDIR]}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
VENV=${DOWSER_FRAMEWORK_VENVS:-$HOME/.cache/dowser-frameworks}/$name
case $name in
  axolotl) spec=("axolotl==0.19.0") ;;
  swift) spec=("ms-swift==4.6.0") ;;
  llamafactory) spec=("llamafactory==0.9.5") ;;  # torchvision/torchaudio: see check_llamafactory.py
  *) echo "run.sh: unknown framework $name (axolotl, swift, llamafactory)" >&2; exit 2 ;;
esac
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import dowser" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "torch==2.13.0" "setuptools>=70.1"
  "$VENV/bin/pip" install -q "${spec[@]}" "torch==2.13.0"
  if [ "$name" = llamafactory ]; then
    # PyPI's torchvision/torchaudio for this torch are CUDA builds: torchvision breaks
    # `import transformers` (RuntimeError: operator torchvision::nms does not exist) and
    # torchaudio cannot load (libc10_cuda.so); the text-only run needs neither
    "$VENV/bin/pip" uninstall -y -q torchvision torchaudio
  fi
  DOWSER_NO_BUILD=1 "$VENV/bin/pip" install -q --no-build-isolation --no-deps -e "$ROOT"
fi
"$VENV/bin/python" -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
cd "$ROOT/tests/frameworks"
start=$(date +%s)
"$VENV/bin/python" "check_$name.py" ${2:+"$2"}
echo "run.sh $name: $(( $(date +%s) - start ))s for the runs and checks"
