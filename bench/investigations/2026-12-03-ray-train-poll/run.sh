#!/usr/bin/env bash
# Wall time of one small `zhclip train` stage (stage 2, 6 steps of 32 pairs, tiny preset) on the small
# test project, with Ray Train's default controller poll (2 s) and the local default zhclip sets (0.25 s).
# Run from a project where `dvc repro` ran on the tests' SMALL_PROJECT_PARAMS; PARAMS points train.storage_path
# at a scratch folder so no run resumes an earlier one.
set -u
for run in 1 2 3; do
  for interval in 2.0 0.25; do
    rm -rf "$SCRATCH"
    start=$(date +%s.%N)
    RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=$interval zhclip train --params "$PARAMS" --stage stage2 --data data/validated \
      --init models/stage1 --out "$SCRATCH/model" --summary "$SCRATCH/summary.json" > "$SCRATCH.log" 2>&1
    end=$(date +%s.%N)
    printf 'run %s interval %5s s: %6.1f s wall; %s\n' "$run" "$interval" "$(echo "$end - $start" | bc)" \
      "$(grep -o 'stage 2: 6 steps in [0-9]* s' "$SCRATCH.log")"
  done
done
