#!/usr/bin/env bash
# Every GPU measurement of bench/RESULTS.md in one run of at most SUITE_BUDGET_S seconds (default
# 580) on one GPU; the headline cases come first, the per-switch ablations use what time is left.
#
#   OUT=/some/empty/folder bash bench/gpu_suite.sh            # from the repository root
#
# Needs python3 with torch, transformers, numpy, pillow, pyarrow, pandas, pyyaml, tqdm, scikit-learn
# (the demo data's digits) and torchvision (GPU decoding), and the cn-clip wheel in .whl/
# (`python3 -m pip download --no-deps cn-clip==1.6.0 -d .whl`); no Ray, MLflow or network. Writes JSON lines to $OUT/train.jsonl,
# e2e.jsonl, embed.jsonl, loss.jsonl and ablations.jsonl, and everything else the runs print to
# $OUT/suite.log; `python -m bench.report $OUT --plot chart.png --loss-plot curves.png` turns them
# into RESULTS.md's verdict, tables and charts.
# Each part has its own time limit, and every case is written as soon as it finishes, so an
# interrupted run keeps what it measured. BENCH_ARGS, E2E_ARGS and LOSS_ARGS are added to the model
# benchmarks', the end-to-end run's and the loss curves' arguments, e.g. for a CPU dry run of the plumbing:
#   BENCH_ARGS="--preset tiny --batch-size 8 --steps 2 --warmup 1" \
#   E2E_ARGS="--preset tiny --batch-size 8 --images 64 --workers 2 --steps 2 --warmup 3 --width 64 --height 48" \
#   LOSS_ARGS="--preset tiny --batch-size 8 --steps 20 --window 5 --train-images 40 --workers 2" ...
set -uo pipefail

OUT=${OUT:?set OUT to an empty folder for the results}
BUDGET=${SUITE_BUDGET_S:-580}
START=$SECONDS
mkdir -p "$OUT"
LOG="$OUT/suite.log"

python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >>"$LOG" 2>&1
# The bare host runs the repository uninstalled: the `zhclip` namespace is its folders, linked.
mkdir -p /tmp/site/zhclip && ln -sfn "$PWD/model" /tmp/site/zhclip/model && ln -sfn "$PWD/components" /tmp/site/zhclip/components
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
read -ra E2E_EXTRA <<<"${E2E_ARGS:-}"
read -ra LOSS_EXTRA <<<"${LOSS_ARGS:-}"

# The headline: reference, peer (plain transformers + torch.compile) and zhclip in both stages, on
# the same batch (the first line holds the measured matmul peak).
part train.jsonl 230 bench.train_throughput "${EXTRA[@]}" --budget-s 190 \
  --cases reference-s2 hf-compile-s2 fast-pf-s2 fast-s2 reference-s1 hf-compile-s1 fast-pf-s1 fast-s1
PEAK=$(python3 -c "import json,sys; print(json.loads(open(sys.argv[1]).readline())['matmul_peak_tflops'] or '')" \
  "$OUT/train.jsonl" 2>>"$LOG")
PEAK_ARGS=()
[ -n "$PEAK" ] && PEAK_ARGS=(--peak-tflops "$PEAK")

# The fastest stage-2 zhclip case that measured (work-changing cases aside), for the runs below.
FASTEST=$(python3 -c "
import json, sys
cases = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
eligible = [c for c in cases if c.get('impl') == 'zhclip' and c.get('stage') == 2 and 'samples_per_s' in c
            and not c.get('mask_ratio') and not c.get('cache_image_embeds')]
print(max(eligible, key=lambda c: c['samples_per_s'])['case'] if eligible else 'fast-s2')" "$OUT/train.jsonl" 2>>"$LOG")
FASTEST=${FASTEST:-fast-s2}
echo "fastest stage-2 case: $FASTEST" >>"$LOG"

# Real JPEG shards through the training input (16 loader processes; decoded on the CPU, then on the GPU).
part e2e.jsonl 80 bench.train_end_to_end --case "$FASTEST" --images 8192 --workers 16 "${E2E_EXTRA[@]}"
part embed.jsonl 50 bench.embed_throughput "${EXTRA[@]}" "${PEAK_ARGS[@]}" \
  --cases reference-fp16 bf16-fast bf16-fast-cudagraphs
# 200 steps of plain fp32 and of the fastest case (GPU decoding) on the demo's shapes, plus plain
# again with other dropout draws (the noise floor).
part loss.jsonl 170 bench.loss_curve --fast "$FASTEST" --batch-size 64 --steps 200 --workers 16 --noise-floor \
  "${LOSS_EXTRA[@]}"

# The switches one by one, as time allows.
part ablations.jsonl "$(left)" bench.train_throughput "${EXTRA[@]}" "${PEAK_ARGS[@]}" --budget-s "$(( $(left) - 40 ))" \
  --cases fast-pf-model-s2 fast-pf-model-s1 fast-pf-s1-cached eager-pf-s2 fast-pf-cudagraphs-s2 fast-pf-autotune-s2 \
  fast-pf-ckpt-s2

echo "suite done in $((SECONDS - START))s" >>"$LOG"
