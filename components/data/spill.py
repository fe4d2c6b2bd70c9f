"""Checks over a whole split within a memory setting instead of Python sets and dicts per pair.

Ingest's join of captions to images, duplicate ids and pairs, and leakage between splits each need the
whole split at once. They run as DuckDB queries over tables spilled to a folder: DuckDB sorts, groups
and joins out of core once its `memory_limit` is reached (its documented larger-than-memory
processing), which no hand-written set or sort in this repository would do as well. Python only
appends rows in batches and reads results as a stream of Arrow record batches.

Out of core is not without bound: some operators ask for blocks that grow with the rows (measured
with python -m bench.duckdb_out_of_core: ingest's join runs 30M rows in 256 MiB and fails at 100M in
1 GiB), so a budget holds a split only up to a number of rows. Queries here avoid the worst shapes
(count(DISTINCT), a window over a whole table); hash-partitioned passes are what would lift it.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from zhclip.components.core.settings import setting

APPEND_ROWS = 50_000  # rows buffered in Python before they go into a table (bounded, whatever the split)


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
    # finished (python -m bench.spill_floor; bench/results/2026-12-05-cpu-data-scale-spill).
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

        self.folder = folder
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

    def rows(self, query: str, batch_rows: int = 10_000) -> Iterator[dict[str, Any]]:
        """The rows of a query as dicts, read in record batches of `batch_rows`. A cursor of its own, so
        rows can be written to other tables while they are read."""
        cursor = self.connection.cursor()
        try:
            for batch in cursor.sql(query).to_arrow_reader(batch_rows):
                yield from batch.to_pylist()
        finally:
            cursor.close()

    def clear(self) -> None:
        """Drop every table and spilled file: the database starts over (for the next split)."""
        for (name,) in self.sql("SELECT table_name FROM duckdb_tables()").fetchall():
            self.sql(f"DROP TABLE {name}")
        for path in self.folder.iterdir():
            if path.is_file():
                path.unlink()

    def close(self) -> None:
        self.connection.close()


@contextmanager
def spill_database(memory_mb: int, folder: str = "") -> Iterator[Spill]:
    """A fresh spill database of `memory_mb` under `folder` (default: the system's temporary folder),
    removed with everything spilled on exit."""
    parent = Path(folder) if folder else None
    if parent:
        parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="zhclip-spill-", dir=parent))
    try:
        spill = Spill(folder, memory_mb)
        try:
            yield spill
        finally:
            spill.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
