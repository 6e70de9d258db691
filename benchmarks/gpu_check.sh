#!/usr/bin/env bash
# GPU readiness check (issues 10, 19): on one GPU, in under 8 minutes, offline, it measures
#   ops       every merge operator on a 7B-shaped bf16 matrix (11008 x 4096, base + 2 experts)
#             against the device's copy bandwidth, then a whole Llama-7B tensor set (3 x 13.5 GB)
#   select    the k-th largest |delta| of that matrix by kthvalue (TIES/Breadcrumbs' device cuts
#             today) against topk (benchmarks/device_select.py): which to keep on a GPU
#   search2   a bf16 search with 2 Ray workers sharing the GPU (workers.num_gpus 0.5)
#   search1   the same with 1 worker owning it (fewer trials)
#             each: seconds per candidate (merge, evaluate), peak GPU memory (nvidia-smi)
#   replay    the best candidate replayed twice on the GPU: bit-identical to each other and to
#             the candidate materialized again on the GPU by the workers' code; the CPU's merge
#             of it within 1 unit in the last place (the cross-device tolerance)
#   host      one merge with the sources on the GPU vs streamed from host memory: equal bits
# and prints one summary table at the end. The models are built here from the repository
# (random ~200 M-parameter Llamas, the demo's tasks): nothing is downloaded or installed.
#
#   bash benchmarks/gpu_check.sh [--cpu-steps] [WORKDIR]
#
# --cpu-steps (or GPU_CHECK_CPU=1): every step that needs no CUDA, on the CPU, small: the
# operators on a 1/32 slice of the matrix, ~3 M-parameter models, 2-worker and 1-worker
# searches of a few trials, the replays and their checks (host is skipped). What proves an
# offline bundle on a machine without a GPU.
# Needs: an evomerge that imports (pip install -e . or, offline, the bundle: source env.sh; cd
# repo) with torch (a CUDA build in GPU mode). Settings: PYTHON (default python),
# GPU_CHECK_TRIALS (2-worker trials, 40; CPU 6), GPU_CHECK_TRIALS1 (1-worker, 16; CPU 6),
# GPU_CHECK_DEADLINE (seconds, 450; CPU 3600): the optional steps (ops' 7B set, search1, host)
# are skipped when too little of it is left. Exit status: 0 when every step passed, 1 if any
# failed, 2 when it cannot start.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-python}
MODE=gpu
WORK=""
for arg in "$@"; do
  case $arg in
    --cpu-steps) MODE=cpu ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "gpu_check: unknown option $arg (see --help)" >&2; exit 2 ;;
    *) WORK=$arg ;;
  esac
done
[ "${GPU_CHECK_CPU:-0}" = 1 ] && MODE=cpu
# what every step imports (pydantic, Ray, lm-eval, torch): a bundle for another Python fails here
if ! err=$($PY -c "import torch, ray, evomerge.search.app.commands, evomerge.workers.actor" 2>&1); then
  echo "gpu_check: $PY cannot import evomerge and its dependencies (pip install -e ., or source the bundle's env.sh): $(echo "$err" | tail -1)" >&2
  exit 2
fi
if [ "$MODE" = gpu ]; then
  if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device visible to torch (torch.cuda.is_available() is False); this check needs one GPU (--cpu-steps runs the rest on the CPU)" >&2
    exit 2
  fi
  DEVICE=cuda TRIALS=${GPU_CHECK_TRIALS:-40} TRIALS1=${GPU_CHECK_TRIALS1:-16} DEADLINE=${GPU_CHECK_DEADLINE:-450}
  OPS_ARGS=(--device cuda --full-7b --budget 120) BUILD_ARGS=(--hidden 1024 --layers 16)
  SELECT_ARGS=(--device cuda)
else
  DEVICE=cpu TRIALS=${GPU_CHECK_TRIALS:-6} TRIALS1=${GPU_CHECK_TRIALS1:-6} DEADLINE=${GPU_CHECK_DEADLINE:-3600}
  OPS_ARGS=(--device cpu --rows 344 --cols 4096 --repeats 3 --budget 600) BUILD_ARGS=(--hidden 256 --layers 4)
  SELECT_ARGS=(--device cpu --rows 344 --cols 4096 --repeats 2)
fi
WORK=${WORK:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$WORK" && WORK=$(cd "$WORK" && pwd)
: > "$WORK/steps.tsv"
: > "$WORK/summary.tsv"
export GPU_CHECK_SUMMARY="$WORK/summary.tsv"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
FAILED=0
SECONDS=0

# step NAME NEED CMD...: run CMD, record its status and seconds; skipped (status 3) when NEED > 0
# and fewer than NEED seconds of the deadline are left.
step() {
  local name=$1 need=$2 t0 rc status
  shift 2
  if [ "$need" -gt 0 ] && [ $(( DEADLINE - SECONDS )) -lt "$need" ]; then
    printf '%s\t%s\t0\n' "$name" "skipped ($(( DEADLINE - SECONDS )) s of ${DEADLINE} left)" >> "$WORK/steps.tsv"
    echo "== [${SECONDS}s] $name: skipped, $(( DEADLINE - SECONDS )) s left"
    return 3
  fi
  echo "== [${SECONDS}s] $name"
  t0=$(date +%s.%N)
  "$@"
  rc=$?
  if [ $rc -eq 0 ]; then status=ok; else status="FAILED (exit $rc)"; FAILED=$(( FAILED + 1 )); fi
  printf '%s\t%s\t%s\n' "$name" "$status" "$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')" >> "$WORK/steps.tsv"
  return $rc
}
skip() { printf '%s\t%s\t0\n' "$1" "skipped ($2)" >> "$WORK/steps.tsv"; echo "== $1: skipped ($2)"; }

# search LABEL CONFIG WORKERS RESERVE: one search with the memory sampler on; it stops dispatching (--timeout) when RESERVE seconds of the deadline are left (60 s at least)
search() {
  local label=$1 config=$2 workers=$3 reserve=$4 sampler="" start rc timeout
  timeout=$(( DEADLINE - SECONDS - reserve ))
  [ "$timeout" -lt 60 ] && timeout=60
  rm -f "$WORK/$label.mem"
  if [ "$MODE" = gpu ] && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$WORK/$label.mem" &
    sampler=$!
  fi
  start=$SECONDS
  $PY -m evomerge search "$config" --storage "sqlite:///$WORK/$label.db" --workers "$workers" --timeout "$timeout"
  rc=$?
  echo $(( SECONDS - start )) > "$WORK/$label.wall"
  [ -n "$sampler" ] && kill "$sampler" 2>/dev/null && wait "$sampler" 2>/dev/null
  return $rc
}
report() {
  local label=$1 workers=$2
  $PY benchmarks/gpu_check.py report --db "$WORK/$label.db" --label "$label" --mem "$WORK/$label.mem" \
    --wall "$(cat "$WORK/$label.wall")" --workers "$workers"
}
replay_twice() {
  local label=$1 trial
  trial=$($PY benchmarks/gpu_check.py best-trial --db "$WORK/$label.db") || return 1
  echo "$trial" > "$WORK/replay.trial"
  rm -rf "$WORK/best" "$WORK/best_again"
  $PY -m evomerge replay --storage "sqlite:///$WORK/$label.db" --trial "$trial" --out "$WORK/best" &&
  $PY -m evomerge replay --storage "sqlite:///$WORK/$label.db" --trial "$trial" --out "$WORK/best_again" &&
  $PY -c "import sys; from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained(sys.argv[1]); print('replayed folder loads:', sys.argv[1])" "$WORK/best"
}

echo "gpu_check: $MODE mode, work folder $WORK, deadline ${DEADLINE}s"
step env 0 $PY benchmarks/gpu_check.py env
step ops 0 $PY benchmarks/gpu_check.py ops "${OPS_ARGS[@]}"
step select 30 $PY benchmarks/device_select.py "${SELECT_ARGS[@]}"
if step build 0 $PY benchmarks/gpu_check.py build --out "$WORK/run" --device "$DEVICE" "${BUILD_ARGS[@]}" \
     --trials "$TRIALS" --trials1 "$TRIALS1"; then
  if step search2 0 search search2 "$WORK/run/search2.yaml" 2 200; then
    step report2 0 report search2 2
    if step replay 0 replay_twice search2; then
      step replay-check 0 $PY benchmarks/gpu_check.py replay-check --db "$WORK/search2.db" --trial "$(cat "$WORK/replay.trial")" \
        --a "$WORK/best" --b "$WORK/best_again"
    else skip replay-check "no replay"; fi
  else skip report2 "search2 failed"; skip replay "search2 failed"; fi
  if step search1 120 search search1 "$WORK/run/search1.yaml" 1 70; then
    step report1 0 report search1 1
  fi
  if [ "$MODE" = gpu ]; then
    step host-sources 40 $PY benchmarks/gpu_check.py host-sources --folder "$WORK/run"
  else skip host-sources "needs CUDA"; fi
else skip searches "build failed"; fi
echo
$PY benchmarks/gpu_check.py summary --work "$WORK" --mode "$MODE"
echo "gpu_check: $FAILED step(s) failed; wall ${SECONDS}s; logs and databases in $WORK"
[ "$FAILED" -eq 0 ]
