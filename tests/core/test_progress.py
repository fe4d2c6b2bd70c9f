"""Progress bars on a terminal, whole lines elsewhere: what a step writes through a pipe (CI, `dvc
repro > log`, a pod's log) has no carriage return, one line at most every interval, and a last line."""

import os
import subprocess
import sys

from zhclip.components.core.progress import INTERVAL_ENV, MLFLOW_BARS_ENV

SCRIPT = """
import time
from zhclip.components.core.progress import progress_bar, quiet_library_bars
quiet_library_bars()
import os; print(os.environ.get("{bars}"), flush=True)
for _ in progress_bar(range(30), desc="towers", unit="step"):
    time.sleep(0.02)
with progress_bar(total=None, desc="upload", unit="files") as bar:
    for _ in range(5):
        bar.update()
with progress_bar(total=4, desc="ingest train", unit="shards", leave=False):
    pass
"""


def test_through_a_pipe_a_bar_is_plain_lines_at_most_every_interval():
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(bars=MLFLOW_BARS_ENV)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, INTERVAL_ENV: "0.2"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "false"  # MLflow's own bars are off: not a terminal
    assert "\r" not in result.stderr
    lines = result.stderr.splitlines()
    towers = [line for line in lines if line.startswith("towers: ")]
    assert 2 <= len(towers) <= 5  # 0.6 s of work, a line every 0.2 s at most, and the last
    assert all(" step/s" in line and "ETA" in line for line in towers[:-1])
    assert towers[-1].startswith("towers: 30 step in 00:00")
    assert [line for line in lines if line.startswith("upload")][-1].startswith("upload: 5 files in ")
    assert not any(line.startswith("ingest train") for line in lines)  # nothing done, nothing said
