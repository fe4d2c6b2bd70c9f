#!/usr/bin/env bash
# The test-only environments with and without byte-compiled modules, where PYTHONDONTWRITEBYTECODE is
# set (Python then never writes the .pyc of what it compiles): their install, one process's imports,
# and the two test modules that start processes in them. Run from the repository root, after
# `make install`, with nothing else running; it reinstalls .venv-reference and .venv-img2dataset twice
# (the second time compiled, as the Makefile installs them). README.md beside it says what it showed.
set -euo pipefail
export PYTHONDONTWRITEBYTECODE=1
imports() {
  for _ in 1 2; do
    /usr/bin/time -f "  .venv-reference: import torch, cn_clip.clip  %e s" \
      sh -c '.venv-reference/bin/python -c "import torch, cn_clip.clip" >/dev/null 2>&1'
    /usr/bin/time -f "  .venv-img2dataset: img2dataset --help  %e s" \
      sh -c '.venv-img2dataset/bin/img2dataset --help >/dev/null 2>&1'
  done
}
tests() {
  .venv/bin/python -m pytest -q -p no:cacheprovider -n 0 tests/evaluation/test_zeroshot_reference.py \
    tests/data/test_img2dataset.py 2>&1 | tail -1
}
install() {  # $1: an extra pip flag ("" or --no-compile) in the Makefile's recipes of both environments
  rm -rf .venv-reference .venv-img2dataset
  sed "s/pip install --quiet /pip install --quiet $1 /" Makefile > /tmp/Makefile.measure
  /usr/bin/time -f "  both installed side by side (make -j2): %e s" \
    sh -c 'make --no-print-directory -s -f /tmp/Makefile.measure -j2 reference-env img2dataset-env >/tmp/install.log 2>&1'
}
for flag in --no-compile ""; do
  echo "== pip install ${flag:-(byte-compiled, as pip does by default)}"
  install "$flag" 2>&1
  echo "  .pyc files: $(find .venv-reference .venv-img2dataset -name '*.pyc' | wc -l)"
  imports 2>&1
  echo "  tests/evaluation/test_zeroshot_reference.py + tests/data/test_img2dataset.py: $(tests)"
done
