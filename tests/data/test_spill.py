"""The whole-split checks hold memory to their budget (`spill.spill_memory_mb`), not to the split: a
split's profile larger than the budget is checked for duplicates, conflicting ids and leakage with
exact results, the process's memory growing by no more than the budget plus a margin; given a larger
budget, the same check takes more than that. In a process of its own, so its peak is the check's."""

import json
import subprocess
import sys

import numpy as np

ROWS = 6_000_000  # 5 int64 columns: 229 MiB of profile
BUDGET_MB = 128
MARGIN_MB = 100  # the Arrow batches in flight and DuckDB's own structures outside its buffer pool

CHECK = f"""
import json, resource, sys
from pathlib import Path
from zhclip.components.data.spill import spill_database
from zhclip.components.data.validate import flagged_rows

folder = Path(sys.argv[1])
folder.mkdir()
with spill_database(int(sys.argv[2]), str(folder)) as spill:
    # train: image i has hash 7i. test: every 1000th row repeats the pair of the row before it, with a
    # second caption every 100,000th row; image i has hash 5i, so those with i divisible by 7 leak.
    spill.sql(f'''COPY (SELECT i AS row, i AS text_id, i AS text_hash, i AS image_id, i * 7 AS image_hash
                      FROM range({ROWS}) r(i)) TO '{{folder}}/train.parquet' ''')
    spill.sql(f'''COPY (SELECT row, id AS text_id, CASE WHEN row % 100000 = 1 THEN -row ELSE id END AS text_hash,
                             id AS image_id, id * 5 AS image_hash
                      FROM (SELECT i AS row, i - (i % 1000 = 1)::INT AS id FROM range({ROWS}) r(i)))
                      TO '{{folder}}/test.parquet' ''')
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    counts = dict.fromkeys(("duplicate_pair", "text_id_conflict", "image_id_conflict", "leaked_from_train"), 0)
    rows = 0
    for record in flagged_rows(spill, folder / "test.parquet", folder / "train.parquet"):
        rows += 1
        for name in counts:
            counts[name] += record[name]
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({{"counts": counts, "rows": rows, "peak_mb": after, "before_mb": before}}))
"""


def _check(folder, budget_mb: int) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", CHECK, str(folder), str(budget_mb)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_cross_row_checks_of_a_split_larger_than_the_budget_stay_within_it(tmp_path):
    found = _check(tmp_path / "within", BUDGET_MB)
    ids = np.arange(ROWS)
    assert found["counts"] == {
        "duplicate_pair": ROWS // 1000,  # rows 1, 1001, ... repeat the pair of the row before
        "text_id_conflict": 2 * (ROWS // 100_000),  # both rows of each text_id with two captions
        "image_id_conflict": 0,
        "leaked_from_train": int(np.sum((ids - (ids % 1000 == 1)) % 7 == 0)),
    }
    assert found["peak_mb"] - found["before_mb"] < BUDGET_MB + MARGIN_MB, found
    unbounded = _check(tmp_path / "roomy", 16 * BUDGET_MB)
    assert unbounded["counts"] == found["counts"]
    assert unbounded["peak_mb"] - unbounded["before_mb"] > BUDGET_MB + MARGIN_MB, unbounded  # the budget held it
