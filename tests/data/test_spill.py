"""The whole-split checks hold memory to their budget (`spill.spill_memory_mb`), not to the split: a
split's profile larger than the budget is checked for duplicates, conflicting ids and leakage with
exact results, the process's memory growing by no more than the budget plus a margin; given a larger
budget, the same check takes more than that. In a process of its own, so its peak is the check's."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from bench.spill_floor import check, write_profiles
from zhclip.components.data.spill import PASS_ROWS_PER_MB, merged, spill_database

ROWS = 6_000_000  # 5 int64 columns: 229 MiB of profile
BUDGET_MB = 128
MARGIN_MB = 100  # the Arrow batches in flight and DuckDB's own structures outside its buffer pool


def _check(folder, budget_mb: int) -> dict:
    found = check(folder, budget_mb)
    assert found["finished"], found["error"]
    return found


@pytest.fixture(scope="module")
def profiles(tmp_path_factory):
    folder = tmp_path_factory.mktemp("profiles")
    write_profiles(folder, ROWS)  # which rows repeat, conflict and leak: bench/spill_floor.py's PROFILES
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


def test_passes_grow_with_the_rows_so_that_each_holds_the_same_share_of_the_budget(tmp_path):
    with spill_database(256, str(tmp_path)) as spill:
        per_pass = 256 * PASS_ROWS_PER_MB
        assert [spill.passes(rows) for rows in (0, per_pass, per_pass + 1, 200_000_000)] == [1, 1, 2, 49]


def test_passes_partition_the_keys_and_merge_back_in_order(tmp_path):
    with spill_database(128, str(tmp_path)) as spill:
        spill.sql("CREATE TABLE t AS SELECT i AS k, i % 10 AS v FROM range(1000) r(i)")
        paths = [spill.pass_result("SELECT k, v FROM t WHERE in_pass(k) ORDER BY k") for _ in spill.in_passes(4)]
        sizes = [pq.ParquetFile(path).metadata.num_rows for path in paths]
        rows = list(merged(paths, key=lambda row: row["k"]))
        assert [row["k"] for row in rows] == list(range(1000)) and all(row["v"] == row["k"] % 10 for row in rows)
        assert sum(sizes) == 1000 and 0 < min(sizes) and not any(path.exists() for path in paths)
