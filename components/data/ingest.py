"""Ingest: raw splits -> Parquet shards of (text, image) pairs, bad rows quarantined.

Two raw formats, chosen per split by the files present:
- Chinese-CLIP: `{split}_imgs.tsv` (`image_id<TAB>base64 image`) + `{split}_texts.jsonl`;
- captions CSV: `{split}.csv` with columns `text_id`, `text`, `image` (an image file path relative to
  the raw folder), one row per (text, image) pair; image ids follow the order of first appearance.

The raw folder may be local or an s3:// prefix (MinIO). Streaming: texts (small) are indexed first,
then image lines are read in batches of `batch_lines`, decoded and re-encoded by Ray tasks (on any
CPU of the cluster at $RAY_ADDRESS, or of a local Ray with `workers` CPUs; `workers: 1` decodes in
this process), and each image's pairs are written as soon as it is done. Memory is bounded by the
text index, two batches of raw lines and their re-encoded images per CPU in flight, one decoded
image per task (images above `max_image_pixels` are rejected before decoding), and one shard of
`shard_rows` pairs, whatever the size of the split.
"""

from __future__ import annotations

import io
import itertools
import json
from array import array
from collections import deque
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from zhclip.components.core.cluster import ordered_map, ray_runtime
from zhclip.components.core.errors import ZhclipError
from zhclip.components.core.memory import release_freed_memory
from zhclip.components.core.settings import setting
from zhclip.components.core.storage import Folder
from zhclip.components.core.summaries import timed, write_summary
from zhclip.components.data.schema import PAIR_SCHEMA, SPLITS, decode_base64


@dataclass
class IngestConfig:
    """Section `ingest`: how raw splits become Parquet shards of pairs."""

    shard_rows: int = setting(2000, "pairs per Parquet shard")
    row_group_rows: int = setting(
        256, "the unit training, validation and evaluation read at once (bounds their memory)"
    )
    max_image_side: int = setting(0, "0 keeps the original size")
    image_format: str = setting("PNG", "PNG (lossless) or JPEG (quality 95)")
    max_image_pixels: int = setting(25_000_000, "larger images are quarantined without being decoded")
    workers: int = setting(
        0, "CPUs of the local Ray that decodes (0: every core; 1: no Ray); a cluster at $RAY_ADDRESS uses all of its"
    )
    batch_lines: int = setting(256, "image lines in flight at once")

    def __post_init__(self):
        for name in ("shard_rows", "row_group_rows", "max_image_pixels", "batch_lines"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.image_format.upper() not in ("PNG", "JPEG"):
            raise ValueError(f"image_format must be PNG or JPEG, got {self.image_format!r}")


class _Quarantine:
    """Rejected rows with their reason, one JSON line each: nothing is dropped silently."""

    def __init__(self, path: Path):
        self.path = path
        self.count = 0
        self._file = None

    def add(self, source: str, line: int, reason: str, record: str) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # a record with bytes that were not UTF-8 (lone surrogates) is written escaped, never lost
            self._file = open(self.path, "w", encoding="utf-8", errors="backslashreplace")
        entry = {"file": source, "line": line, "reason": reason, "record": record[:200]}
        self._file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self.count += 1

    def close(self) -> None:
        if self._file:
            self._file.close()


class _ShardWriter:
    def __init__(self, out_dir: Path, shard_rows: int, row_group_rows: int):
        self.out_dir, self.shard_rows, self.row_group_rows = out_dir, shard_rows, row_group_rows
        self.rows: list[dict] = []
        self.shards = 0
        self.total = 0

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist(self.rows, schema=PAIR_SCHEMA)
        pq.write_table(table, self.out_dir / f"part-{self.shards:05d}.parquet", row_group_size=self.row_group_rows)
        self.shards += 1
        self.total += len(self.rows)
        self.rows = []


def _reencode(blob: bytes, config: IngestConfig) -> bytes:
    image = Image.open(io.BytesIO(blob))  # reads the header only
    pixels = image.width * image.height
    if pixels > config.max_image_pixels:
        raise _Rejected(
            f"image is {image.width}x{image.height} = {pixels / 1e6:.1f} megapixels, "
            f"above max_image_pixels {config.max_image_pixels / 1e6:.1f} (raise it in params.yaml ingest)"
        )
    image = image.convert("RGB")
    if config.max_image_side and max(image.size) > config.max_image_side:
        image.thumbnail((config.max_image_side, config.max_image_side))
    buffer = io.BytesIO()
    image.save(
        buffer, format=config.image_format.upper(), **({"quality": 95} if config.image_format.upper() == "JPEG" else {})
    )
    return buffer.getvalue()


def _lines(raw: Folder, name: str, quarantine: _Quarantine, desc: str | None = None) -> Iterator[tuple[int, str]]:
    """(line number, text) of the non-blank lines of a UTF-8 file; undecodable lines are quarantined."""
    with raw.open(name) as lines:
        for number, data in enumerate(tqdm(lines, desc=desc, unit=" lines", leave=False, disable=desc is None), 1):
            try:
                line = data.decode("utf-8")
            except UnicodeDecodeError as err:
                quarantine.add(raw.name(name), number, f"not UTF-8 ({err})", data.decode("utf-8", "replace"))
                continue
            if line.strip():
                yield number, line


def _int64(value: object) -> bool:
    """An integer the Parquet schema's int64 columns hold (a JSON true is 1, as Python has it)."""
    return isinstance(value, int) and -(2**63) <= value < 2**63


def _unicode(text: str) -> bool:
    """Whether `text` encodes as UTF-8: JSON can spell lone surrogates, which are no characters."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _Rejected(Exception):
    """An image that decodes but breaks a configured bound."""


def _decode_line(line: str, config: IngestConfig, raw: Folder) -> tuple[int | None, bytes | None, str | None]:
    """One `image_id<TAB>base64` line -> (image_id, re-encoded image, None), or a reason in place of
    the image. Runs in Ray tasks, so it returns rather than raises."""
    try:
        id_field, b64 = line.rstrip("\n").split("\t")
        image_id = int(id_field)
    except ValueError as err:
        return None, None, f"expected 'image_id<TAB>base64 image' ({err})"
    if not _int64(image_id):
        return None, None, f"image_id {id_field} does not fit in 64 bits"
    try:
        blob = decode_base64(b64)
    except ValueError as err:
        return image_id, None, f"image does not decode ({err})"
    return _reencoded(image_id, blob, config)


def _reencoded(image_id: int, blob: bytes, config: IngestConfig) -> tuple[int, bytes | None, str | None]:
    try:
        return image_id, _reencode(blob, config), None
    except _Rejected as err:
        return image_id, None, f"image rejected: {err}"
    except (ValueError, OSError, Image.DecompressionBombError) as err:
        return image_id, None, f"image does not decode ({err})"


def _decode_file_line(line: str, config: IngestConfig, raw: Folder) -> tuple[int | None, bytes | None, str | None]:
    """`image_id<TAB>path` (built from a captions CSV, the path relative to the raw folder) -> the same result
    as `_decode_line`."""
    id_field, path = line.split("\t", 1)
    try:
        blob = raw.read_bytes(path)
    except OSError as err:
        return int(id_field), None, f"image file cannot be read ({err}: {raw.name(path)})"
    return _reencoded(int(id_field), blob, config)


def _decode_batch(lines: list[str], config: IngestConfig, raw: Folder, decode) -> list[tuple]:
    return [decode(line, config, raw) for line in lines]


def _decoded(
    lines: Iterator[tuple[int, str]], config: IngestConfig, raw: Folder, decode
) -> Iterator[tuple[int, str, tuple]]:
    """(line number, line, decode result) in input order, `batch_lines` lines per Ray task (in this process
    for `workers: 1`)."""
    batches = iter(lambda: list(itertools.islice(lines, config.batch_lines)), [])
    if config.workers == 1:
        for batch in batches:
            decoded = _decode_batch([line for _, line in batch], config, raw, decode)
            yield from ((number, line, result) for (number, line), result in zip(batch, decoded))
        return
    in_flight: deque[list[tuple[int, str]]] = deque()  # the batches whose results ordered_map has yet to yield

    def calls() -> Iterator[tuple]:
        for batch in batches:
            in_flight.append(batch)
            yield [line for _, line in batch], config, raw, decode

    for decoded in ordered_map(_decode_batch, calls()):
        yield from ((number, line, result) for (number, line), result in zip(in_flight.popleft(), decoded))


class _IdSet:
    """A set of int64 ids in about 8 bytes each (a Python set takes about 60): a sorted array, plus
    a small Python set of recent additions merged into it once it grows past an eighth of the array."""

    def __init__(self):
        self._sorted = np.zeros(0, dtype=np.int64)
        self._recent: set[int] = set()

    def __contains__(self, value: int) -> bool:
        if value in self._recent:
            return True
        at = int(np.searchsorted(self._sorted, value))
        return at < len(self._sorted) and self._sorted[at] == value

    def add(self, value: int) -> None:
        self._recent.add(value)
        if len(self._recent) > max(4096, len(self._sorted) // 8):
            self._sorted = np.union1d(self._sorted, np.fromiter(self._recent, dtype=np.int64, count=len(self._recent)))
            self._recent = set()


class _TextIndex:
    """The captions of a split by image id, in flat arrays (about 40 bytes plus the caption's UTF-8
    per (text, image) reference) rather than Python objects (several hundred), since a split's texts
    are held while its images stream past. (Arrow arrays built chunk by chunk would hold the same
    bytes, but its allocator kept twice as much again resident.)"""

    def __init__(self):
        self._image_ids, self._text_ids = array("q"), array("q")
        self._utf8, self._ends = bytearray(), array("q")  # caption i: _utf8[_ends[i - 1]:_ends[i]]

    def add(self, image_id: int, text_id: int, text: str) -> None:
        self._image_ids.append(image_id)
        self._text_ids.append(text_id)
        self._utf8 += text.encode("utf-8")
        self._ends.append(len(self._utf8))

    def freeze(self) -> _TextIndex:
        """Sort by image id (captions of one image keep their file order) for lookups."""
        image_ids = np.frombuffer(self._image_ids, dtype=np.int64)
        self.order = np.argsort(image_ids, kind="stable")  # the captions stay in file order: no copy of them
        self.image_ids, self.text_ids = image_ids[self.order], np.frombuffer(self._text_ids, dtype=np.int64)[self.order]
        del image_ids, self._image_ids, self._text_ids
        self.images = np.unique(self.image_ids)  # every referenced image id, sorted
        self.found = np.zeros(len(self.images), dtype=bool)
        release_freed_memory()  # what parsing the texts left behind, before the images stream
        return self

    def position(self, image_id: int) -> int | None:
        """The referenced image's place in `images`, None for an image no text references."""
        at = int(np.searchsorted(self.images, image_id))
        return at if at < len(self.images) and self.images[at] == image_id else None

    def captions(self, image_id: int) -> list[tuple[int, str]]:
        start, end = np.searchsorted(self.image_ids, [image_id, image_id + 1])
        return [
            (text_id, self._utf8[self._ends[i - 1] if i else 0 : self._ends[i]].decode("utf-8"))
            for text_id, i in zip(self.text_ids[start:end].tolist(), self.order[start:end].tolist())
        ]

    def texts_of_found_images(self) -> int:
        return int(np.unique(self.text_ids[self.found[np.searchsorted(self.images, self.image_ids)]]).size)


def _index_texts(raw: Folder, name: str, quarantine: _Quarantine) -> _TextIndex:
    """The captions of a texts jsonl by image id, quarantining malformed lines."""
    index = _TextIndex()
    seen = _IdSet()
    source = raw.name(name)
    for number, line in _lines(raw, name, quarantine):
        try:
            record = json.loads(line)
            text_id, text, image_ids = int(record["text_id"]), record["text"], record["image_ids"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, OverflowError) as err:
            quarantine.add(source, number, f"not a text record with text_id, text, image_ids ({err!r})", line)
            continue
        if not isinstance(text, str) or not text.strip():
            quarantine.add(source, number, "empty or non-string text", line)
        elif not _unicode(text):
            quarantine.add(source, number, "text holds a lone surrogate (\\ud800-\\udfff), not a character", line)
        elif not isinstance(image_ids, list) or not image_ids or not all(_int64(i) for i in image_ids):
            quarantine.add(source, number, "image_ids must be a non-empty list of integers (64-bit)", line)
        elif not _int64(text_id):
            quarantine.add(source, number, f"text_id {text_id} does not fit in 64 bits", line)
        elif text_id in seen:
            quarantine.add(source, number, f"duplicate text_id {text_id}", line)
        else:
            seen.add(text_id)
            for image_id in image_ids:
                index.add(image_id, text_id, text.strip())
    return index.freeze()


CSV_COLUMNS = ("text_id", "text", "image")


def _index_csv(raw: Folder, name: str, quarantine: _Quarantine) -> tuple[_TextIndex, list[tuple[int, str]]]:
    """Captions by image id and `image_id<TAB>path` lines from a captions CSV, quarantining bad rows."""
    import csv
    import io

    index = _TextIndex()
    ids: dict[str, int] = {}
    first_row: dict[int, int] = {}
    text_of: dict[int, str] = {}
    source = raw.name(name)
    # Bytes that are not UTF-8 become lone surrogates (surrogateescape), so such a row is quarantined
    # by itself instead of stopping the whole file.
    with io.TextIOWrapper(raw.open(name), encoding="utf-8", errors="surrogateescape", newline="") as rows:
        reader = csv.DictReader(rows)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ZhclipError(
                f"{source}: missing column(s) {missing}; a captions CSV needs {list(CSV_COLUMNS)}"
                + (" (the file is empty)" if not reader.fieldnames else "")
            )
        for number, row in enumerate(reader, 2):
            cells = [*row, *row.values(), *(row.get(None) or [])]  # a row's extra cells sit under the key None
            if not all(_unicode(cell) for cell in cells if isinstance(cell, str)):
                quarantine.add(source, number, "not UTF-8", json.dumps(row))  # \u-escaped, writable
                continue
            record = json.dumps(row, ensure_ascii=False)
            try:
                text_id = int(row["text_id"])
            except (TypeError, ValueError):
                quarantine.add(source, number, f"text_id {row['text_id']!r} is not an integer", record)
                continue
            if not _int64(text_id):
                quarantine.add(source, number, f"text_id {text_id} does not fit in 64 bits", record)
                continue
            text, image = (row["text"] or "").strip(), (row["image"] or "").strip()
            if not text:
                quarantine.add(source, number, "empty or non-string text", record)
            elif not image:
                quarantine.add(source, number, "empty image path", record)
            elif text_of.setdefault(text_id, text) != text:
                quarantine.add(source, number, f"duplicate text_id {text_id} with another caption", record)
            else:
                image_id = ids.setdefault(image, len(ids) + 1)
                first_row.setdefault(image_id, number)
                index.add(image_id, text_id, text)
    return index.freeze(), [(first_row[image_id], f"{image_id}\t{image}") for image, image_id in ids.items()]


def _sources(raw: Folder, split: str, quarantine: _Quarantine):
    """(caption index, numbered image lines, decoder, images file, texts file) for whichever format the split uses."""
    from pyarrow import fs

    images_file, texts_file, csv_file = f"{split}_imgs.tsv", f"{split}_texts.jsonl", f"{split}.csv"
    if raw.kind(csv_file) == fs.FileType.File and raw.kind(images_file) == fs.FileType.NotFound:
        index, lines = _index_csv(raw, csv_file, quarantine)
        return index, iter(lines), _decode_file_line, csv_file, csv_file
    for name in (images_file, texts_file):
        if raw.kind(name) != fs.FileType.File:
            raise ZhclipError(
                f"{raw.name(name)} not found: a split needs {images_file} and {texts_file}, or {csv_file}"
            )
    return (
        _index_texts(raw, texts_file, quarantine),
        _lines(raw, images_file, quarantine, desc=f"ingest {split}"),
        _decode_line,
        images_file,
        texts_file,
    )


def _ingest_split(raw: Folder, out_dir: Path, split: str, config: IngestConfig) -> dict:
    quarantine = _Quarantine(out_dir / "quarantine" / f"{split}.jsonl")
    index, lines, decode, images_file, texts_file = _sources(raw, split, quarantine)
    writer = _ShardWriter(out_dir / split, config.shard_rows, config.row_group_rows)
    unreferenced: set[int] = set()  # images no text names (rare): kept only to catch their duplicates
    for number, line, (image_id, blob, problem) in _decoded(lines, config, raw, decode):
        if problem:
            quarantine.add(raw.name(images_file), number, problem, line)
            continue
        at = index.position(image_id)
        if index.found[at] if at is not None else image_id in unreferenced:
            quarantine.add(raw.name(images_file), number, f"duplicate image_id {image_id}", line)
            continue
        if at is None:
            unreferenced.add(image_id)
            continue
        index.found[at] = True
        for text_id, text in index.captions(image_id):
            writer.add({"text_id": text_id, "text": text, "image_id": image_id, "image": blob})
    writer.flush()
    for image_id in index.images[~index.found].tolist():
        quarantine.add(
            raw.name(texts_file),
            0,
            f"image_id {image_id} is referenced by texts but has no usable image in {images_file}",
            json.dumps(index.captions(image_id), ensure_ascii=False),
        )
    quarantine.close()
    if writer.total == 0:
        empty = [name for name in dict.fromkeys((images_file, texts_file)) if raw.size(name) == 0]
        raise ZhclipError(
            f"{split}: no usable (text, image) pairs"
            + (f"; {', '.join(empty)} is empty" if empty else "")
            + (f"; see {quarantine.path} for the rejected rows" if quarantine.count else "")
        )
    return {
        "pairs": writer.total,
        "images": int(index.found.sum()),
        "unreferenced_images": len(unreferenced),
        "texts": index.texts_of_found_images(),
        "quarantined": quarantine.count,
        "shards": writer.shards,
    }


def ingest(
    raw_dir: str | Path, out_dir: str | Path, config: IngestConfig, summary_path: str | Path | None = None
) -> dict:
    """Ingest every split under `raw_dir` (a folder or an s3:// prefix) into `out_dir/{split}/part-*.parquet`;
    returns the summary."""
    from pyarrow import fs

    raw, out_dir = Folder(raw_dir), Path(out_dir)
    if raw.kind() != fs.FileType.Directory:
        raise ZhclipError(
            f"raw data folder {raw_dir} not found; generate it with `zhclip demo-data` or point --raw at yours"
        )
    summary: dict = {"raw_dir": str(raw_dir), "out_dir": str(out_dir)}
    with timed(summary), ray_runtime(config.workers or None) if config.workers != 1 else nullcontext():
        summary["splits"] = {split: _ingest_split(raw, out_dir, split, config) for split in SPLITS}
    images = sum(s["images"] + s["unreferenced_images"] for s in summary["splits"].values())
    summary["images_per_s"] = round(images / max(summary["duration_s"], 1e-9), 1)
    if summary_path:
        write_summary(summary_path, summary)
    return summary
