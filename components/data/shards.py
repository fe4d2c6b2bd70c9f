"""Prepared splits as Parquet row groups: listed from the shards' footers alone, read one at a time.

Every step that reads prepared data goes through here, so its memory is bounded by a row group (a
few hundred pairs: ingest's `row_group_rows`), never by the split. The folder may be local or an
s3:// URI (MinIO); a `PreparedSplit` pickles without its filesystem (`storage.Folder`), so Ray
tasks on other nodes open their own with the credentials of their environment.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from zhclip.components.core.errors import ZhclipError
from zhclip.components.core.storage import Folder

FOOTER_READERS = 16  # shards whose footers are read at once (S3 round trips dominate on MinIO)


@dataclass(frozen=True, slots=True)  # a split lists one per 256 rows: 780,000 at 200M pairs
class RowGroup:
    path: str
    index: int
    rows: int


@dataclass
class PreparedSplit:
    """One split of a prepared folder: its row groups in a fixed order (shards by name, then groups)."""

    folder: Folder
    split: str
    groups: list[RowGroup]

    @classmethod
    def open(cls, prepared_dir: str, split: str) -> PreparedSplit:
        """List the split's shards and read their footers; fails naming the folder when there are none."""
        from pyarrow import fs

        folder = Folder(prepared_dir)
        filesystem = folder.filesystem
        listing = filesystem.get_file_info(fs.FileSelector(folder.path(split), allow_not_found=True))
        shards = sorted(
            info.path for info in listing if info.base_name.startswith("part-") and info.base_name.endswith(".parquet")
        )
        if not shards:
            raise ZhclipError(f"no Parquet shards in {prepared_dir}/{split}; run `zhclip ingest` first")

        def footer(path: str) -> list[RowGroup]:
            with filesystem.open_input_file(path) as handle:
                metadata = pq.ParquetFile(handle).metadata
            return [RowGroup(path, i, metadata.row_group(i).num_rows) for i in range(metadata.num_row_groups)]

        with ThreadPoolExecutor(FOOTER_READERS) as pool:
            groups = [group for shard in pool.map(footer, shards) for group in shard if group.rows]
        return cls(folder, split, groups)

    @property
    def uri(self) -> str:
        return self.folder.uri

    @property
    def rows(self) -> int:
        return sum(group.rows for group in self.groups)

    def first_rows(self) -> np.ndarray:
        """The split-wide number of each row group's first row (a pair's stable position in the split)."""
        return np.concatenate([[0], np.cumsum([group.rows for group in self.groups])[:-1]]).astype(np.int64)

    def read(self, group: int, columns: Sequence[str] | None = None) -> pa.Table:
        """Row group number `group` (of `self.groups`), only `columns` if given."""
        return read_row_group(self.folder, self.groups[group], columns)

    def tables(self, columns: Sequence[str] | None = None) -> Iterator[pa.Table]:
        """Every row group in order: the split, streamed."""
        for group in range(len(self.groups)):
            yield self.read(group, columns)

    def columns(self) -> list[str]:
        """The column names, from the first shard's footer."""
        with self.folder.filesystem.open_input_file(self.groups[0].path) as handle:
            return pq.ParquetFile(handle).schema_arrow.names


def remove_shards(folder: Path) -> None:
    """Delete the `part-*.parquet` shards in local `folder`: an earlier run's, which a step writing
    fewer shards there would otherwise leave to be read as its own."""
    for stale in folder.glob("part-*.parquet"):
        stale.unlink()


def read_row_group(folder: Folder, group: RowGroup, columns: Sequence[str] | None = None) -> pa.Table:
    """One row group, only `columns` if given. What a Ray task is handed is the folder and that row
    group, not the split: a split lists all its row groups (39,000 at 10M pairs), and pickling it into
    each of them made every task's argument, and the step's time, grow with the split."""
    with folder.filesystem.open_input_file(group.path) as handle:
        return pq.ParquetFile(handle).read_row_group(group.index, columns=list(columns) if columns else None)


def read_pairs(prepared_dir: str | Path, split: str):
    """A whole split in memory as a pandas DataFrame, to look at a small one (tests, a notebook).
    No pipeline step calls it: they all stream row groups."""
    return pa.concat_tables(PreparedSplit.open(str(prepared_dir), split).tables()).to_pandas()
