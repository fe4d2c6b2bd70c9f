"""img2dataset's output as a raw split: webdataset tar shards or Parquet shards, read shard by shard.

img2dataset (the downloader LAION, Wukong and most paper-scale corpora are fetched with) writes a
folder of numbered shards:
- `--output_format webdataset`: `00000.tar` holding `{key}.jpg`, `{key}.txt` and `{key}.json` for each
  image it fetched, and beside it `00000.parquet` with one row per URL it tried: `key`, `status`
  (`success`, `failed_to_download`, `failed_to_resize`), `error_message`, width, height...;
- `--output_format parquet`: `00000.parquet` with those columns plus `jpg` (the image, null where it
  failed) and `txt` (the caption).
A split is the folder `{split}/` of the raw folder, local or s3://. Every row img2dataset tried is
read: a failed one is counted and quarantined with img2dataset's reason, never ingested.

Tars are read with the standard library's `tarfile` as a stream (one pass, no seeks: on s3:// a seek
is a request), not the `webdataset` package: its pipeline opens URLs itself (bypassing the
object-store retry policy of `storage.py`) and yields only the samples in the tar, while the rows
img2dataset failed are in the Parquet beside it.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow.parquet as pq

from zhclip.components.core.storage import Folder

WEBDATASET, PARQUET = "webdataset", "parquet"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass
class Row:
    """One row img2dataset tried: its key, caption and image bytes, or why there is none."""

    key: str
    caption: object
    image: bytes | None
    problem: str | None
    fetched: bool = True  # False where img2dataset's status says it failed


def shards(raw: Folder, split: str) -> tuple[str, list[str]] | None:
    """(format, shard paths relative to `raw`, in order) when `raw/{split}/` holds img2dataset
    output, else None."""
    from pyarrow import fs

    if raw.kind(split) != fs.FileType.Directory:
        return None
    listing = raw.filesystem.get_file_info(fs.FileSelector(raw.path(split)))
    names = sorted(info.base_name for info in listing if info.type == fs.FileType.File)
    tars = [name for name in names if name.endswith(".tar")]
    if tars:
        return WEBDATASET, [f"{split}/{name}" for name in tars]
    parquets = [name for name in names if name.endswith(".parquet")]
    return (PARQUET, [f"{split}/{name}" for name in parquets]) if parquets else None


def read_shard(raw: Folder, shard: str, kind: str) -> Iterator[Row]:
    """Every row of one shard, in img2dataset's order."""
    return _webdataset_rows(raw, shard) if kind == WEBDATASET else _parquet_rows(raw, shard)


def _not_fetched(key: str, caption: object, record: dict) -> Row:
    """The row of a URL img2dataset failed, with its status and error message as the reason."""
    reason = f"img2dataset did not fetch it (status {record['status']}: {record.get('error_message') or 'no message'})"
    return Row(key, caption, None, reason, fetched=False)


def _records(raw: Folder, shard: str, columns: tuple[str, ...]) -> Iterator[dict]:
    """The rows of a Parquet shard as dicts of those of `columns` it has, a row group at a time."""
    with raw.filesystem.open_input_file(raw.path(shard)) as handle:
        table = pq.ParquetFile(handle)
        present = [c for c in columns if c in table.schema_arrow.names]
        for group in range(table.num_row_groups):
            yield from table.read_row_group(group, columns=present).to_pylist()


def _fetched(record: dict) -> bool:
    return record.get("status", "success") == "success"


def _parquet_rows(raw: Folder, shard: str) -> Iterator[Row]:
    columns = ("key", "txt", "caption", "status", "error_message", *IMAGE_EXTENSIONS)
    for record in _records(raw, shard, columns):
        key, caption = str(record.get("key")), record.get("txt", record.get("caption"))
        image = next((record[ext] for ext in IMAGE_EXTENSIONS if record.get(ext)), None)  # --encode_format
        if not _fetched(record):
            yield _not_fetched(key, caption, record)
        elif image is None:
            yield Row(key, caption, None, "img2dataset marked it fetched but its image column is empty")
        else:
            yield Row(key, caption, image, None)


def _webdataset_rows(raw: Folder, shard: str) -> Iterator[Row]:
    """The rows of the Parquet beside the tar (every URL tried), each fetched one with its sample from
    the tar; without that Parquet, the tar's samples. Both are in key order (img2dataset numbers its
    rows), so a sample the Parquet does not list is still read, and a listed one the tar lacks is
    quarantined, without the two falling out of step."""
    from pyarrow import fs

    samples = _tar_samples(raw, shard)
    pending = next(samples, None)
    meta = shard.removesuffix(".tar") + ".parquet"
    records = (
        _records(raw, meta, ("key", "caption", "status", "error_message")) if raw.kind(meta) == fs.FileType.File else ()
    )
    for record in records:
        key = str(record.get("key"))
        while pending is not None and _order(pending[0]) < _order(key):  # a sample no row lists
            yield _sample_row(*pending)
            pending = next(samples, None)
        if not _fetched(record):
            yield _not_fetched(key, record.get("caption"), record)
            if pending is not None and pending[0] == key:  # a sample for a row it failed: part of that row
                pending = next(samples, None)
        elif pending is None or pending[0] != key:
            yield Row(key, record.get("caption"), None, f"img2dataset fetched it but {raw.name(shard)} lacks it")
        else:
            yield _sample_row(*pending)
            pending = next(samples, None)
    while pending is not None:  # samples after the last listed row
        yield _sample_row(*pending)
        pending = next(samples, None)


def _order(key: str) -> tuple[int, str]:
    """img2dataset's keys sort as numbers (zero-padded to one width within a run)."""
    return (len(key), key)


def _sample_row(key: str, files: dict[str, bytes]) -> Row:
    image = next((files[ext] for ext in IMAGE_EXTENSIONS if ext in files), None)
    caption = files["txt"].decode("utf-8", "surrogateescape") if "txt" in files else None
    if image is None:
        return Row(key, caption, None, f"sample {key} has no image ({', '.join(sorted(files)) or 'no files'})")
    return Row(key, caption, image, None)


def _tar_samples(raw: Folder, shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of each sample of a webdataset tar: consecutive members named
    `{key}.{extension}`, read as a stream."""
    key, files = None, {}
    with raw.open(shard) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = member.name.rsplit("/", 1)[-1]
            stem, _, extension = name.partition(".")
            if stem != key and key is not None:
                yield key, files
                files = {}
            key = stem
            files[extension.lower()] = tar.extractfile(member).read()
    if key is not None:
        yield key, files
