"""img2dataset's output as a raw split: webdataset tar shards, Parquet shards or `files` folders, read
shard by shard.

img2dataset (the downloader LAION, Wukong and most paper-scale corpora are fetched with) writes a
folder of numbered shards, each with `00000.parquet` listing one row per URL it tried: `key`,
`status` (`success`, `failed_to_download`, `failed_to_resize`), `error_message`, `caption`, width,
height...; the samples it fetched are
- `--output_format webdataset`: in `00000.tar`, as `{key}.jpg`, `{key}.txt` and `{key}.json`;
- `--output_format files`: in the folder `00000/`, as the same three files;
- `--output_format parquet`: in that Parquet itself, as columns `jpg` (null where it failed) and `txt`.
A split is the folder `{split}/` of the raw folder, local or s3://. Every row img2dataset tried is
read: a failed one is counted and quarantined with img2dataset's reason, never ingested.

img2dataset writes a shard's samples, in the tar, the folder and the Parquet alike, in the order their
downloads finish (`0000000, 0000002, 0000003, 0000001, ...`, different on every run), so a sample is
matched to its Parquet row by key: the shard's Parquet rows are held in a dict by key (a shard is at
most img2dataset's `number_sample_per_shard` rows, 10,000 by default; the split is never held).

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

WEBDATASET, PARQUET, FILES = "webdataset", "parquet", "files"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_LISTED_COLUMNS = ("key", "caption", "status", "error_message")


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
    output, else None. A `files` shard is named by its folder (`{split}/00000`)."""
    from pyarrow import fs

    if raw.kind(split) != fs.FileType.Directory:
        return None
    listing = raw.filesystem.get_file_info(fs.FileSelector(raw.path(split)))
    files = sorted(info.base_name for info in listing if info.type == fs.FileType.File)
    folders = {info.base_name for info in listing if info.type == fs.FileType.Directory}
    tars = [name for name in files if name.endswith(".tar")]
    if tars:
        return WEBDATASET, [f"{split}/{name}" for name in tars]
    parquets = [name.removesuffix(".parquet") for name in files if name.endswith(".parquet")]
    if parquets and all(stem in folders for stem in parquets):
        return FILES, [f"{split}/{stem}" for stem in parquets]
    return (PARQUET, [f"{split}/{stem}.parquet" for stem in parquets]) if parquets else None


def read_shard(raw: Folder, shard: str, kind: str) -> Iterator[Row]:
    """Every row of one shard: each sample in the shard's order, then the rows its Parquet lists
    without a sample."""
    if kind == PARQUET:
        return _parquet_rows(raw, shard)
    samples = _tar_samples(raw, shard) if kind == WEBDATASET else _folder_samples(raw, shard)
    return _rows_by_key(raw, shard, samples)


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
    columns = (*_LISTED_COLUMNS, "txt", *IMAGE_EXTENSIONS)
    for record in _records(raw, shard, columns):
        key, caption = str(record.get("key")), record.get("txt", record.get("caption"))
        image = next((record[ext] for ext in IMAGE_EXTENSIONS if record.get(ext)), None)  # --encode_format
        if not _fetched(record):
            yield _not_fetched(key, caption, record)
        elif image is None:
            yield Row(key, caption, None, "img2dataset marked it fetched but its image column is empty")
        else:
            yield Row(key, caption, image, None)


def _listed(raw: Folder, shard: str) -> dict[str, dict]:
    """The rows the Parquet beside a tar or folder lists, by key in its order (empty without one).
    One shard's rows of four short columns: what matching by key holds."""
    from pyarrow import fs

    meta = shard.removesuffix(".tar") + ".parquet"
    if raw.kind(meta) != fs.FileType.File:
        return {}
    return {str(record.get("key")): record for record in _records(raw, meta, _LISTED_COLUMNS)}


def _rows_by_key(raw: Folder, shard: str, samples: Iterator[tuple[str, dict[str, bytes]]]) -> Iterator[Row]:
    """Each sample of a tar or folder with its Parquet row, matched by key; then each listed row no
    sample had: failed (img2dataset's reason) or fetched and missing from the shard. A sample the
    Parquet does not list is still read; one for a row img2dataset failed is part of that row."""
    listed = _listed(raw, shard)
    for key, files in samples:
        record = listed.pop(key, None)
        if record is not None and not _fetched(record):
            yield _not_fetched(key, record.get("caption"), record)
        else:
            yield _sample_row(key, files)
    for key, record in listed.items():
        if not _fetched(record):
            yield _not_fetched(key, record.get("caption"), record)
        else:
            yield Row(key, record.get("caption"), None, f"img2dataset fetched it but {raw.name(shard)} lacks it")


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
            content = tar.extractfile(member)
            assert content is not None  # None only for members that are not regular files, skipped above
            files[extension.lower()] = content.read()
    if key is not None:
        yield key, files


def _folder_samples(raw: Folder, shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of each sample of a `files` shard folder, in key order: its files
    `{key}.{extension}`, one sample's read at a time."""
    from pyarrow import fs

    listing = raw.filesystem.get_file_info(fs.FileSelector(raw.path(shard)))
    names: dict[str, list[str]] = {}
    for info in sorted(listing, key=lambda info: info.base_name):
        if info.type == fs.FileType.File:
            stem, _, extension = info.base_name.partition(".")
            names.setdefault(stem, []).append(extension)
    for key, extensions in names.items():
        yield key, {ext.lower(): raw.read_bytes(f"{shard}/{key}.{ext}") for ext in extensions}
