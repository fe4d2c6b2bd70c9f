"""Which of ingest's whole-split queries DuckDB runs within `spill.spill_memory_mb`, against the rows.

Builds ingest's tables in a spill database (`components/data/spill.py`) of --budget MiB: `decoded`
(line, image_id), `refs` (line, pos, image_id) and `texts` (line, text_id, text), --rows rows each,
every id distinct (the worst case for a hash aggregate), and runs each query, printing a JSON line:
finished with its seconds, or DuckDB's error; and the process's resident memory before the query
and at its peak (Linux's VmHWM, reset before each query). The earlier shapes run in one pass; ingest's own
queries as ingest runs them, in `Spill.passes(rows)` hash-partitioned passes (the line says how many),
the captions merged back in line order.

    PYTHONPATH=. python <this folder>/duckdb_out_of_core.py --rows 10000000 30000000 --budgets 256 1024 --out <folder>
"""

import argparse
import tempfile
import time
from pathlib import Path

from bench.measure import emit, reset_peak_rss, resident_mb
from zhclip.components.data.ingest import CAPTIONS_BY_LINE, MISSING_IMAGES, distinct_texts
from zhclip.components.data.spill import Spill, spill_database

QUERIES = {
    "count(DISTINCT) over a semi join (ingest's images count before)": """
        SELECT count(DISTINCT image_id) FROM decoded WHERE image_id IN (SELECT image_id FROM refs)""",
    "SELECT DISTINCT over a semi join": """
        SELECT count(*) FROM (SELECT DISTINCT image_id FROM decoded WHERE image_id IN (SELECT image_id FROM refs))""",
    "SELECT DISTINCT of one table": "SELECT count(*) FROM (SELECT DISTINCT image_id FROM decoded)",
    "semi join alone": "SELECT count(*) FROM decoded WHERE image_id IN (SELECT image_id FROM refs)",
    "distinct by a window over the whole table (ingest's texts count at c0910e3)": """
        SELECT count(*) FROM (
          SELECT text_id, lag(text_id) OVER (ORDER BY text_id) AS previous FROM texts
          WHERE line IN (SELECT line FROM refs WHERE image_id IN (SELECT image_id FROM decoded))
        ) WHERE previous IS DISTINCT FROM text_id""",
    "distinct by a window partitioned by id (ingest's texts count at 8f7cb36)": """
        SELECT count(*) FROM (
          SELECT row_number() OVER (PARTITION BY text_id) AS nth FROM texts
          WHERE line IN (SELECT line FROM refs WHERE image_id IN (SELECT image_id FROM decoded))
        ) WHERE nth = 1""",
    "captions by line, read through (ingest's join at 8f7cb36)": f"SELECT count(*), sum(nth) FROM ({CAPTIONS_BY_LINE})",
}


def _texts_in_passes(spill: Spill, rows: int) -> None:
    shards = spill.folder / "pairs"
    shards.mkdir()
    spill.sql(f"COPY (SELECT text_id FROM texts) TO '{shards / 'part-00000.parquet'}'")
    assert distinct_texts(spill, shards, rows) == rows


def _captions_in_passes(spill: Spill, rows: int) -> None:
    for _ in spill.merged_passes(CAPTIONS_BY_LINE, rows, key=lambda row: row["line"]):
        pass


def _missing_in_passes(spill: Spill, rows: int) -> None:
    assert not list(spill.merged_passes(MISSING_IMAGES, rows, key=lambda row: row["image_id"]))  # none missing


IN_PASSES = {
    "images the texts name and no line supplied, in passes (ingest's missing images)": _missing_in_passes,
    "distinct text_ids of the pairs' shards in passes by text_id (ingest's texts count)": _texts_in_passes,
    "captions by line in passes, merged and read through (ingest's join)": _captions_in_passes,
}


def _one_pass(query: str):
    def run(spill: Spill, rows: int) -> None:
        list(spill.in_passes(1))  # in_pass(key) true for every key
        spill.sql(query).fetchall()

    return run


def run(rows: int, budget: int, kinds: list[str]) -> list[dict]:
    queries = ({name: _one_pass(query) for name, query in QUERIES.items()} if "one-pass" in kinds else {}) | (
        IN_PASSES if "in-passes" in kinds else {}
    )
    lines = []
    with tempfile.TemporaryDirectory() as folder, spill_database(budget, folder) as spill:
        spill.sql(f"CREATE TABLE decoded AS SELECT i AS line, i AS image_id FROM range({rows}) r(i)")
        spill.sql(f"CREATE TABLE refs AS SELECT i AS line, 0 AS pos, i AS image_id FROM range({rows}) r(i)")
        spill.sql(f"CREATE TABLE texts AS SELECT i AS line, i AS text_id, 'caption' AS text FROM range({rows}) r(i)")
        for name, query in queries.items():
            passes = spill.passes(rows) if name in IN_PASSES else 1
            reset_peak_rss()  # VmHWM starts again from here
            memory = {"rss_before_mb": resident_mb("VmRSS")}
            started = time.perf_counter()
            try:
                query(spill, rows)
                outcome = {"finished": True, "seconds": round(time.perf_counter() - started, 1)}
            except Exception as error:  # DuckDB's out-of-memory error is what is measured
                outcome = {"finished": False, "error": str(error).splitlines()[0]}
            memory["peak_mb"] = resident_mb("VmHWM")
            measured = {"rows": rows, "spill_memory_mb": budget, "query": name, "passes": passes}
            lines.append({"bench": "duckdb_out_of_core"} | measured | outcome | memory)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000_000])
    parser.add_argument("--only", nargs="+", choices=["one-pass", "in-passes"], default=["one-pass", "in-passes"])
    parser.add_argument("--budgets", type=int, nargs="+", default=[256])
    parser.add_argument("--out", type=Path, help="also append the JSON lines to OUT/duckdb_out_of_core.jsonl")
    args = parser.parse_args()
    for rows in args.rows:
        for budget in args.budgets:
            for line in run(rows, budget, args.only):
                emit(line, args.out / "duckdb_out_of_core.jsonl" if args.out else None)


if __name__ == "__main__":
    main()
