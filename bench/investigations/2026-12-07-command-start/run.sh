#!/usr/bin/env bash
# What a step's command imports before it works, at OLD (a commit) and in the working tree: the
# import time of the training driver's module and the whole `zhclip suite` command, 3 runs each, and
# the CPU time of each process of one training stage.
# OLD's packages are linked under a scratch folder that comes first on PYTHONPATH (zhclip is a
# namespace package, so its zhclip.model and zhclip.components are found there first).
# Usage, from the repository root, in a project where `dvc repro` ran (for the suite's results):
#   OLD=8527019 PROJECT=/tmp/sp bash bench/investigations/2026-12-07-command-start/run.sh
set -euo pipefail
repo=$(pwd)
here=$(cd "$(dirname "$0")" && pwd)
scratch=$(mktemp -d)
git worktree add --quiet --detach "$scratch/tree" "$OLD"
mkdir "$scratch/old" "$scratch/old/zhclip"
for package in model components workflows; do ln -s "$scratch/tree/$package" "$scratch/old/zhclip/$package"; done
trap 'git -C "$repo" worktree remove --force "$scratch/tree"; rm -rf "$scratch"' EXIT

measure() {  # $1: label, PYTHONPATH already set or not
  for run in 1 2 3; do
    total=$("$repo/.venv/bin/python" -X importtime -c "import zhclip.components.training.runner" 2>&1 \
      | awk -F'|' '/zhclip.components.training.runner$/ {print $2 / 1e6}')
    echo "$1 run $run: import zhclip.components.training.runner ${total} s"
  done
  for run in 1 2 3; do
    (cd "$PROJECT" && /usr/bin/time -f "$1 run $run: zhclip suite %e s wall, %U s user, %S s sys" \
      "$repo/.venv/bin/python" -c "import sys; sys.argv = ['zhclip'] + sys.argv[1:]; from zhclip.components.cli import main; main()" \
      suite --results metrics/benchmark --out "$scratch/suite.json" --report-dir "$scratch/suite" > /dev/null)
  done
  echo "$1: one zhclip train --stage stage2, CPU of each process (the driver is the python -c one):"
  (cd "$PROJECT" && PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$repo" "$repo/.venv/bin/python" "$here/process_cpu.py" "$repo/.venv/bin/python" -c \
    "import sys; sys.argv = ['zhclip'] + sys.argv[1:]; from zhclip.components.cli import main; main()" \
    train --stage stage2 --data data/validated --init models/stage1 --out "$scratch/$1-stage2" \
    --summary "$scratch/$1-stage2.json" --set "train.storage_path=$scratch/$1-ray")
}
git -C "$repo" log -1 --format='working tree on %h %s' HEAD
echo "old: $(git -C "$repo" log -1 --format='%h %s' "$OLD")"
PYTHONPATH="$scratch/old" measure old
measure new
