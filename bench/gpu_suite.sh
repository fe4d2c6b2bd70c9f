#!/usr/bin/env bash
# Every GPU measurement of bench/RESULTS.md in one run of at most SUITE_BUDGET_S seconds (default
# 300) on one GPU; the headline cases come first, the per-switch ablations use what time is left.
#
#   OUT=/some/empty/folder bash bench/gpu_suite.sh            # from the repository root
#
# Needs python3 with torch, transformers, numpy, pillow, pyarrow, pandas, pyyaml, tqdm (torchvision
# for the nvJPEG case) and the cn-clip wheel in .whl/ (`python3 -m pip download --no-deps
# cn-clip==1.6.0 -d .whl`); no Ray, MLflow or network. Writes JSON lines to $OUT/train.jsonl,
# embed.jsonl, input.jsonl and ablations.jsonl, and everything else the runs print to $OUT/suite.log.
# Each part has its own time limit, and every case is written as soon as it finishes, so an
# interrupted run keeps what it measured. BENCH_ARGS and INPUT_ARGS are added to the model and
# input benchmarks' arguments, e.g. for a CPU dry run of the plumbing:
#   BENCH_ARGS="--preset tiny --batch-size 8 --steps 2 --warmup 1" INPUT_ARGS="--width 64 --height 48" ...
set -uo pipefail

OUT=${OUT:?set OUT to an empty folder for the results}
BUDGET=${SUITE_BUDGET_S:-300}
START=$SECONDS
mkdir -p "$OUT"
LOG="$OUT/suite.log"

python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >>"$LOG" 2>&1
export PYTHONPATH=/tmp/site:.
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >>"$LOG" 2>&1

left() { echo $((BUDGET - (SECONDS - START))); }

# part FILE LIMIT_S MODULE ARGS...: run one benchmark under a time limit, results to $OUT/FILE
part() {
  local file=$1 limit=$2 module=$3
  shift 3
  if [ "$(left)" -lt 20 ]; then
    echo "skipped $module: suite budget spent" >>"$LOG"
    return
  fi
  [ "$limit" -gt "$(left)" ] && limit=$(left)
  echo "== $module $* (limit ${limit}s, $(left)s left)" >>"$LOG"
  timeout --kill-after=10 "$limit" python3 -m "$module" "$@" >>"$OUT/$file" 2>>"$LOG"
  echo "== $module exit $? after $((SECONDS - START))s" >>"$LOG"
}

# The headline: reference vs zhclip in both stages (the first line holds the measured matmul peak).
read -ra EXTRA <<<"${BENCH_ARGS:-}"
read -ra INPUT_EXTRA <<<"${INPUT_ARGS:-}"

part train.jsonl 160 bench.train_throughput "${EXTRA[@]}" --budget-s 130 \
  --cases reference-s2 reference-s1 fast-s2 fast-s1 fast-s1-cached eager-s2 bf16-s2 fast-flip50-s2
PEAK=$(python3 -c "import json,sys; print(json.loads(open(sys.argv[1]).readline())['matmul_peak_tflops'] or '')" \
  "$OUT/train.jsonl" 2>>"$LOG")
PEAK_ARGS=()
[ -n "$PEAK" ] && PEAK_ARGS=(--peak-tflops "$PEAK")

part embed.jsonl 50 bench.embed_throughput "${EXTRA[@]}" "${PEAK_ARGS[@]}" --cases reference-fp16 bf16 bf16-fast
part input.jsonl 50 bench.input_pipeline --images 6144 --workers 4 16 --gpu-decode "${INPUT_EXTRA[@]}"

# What each switch brings on its own, then the costlier compile variants, as time allows.
part ablations.jsonl "$(left)" bench.train_throughput "${EXTRA[@]}" "${PEAK_ARGS[@]}" --budget-s "$(( $(left) - 40 ))" \
  --cases fp32-s2 bf16-fused-adamw-s2 bf16-fused-qkv-s2 bf16-channels-last-s2 eager-flash-s2 eager-cudnn-s2 \
  eager-efficient-s2 fast-cudnn-s2 fast-cudagraphs-s2 fast-model-s2

echo "suite done in $((SECONDS - START))s" >>"$LOG"
