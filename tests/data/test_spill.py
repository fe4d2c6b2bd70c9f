"""The whole-split checks hold memory to their budget (`spill.spill_memory_mb`), not to the split: a
split's profile larger than the budget is checked for duplicates, conflicting ids and leakage with
exact results, the process's memory growing by no more than the budget plus a margin; given a larger
budget, the same check takes more than that. In a process of its own, so its peak is the check's."""

import json
import subprocess
import sys

import numpy as np
import pytest

ROWS = 6_000_000  # 5 int64 columns: 229 MiB of profile
BUDGET_MB = 128
MARGIN_MB = 100  # the Arrow batches in flight and DuckDB's own structures outside its buffer pool

# The profiles, written by DuckDB in the test's process. train: image i has hash 7i. test: every
# 1000th row repeats the pair of the row before it, with a second caption every 100,000th row; image
# i has hash 5i, so those with i divisible by 7 leak.
PROFILES = {
    "train": f"""SELECT i AS row, i AS text_id, i AS text_hash, i AS image_id, i * 7 AS image_hash
                 FROM range({ROWS}) r(i)""",
    "test": f"""SELECT row, id AS text_id, CASE WHEN row % 100000 = 1 THEN -row ELSE id END AS text_hash,
                       id AS image_id, id * 5 AS image_hash
                FROM (SELECT i AS row, i - (i % 1000 = 1)::INT AS id FROM range({ROWS}) r(i))""",
}
# The check, in a process of its own: its peak resident memory is reset once everything is imported
# (Linux's clear_refs), so the peak it reports is the query's.
CHECK = """
import json, sys
from pathlib import Path
from zhclip.components.data.spill import spill_database
from zhclip.components.data.validate import flagged_rows

def memory_mb(field):
    return int(next(line for line in open("/proc/self/status") if line.startswith(field)).split()[1]) / 1024

folder = Path(sys.argv[1])
with spill_database(int(sys.argv[2]), str(folder / "spill")) as spill:
    open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here
    before = memory_mb("VmRSS:")
    counts = dict.fromkeys(("duplicate_pair", "text_id_conflict", "image_id_conflict", "leaked_from_train"), 0)
    rows = 0
    for record in flagged_rows(spill, folder / "test.parquet", folder / "train.parquet"):
        rows += 1
        for name in counts:
            counts[name] += record[name]
    peak = memory_mb("VmHWM:")
print(json.dumps({"counts": counts, "rows": rows, "peak_mb": peak, "before_mb": before}))
"""


def _check(folder, budget_mb: int) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", CHECK, str(folder), str(budget_mb)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def profiles(tmp_path_factory):
    import duckdb

    folder = tmp_path_factory.mktemp("profiles")
    with duckdb.connect() as connection:
        for name, query in PROFILES.items():
            connection.execute(f"COPY ({query}) TO '{folder / name}.parquet'")
    return folder


def test_cross_row_checks_of_a_split_larger_than_the_budget_stay_within_it(profiles):
    found = _check(profiles, BUDGET_MB)
    ids = np.arange(ROWS)
    assert found["counts"] == {
        "duplicate_pair": ROWS // 1000,  # rows 1, 1001, ... repeat the pair of the row before
        "text_id_conflict": 2 * (ROWS // 100_000),  # both rows of each text_id with two captions
        "image_id_conflict": 0,
        "leaked_from_train": int(np.sum((ids - (ids % 1000 == 1)) % 7 == 0)),
    }
    assert found["peak_mb"] - found["before_mb"] < BUDGET_MB + MARGIN_MB, found
    unbounded = _check(profiles, 16 * BUDGET_MB)
    assert unbounded["counts"] == found["counts"]
    assert unbounded["peak_mb"] - unbounded["before_mb"] > BUDGET_MB + MARGIN_MB, unbounded  # the budget held it
