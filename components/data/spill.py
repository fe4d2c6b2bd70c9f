"""Checks over a whole split within a memory setting instead of Python sets and dicts per pair.

Ingest's join of captions to images, duplicate ids and pairs, and leakage between splits each need the
whole split at once. They run as DuckDB queries over tables spilled to a folder: DuckDB sorts, groups
and joins out of core once its `memory_limit` is reached (its documented larger-than-memory
processing), which no hand-written set or sort in this repository would do as well. Python only
appends rows in batches and reads results as a stream of Arrow record batches.

Out of core alone is not without bound: some operators ask for blocks that grow with the rows
(bench/investigations/2026-12-05-data-scale-memory/duckdb_out_of_core.py: ingest's join ran 30M rows
in 256 MiB and failed at 100M even in
1 GiB). So the joins and groupings over a split run in hash-partitioned passes (`Spill.passes`): pass
p of P takes the rows whose key hashes to p, P grows with the split's rows so that a pass holds
about the same number of rows whatever the split, and each pass's result, sorted, goes to a Parquet
file; the files are then merged in order, a batch of each at a time.
"""

from __future__ import annotations

import glob
import heapq
import math
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from zhclip.components.core.settings import setting

APPEND_ROWS = 50_000  # rows buffered in Python before they go into a table (bounded, whatever the split)
# Rows of a split one pass takes per MiB of budget: 4M rows in 256 MiB, where ingest's join finished
# 10M and 30M rows in one pass and failed at 100M
# (bench/investigations/2026-12-05-data-scale-memory/duckdb_out_of_core.py).
PASS_ROWS_PER_MB = 16_000
MERGE_BATCH_ROWS = 1_000  # rows of each pass's file in memory while they are merged (P files at once)


@dataclass
class SpillConfig:
    """Section `spill`: the checks over a whole split (ingest's join of captions to images, duplicate
    ids and pairs, train/valid/test leakage) run in DuckDB within this memory, spilling beyond it."""

    spill_memory_mb: int = setting(
        1024, "memory the whole-split checks may hold (DuckDB's memory_limit); beyond it they spill to disk"
    )
    spill_folder: str = setting("", "where they spill (empty: the system's temporary folder); needs free disk")

    def __post_init__(self):
        check_memory(self.spill_memory_mb)


def check_memory(memory_mb: int) -> None:
    # Below it DuckDB cannot run the window queries at all: 64 ran out of memory on a 6M-row split, 96
    # finished (python -m bench.spill_floor;
    # bench/investigations/2026-12-05-data-scale-memory/2026-12-05-cpu-data-scale-spill).
    if memory_mb < 128:
        raise ValueError(f"spill_memory_mb must be at least 128, got {memory_mb}")


class SpillTable:
    """A table of the spill database that rows are appended to one by one, inserted in batches."""

    def __init__(self, spill: Spill, name: str, schema: pa.Schema):
        self.spill, self.name, self.schema = spill, name, schema
        self._columns: list[list] = [[] for _ in schema]
        self.rows = 0
        columns = ", ".join(f'"{field.name}" {_SQL_TYPES[field.type]}' for field in schema)
        spill.sql(f"CREATE TABLE {name} ({columns})")

    def add(self, *values: Any) -> None:
        for column, value in zip(self._columns, values):
            column.append(value)
        self.rows += 1
        if len(self._columns[0]) >= APPEND_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self._columns[0]:
            return
        batch = pa.table(
            [pa.array(column, type=field.type) for column, field in zip(self._columns, self.schema)], schema=self.schema
        )
        self.spill.connection.register("appended_batch", batch)
        self.spill.sql(f"INSERT INTO {self.name} SELECT * FROM appended_batch")
        self.spill.connection.unregister("appended_batch")
        self._columns = [[] for _ in self.schema]


_SQL_TYPES = {pa.int64(): "BIGINT", pa.int32(): "INTEGER", pa.string(): "VARCHAR", pa.bool_(): "BOOLEAN"}


class Spill:
    """A DuckDB database that holds `memory_mb` in memory and spills the rest into `folder`."""

    def __init__(self, folder: Path, memory_mb: int):
        import duckdb

        self.folder, self.memory_mb = folder, memory_mb
        self._results = 0  # pass results written so far: their files' names
        # In memory up to `memory_limit`, the rest in `temp_directory`: tables too, not only the
        # operators' intermediates (measured: 2.2 GB of rows under a 100 MB limit).
        self.connection = duckdb.connect(
            ":memory:",
            config={
                "memory_limit": f"{memory_mb}MB",
                "temp_directory": str(folder / "tmp"),
                # Results keep the order the queries ask for; nothing relies on insertion order, and
                # keeping it would hold more in memory.
                "preserve_insertion_order": False,
            },
        )

    def sql(self, query: str, parameters: list | None = None):
        return self.connection.execute(query, parameters or [])

    def table(self, name: str, **columns: pa.DataType) -> SpillTable:
        return SpillTable(self, name, pa.schema(list(columns.items())))

    def scalar(self, query: str) -> Any:
        return self.sql(query).fetchall()[0][0]

    @contextmanager
    def _batches(self, query: str, batch_rows: int = 10_000) -> Iterator[pa.RecordBatchReader]:
        """A query's result in record batches of `batch_rows`, on a cursor of its own, so rows can be
        written to other tables while they are read."""
        cursor = self.connection.cursor()
        try:
            yield cursor.sql(query).to_arrow_reader(batch_rows)
        finally:
            cursor.close()

    def rows(self, query: str, batch_rows: int = 10_000) -> Iterator[dict[str, Any]]:
        """The rows of a query as dicts, read in record batches of `batch_rows`."""
        with self._batches(query, batch_rows) as batches:
            for batch in batches:
                yield from batch.to_pylist()

    def passes(self, rows: int) -> int:
        """How many hash-partitioned passes a query over `rows` rows of a split takes."""
        return max(1, math.ceil(rows / (self.memory_mb * PASS_ROWS_PER_MB)))

    def in_passes(self, passes: int) -> Iterator[int]:
        """Set up each pass in turn: queries run in pass `p` see `in_pass(key)` true for the keys that
        hash to `p` (a macro, expanded where the query filters, so DuckDB reads only that share)."""
        for part in range(passes):
            self.sql(f"CREATE OR REPLACE MACRO in_pass(key) AS hash(key) % {passes} = {part}")
            yield part

    def merged_passes(self, query: str, rows: int, key: Callable[[dict], Any]) -> Iterator[dict[str, Any]]:
        """The rows of `query`, which filters on `in_pass(...)` and orders by `key`, run in
        `passes(rows)` passes and merged in `key` order (rows of one pass with equal keys keep theirs)."""
        paths = [self.pass_result(query) for _ in self.in_passes(self.passes(rows))]
        return merged(paths, key)

    def pass_result(self, query: str) -> Path:
        """`query`'s result in a Parquet file of the spill folder, in the order it gives (Python writes
        the file: DuckDB's COPY without insertion order kept may reorder it)."""
        path = self.folder / f"pass-{self._results:06d}.parquet"
        self._results += 1
        with self._batches(query) as batches, pq.ParquetWriter(path, batches.schema, write_statistics=False) as writer:
            for batch in batches:
                writer.write_batch(batch)
        return path

    def clear(self) -> None:
        """Drop every table and spilled file: the database starts over (for the next split)."""
        for (name,) in self.sql("SELECT table_name FROM duckdb_tables()").fetchall():
            self.sql(f"DROP TABLE {name}")
        for path in self.folder.iterdir():
            if path.is_file():
                path.unlink()

    def close(self) -> None:
        self.connection.close()


def read_parquet(path: Path, pattern: str = "") -> str:
    """DuckDB's read_parquet of the file `path`, or of the files in folder `path` that match `pattern`.
    The path is escaped: read_parquet takes it for a glob pattern, and a `spill_folder` with `[`, `*` or
    `?` in its name would read other files."""
    escaped = glob.escape(str(path)) + (f"/{pattern}" if pattern else "")
    return "read_parquet('{}')".format(escaped.replace("'", "''"))


def merged(paths: list[Path], key: Callable[[dict], Any]) -> Iterator[dict[str, Any]]:
    """The rows of Parquet files each sorted by `key`, merged in `key` order; each file is deleted once
    read through."""
    yield from heapq.merge(*(_file_rows(path) for path in paths), key=key)


def _file_rows(path: Path) -> Iterator[dict[str, Any]]:
    try:
        # pre_buffer off: with it pyarrow keeps the row groups it read
        # (bench/investigations/2026-12-05-data-scale-memory/parquet_pre_buffer.py)
        for batch in pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=MERGE_BATCH_ROWS):
            yield from batch.to_pylist()
    finally:
        path.unlink(missing_ok=True)


@contextmanager
def spill_database(memory_mb: int, folder: str = "") -> Iterator[Spill]:
    """A fresh spill database of `memory_mb` under `folder` (default: the system's temporary folder),
    removed with everything spilled on exit."""
    parent = Path(folder) if folder else None
    if parent:
        parent.mkdir(parents=True, exist_ok=True)
    workspace = Path(tempfile.mkdtemp(prefix="zhclip-spill-", dir=parent))
    try:
        spill = Spill(workspace, memory_mb)
        try:
            yield spill
        finally:
            spill.close()
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
