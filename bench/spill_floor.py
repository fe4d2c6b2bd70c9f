"""The smallest `spill.spill_memory_mb` the whole-split checks run in, and what each budget holds.

Writes two profiles of --rows rows (validation's columns: row, text_id, text_hash, image_id,
image_hash; 229 MiB at 6M rows) and runs validation's cross-row checks (duplicate pairs, conflicting
ids, leakage from train; in `Spill.passes` passes each) over them under each --budgets value, each
in a process of its own whose peak resident memory is reset once everything is imported (Linux's
clear_refs), so the peak is the checks'. Prints a JSON line per budget: finished or DuckDB's error,
the flag counts, the peak above the memory before the checks, their seconds.

    python -m bench.spill_floor --rows 6000000 --budgets 64 96 128 256 --out bench/results/<folder>
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.measure import emit

REPO = Path(__file__).resolve().parents[1]

# train: image i has hash 7i. test: every 1000th row repeats the pair of the row before it, with a
# second caption every 100,000th row; image i has hash 5i, so those with i divisible by 7 leak.
PROFILES = {
    "train": """SELECT i AS row, i AS text_id, i AS text_hash, i AS image_id, i * 7 AS image_hash
                FROM range({rows}) r(i)""",
    "test": """SELECT row, id AS text_id, CASE WHEN row % 100000 = 1 THEN -row ELSE id END AS text_hash,
                      id AS image_id, id * 5 AS image_hash
               FROM (SELECT i AS row, i - (i % 1000 = 1)::INT AS id FROM range({rows}) r(i))""",
}
CHECK = """
import json, sys, time
from pathlib import Path
from zhclip.components.data.spill import spill_database
from zhclip.components.data.validate import flagged_rows
from bench.measure import reset_peak_rss, resident_mb

folder = Path(sys.argv[1])
with spill_database(int(sys.argv[2]), str(folder / "spill")) as spill:
    reset_peak_rss()  # the peak (VmHWM) starts again from here
    before = resident_mb("VmRSS")
    counts = dict.fromkeys(("duplicate_pair", "text_id_conflict", "image_id_conflict", "leaked_from_train"), 0)
    flagged, started = 0, time.perf_counter()
    for record in flagged_rows(spill, folder / "test.parquet", folder / "train.parquet"):
        flagged += 1
        for name in counts:
            counts[name] += record[name]
    peak = resident_mb("VmHWM")
    seconds = round(time.perf_counter() - started, 1)
print(json.dumps({"counts": counts, "flagged": flagged, "peak_mb": peak, "before_mb": before, "seconds": seconds}))
"""


def write_profiles(folder: Path, rows: int) -> None:
    """train.parquet and test.parquet of `rows` rows each in `folder`, written by DuckDB."""
    import duckdb

    with duckdb.connect() as connection:
        for name, query in PROFILES.items():
            connection.execute(f"COPY ({query.format(rows=rows)}) TO '{folder / name}.parquet'")


def check(folder: Path, budget_mb: int) -> dict:
    """The cross-row query over the profiles in `folder` under `budget_mb`, in a process of its own:
    its counts and peak, or DuckDB's error."""
    result = subprocess.run(
        [sys.executable, "-c", CHECK, str(folder), str(budget_mb)],
        cwd=REPO,  # where `bench.measure` imports from
        capture_output=True,
        text=True,
        timeout=7200,
    )
    if result.returncode:
        error = next((line for line in reversed(result.stderr.splitlines()) if "Error" in line), result.stderr[-300:])
        return {"finished": False, "error": error}
    return {"finished": True, **json.loads(result.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=6_000_000)
    parser.add_argument("--budgets", type=int, nargs="+", default=[64, 96, 128, 256])
    parser.add_argument("--out", type=Path, help="also append the JSON lines to OUT/spill_floor.jsonl")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        write_profiles(Path(folder), args.rows)
        for budget in args.budgets:
            emit(
                {"bench": "spill_floor", "rows": args.rows, "spill_memory_mb": budget} | check(Path(folder), budget),
                args.out / "spill_floor.jsonl" if args.out else None,
            )


if __name__ == "__main__":
    main()
