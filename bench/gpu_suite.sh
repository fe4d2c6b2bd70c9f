#!/usr/bin/env bash
# Every GPU measurement of bench/RESULTS.md in one run of at most SUITE_BUDGET_S seconds (default
# 300) on one GPU; the headline cases come first, the per-switch ablations use what time is left.
#
#   OUT=/some/empty/folder bash bench/gpu_suite.sh            # from the repository root
#
# Needs python3 with torch, transformers, numpy, pillow, pyarrow, pandas, pyyaml, tqdm (torchvision
# for the nvJPEG case) and the cn-clip wheel in .whl/ (`python3 -m pip download --no-deps
# cn-clip==1.6.0 -d .whl`); no Ray, MLflow or network. Writes JSON lines to $OUT/train.jsonl,
# embed.jsonl, input.jsonl and ablations.jsonl, and everything else the runs print to $OUT/suite.log;
# `python -m bench.report $OUT --plot chart.png` turns them into RESULTS.md's verdict, tables and chart.
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

read -ra EXTRA <<<"${BENCH_ARGS:-}"
read -ra INPUT_EXTRA <<<"${INPUT_ARGS:-}"

# The headline: reference vs zhclip in both stages, padding-free text next to the previous best
# (the first line holds the measured matmul peak).
part train.jsonl 170 bench.train_throughput "${EXTRA[@]}" --budget-s 140 \
  --cases reference-s2 reference-s1 fast-s2 fast-s1 fast-pf-s2 fast-pf-s1 fast-pf-s1-cached fast-flip50-s2
PEAK=$(python3 -c "import json,sys; print(json.loads(open(sys.argv[1]).readline())['matmul_peak_tflops'] or '')" \
  "$OUT/train.jsonl" 2>>"$LOG")
PEAK_ARGS=()
[ -n "$PEAK" ] && PEAK_ARGS=(--peak-tflops "$PEAK")

part embed.jsonl 70 bench.embed_throughput "${EXTRA[@]}" "${PEAK_ARGS[@]}" \
  --cases reference-fp16 bf16-fast bf16-fast-cudagraphs bf16-fast-model-cudagraphs
part input.jsonl 40 bench.input_pipeline --images 4096 --workers 16 --gpu-decode "${INPUT_EXTRA[@]}"

# Padding-free variants, then the switches measured before, as time allows.
part ablations.jsonl "$(left)" bench.train_throughput "${EXTRA[@]}" "${PEAK_ARGS[@]}" --budget-s "$(( $(left) - 40 ))" \
  --cases eager-pf-s2 fast-pf-model-s2 fast-pf-ckpt-s2 eager-s2 fast-model-s2 fast-cudagraphs-s2 fast-pf-autotune-s2

echo "suite done in $((SECONDS - START))s" >>"$LOG"
