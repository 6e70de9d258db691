#!/usr/bin/env bash
# GPU readiness check (issue 10): a bf16 search on cuda with 2 Ray workers sharing one GPU,
# a replay of the best, seconds per candidate and peak GPU memory. Needs an installed
# evomerge (pip install -e .) with a CUDA build of torch; downloads nothing: the models are
# built here from the repository (random ~200 M-parameter Llamas, the demo's tasks).
# Under 8 minutes on one H200 is the aim. Usage: benchmarks/gpu_check.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
TRIALS=${GPU_CHECK_TRIALS:-40}
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA device visible to torch (torch.cuda.is_available() is False); this check needs one GPU (and $PY must import torch)" >&2
  exit 2
fi
WORK=${1:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
echo "gpu_check: $($PY -c 'import torch; print(torch.cuda.get_device_name(0), "torch", torch.__version__)') in $WORK"
$PY benchmarks/gpu_check.py build --out "$WORK/run" --trials "$TRIALS"
MEM="$WORK/gpu_mem.txt"
SAMPLER=""
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$MEM" &
  SAMPLER=$!
fi
START=$(date +%s)
$PY -m evomerge search "$WORK/run/search.yaml" --storage "sqlite:///$WORK/gpu.db" --workers 2
WALL=$(( $(date +%s) - START ))
[ -n "$SAMPLER" ] && kill "$SAMPLER"
$PY -m evomerge replay --storage "sqlite:///$WORK/gpu.db" --out "$WORK/best"
$PY -c "import sys; from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained(sys.argv[1]); print('replayed folder loads:', sys.argv[1])" "$WORK/best"
$PY benchmarks/gpu_check.py report --db "$WORK/gpu.db" --mem "$MEM" --wall "$WALL"
$PY benchmarks/gpu_check.py host-sources --folder "$WORK/run"
