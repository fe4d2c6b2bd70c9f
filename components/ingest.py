"""Ingest: raw splits -> Parquet shards of (text, image) pairs, bad rows quarantined.

Two raw formats, chosen per split by the files present:
- Chinese-CLIP: `{split}_imgs.tsv` (`image_id<TAB>base64 image`) + `{split}_texts.jsonl`;
- captions CSV: `{split}.csv` with columns `text_id`, `text`, `image` (an image file path relative to
  the raw folder), one row per (text, image) pair; image ids follow the order of first appearance.

Streaming: texts (small) are indexed first, then image lines are read in batches of `batch_lines`,
decoded and re-encoded by `workers` processes, and each image's pairs are written as soon as it is
done. Memory is bounded by the text index, one batch of raw lines and their re-encoded images, one
decoded image per worker (images above `max_image_pixels` are rejected before decoding), and one
shard of `shard_rows` pairs, whatever the size of the split.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from components.common import ZhclipError, timed, write_summary

SPLITS = ("train", "valid", "test")
PAIR_SCHEMA = pa.schema(
    [("text_id", pa.int64()), ("text", pa.string()), ("image_id", pa.int64()), ("image", pa.binary())]
)


@dataclass
class IngestConfig:
    shard_rows: int = 2000
    row_group_rows: int = 256  # the unit training, validation and evaluation read at once (bounds their memory)
    max_image_side: int = 0  # 0 keeps the original size
    image_format: str = "PNG"
    max_image_pixels: int = 25_000_000  # larger images are quarantined without being decoded
    workers: int = 0  # decoding processes; 0 = one per CPU core
    batch_lines: int = 256  # image lines in flight at once

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

    def add(self, source: Path, line: int, reason: str, record: str) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "w", encoding="utf-8")
        entry = {"file": str(source), "line": line, "reason": reason, "record": record[:200]}
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


def decode_base64(text: str) -> bytes:
    """Accept both the urlsafe base64 Chinese-CLIP writes and standard base64."""
    return base64.b64decode(text.strip().translate(str.maketrans("-_", "+/")), validate=True)


def _reencode(blob: bytes, config: IngestConfig) -> bytes:
    image = Image.open(io.BytesIO(blob))  # reads the header only
    pixels = image.width * image.height
    if pixels > config.max_image_pixels:
        raise _Rejected(f"image is {image.width}x{image.height} = {pixels / 1e6:.1f} megapixels, "
                        f"above max_image_pixels {config.max_image_pixels / 1e6:.1f} (raise it in params.yaml ingest)")
    image = image.convert("RGB")
    if config.max_image_side and max(image.size) > config.max_image_side:
        image.thumbnail((config.max_image_side, config.max_image_side))
    buffer = io.BytesIO()
    image.save(buffer, format=config.image_format.upper(), **({"quality": 95} if config.image_format.upper() == "JPEG" else {}))
    return buffer.getvalue()


def _lines(path: Path, quarantine: _Quarantine, desc: str | None = None) -> Iterator[tuple[int, str]]:
    """(line number, text) of the non-blank lines of a UTF-8 file; undecodable lines are quarantined."""
    with open(path, "rb") as raw:
        for number, data in enumerate(tqdm(raw, desc=desc, unit=" lines", leave=False, disable=desc is None), 1):
            try:
                line = data.decode("utf-8")
            except UnicodeDecodeError as err:
                quarantine.add(path, number, f"not UTF-8 ({err})", data.decode("utf-8", "replace"))
                continue
            if line.strip():
                yield number, line


class _Rejected(Exception):
    """An image that decodes but breaks a configured bound."""


def _decode_line(line: str, config: IngestConfig) -> tuple[int | None, bytes | None, str | None]:
    """One `image_id<TAB>base64` line -> (image_id, re-encoded image, None), or a reason in place of
    the image. Runs in the worker processes, so it returns rather than raises."""
    try:
        id_field, b64 = line.rstrip("\n").split("\t")
        image_id = int(id_field)
    except ValueError as err:
        return None, None, f"expected 'image_id<TAB>base64 image' ({err})"
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


def _decode_file_line(line: str, config: IngestConfig) -> tuple[int | None, bytes | None, str | None]:
    """`image_id<TAB>path` (built from a captions CSV) -> the same result as `_decode_line`."""
    id_field, path = line.split("\t", 1)
    try:
        blob = Path(path).read_bytes()
    except OSError as err:
        return int(id_field), None, f"image file cannot be read ({err.strerror}: {path})"
    return _reencoded(int(id_field), blob, config)


def _decoded(lines: Iterator[tuple[int, str]], config: IngestConfig, decode=_decode_line) -> Iterator[tuple[int, str, tuple]]:
    """(line number, line, decode result) in input order, `batch_lines` lines at a time."""
    workers = config.workers or os.cpu_count() or 1
    batches = iter(lambda: list(itertools.islice(lines, config.batch_lines)), [])
    if workers == 1:
        for batch in batches:
            yield from ((number, line, decode(line, config)) for number, line in batch)
        return
    with ProcessPoolExecutor(workers) as pool:
        for batch in batches:
            results = pool.map(partial(decode, config=config), [line for _, line in batch],
                               chunksize=max(1, len(batch) // (4 * workers)))
            yield from ((number, line, result) for (number, line), result in zip(batch, results))


def _index_texts(path: Path, quarantine: _Quarantine) -> dict[int, list[tuple[int, str]]]:
    """image_id -> [(text_id, text)] from a texts jsonl, quarantining malformed lines."""
    by_image: dict[int, list[tuple[int, str]]] = {}
    seen: set[int] = set()
    for number, line in _lines(path, quarantine):
        try:
            record = json.loads(line)
            text_id, text, image_ids = int(record["text_id"]), record["text"], record["image_ids"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            quarantine.add(path, number, f"not a text record with text_id, text, image_ids ({err!r})", line)
            continue
        if not isinstance(text, str) or not text.strip():
            quarantine.add(path, number, "empty or non-string text", line)
        elif not isinstance(image_ids, list) or not image_ids or not all(isinstance(i, int) for i in image_ids):
            quarantine.add(path, number, "image_ids must be a non-empty list of integers", line)
        elif text_id in seen:
            quarantine.add(path, number, f"duplicate text_id {text_id}", line)
        else:
            seen.add(text_id)
            for image_id in image_ids:
                by_image.setdefault(image_id, []).append((text_id, text.strip()))
    return by_image


CSV_COLUMNS = ("text_id", "text", "image")


def _index_csv(path: Path, raw_dir: Path, quarantine: _Quarantine) -> tuple[dict, list[tuple[int, str]]]:
    """Texts by image id and `image_id<TAB>path` lines from a captions CSV, quarantining bad rows."""
    import csv

    by_image: dict[int, list[tuple[int, str]]] = {}
    ids: dict[str, int] = {}
    first_row: dict[int, int] = {}
    text_of: dict[int, str] = {}
    with open(path, encoding="utf-8", newline="") as rows:
        reader = csv.DictReader(rows)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ZhclipError(f"{path}: missing column(s) {missing}; a captions CSV needs {list(CSV_COLUMNS)}"
                              + (" (the file is empty)" if not reader.fieldnames else ""))
        for number, row in enumerate(reader, 2):
            record = json.dumps(row, ensure_ascii=False)
            try:
                text_id = int(row["text_id"])
            except (TypeError, ValueError):
                quarantine.add(path, number, f"text_id {row['text_id']!r} is not an integer", record)
                continue
            text, image = (row["text"] or "").strip(), (row["image"] or "").strip()
            if not text:
                quarantine.add(path, number, "empty or non-string text", record)
            elif not image:
                quarantine.add(path, number, "empty image path", record)
            elif text_of.setdefault(text_id, text) != text:
                quarantine.add(path, number, f"duplicate text_id {text_id} with another caption", record)
            else:
                image_id = ids.setdefault(image, len(ids) + 1)
                first_row.setdefault(image_id, number)
                by_image.setdefault(image_id, []).append((text_id, text))
    return by_image, [(first_row[image_id], f"{image_id}\t{raw_dir / image}") for image, image_id in ids.items()]


def _sources(raw_dir: Path, split: str, quarantine: _Quarantine):
    """(texts by image id, numbered image lines, decoder, images file, texts file) for whichever format the split uses."""
    images_path, texts_path, csv_path = raw_dir / f"{split}_imgs.tsv", raw_dir / f"{split}_texts.jsonl", raw_dir / f"{split}.csv"
    if csv_path.is_file() and not images_path.exists():
        by_image, lines = _index_csv(csv_path, raw_dir, quarantine)
        return by_image, iter(lines), _decode_file_line, csv_path, csv_path
    for path in (images_path, texts_path):
        if not path.is_file():
            raise ZhclipError(f"{path} not found: a split needs {split}_imgs.tsv and {split}_texts.jsonl, or {split}.csv")
    by_image = _index_texts(texts_path, quarantine)
    return by_image, _lines(images_path, quarantine, desc=f"ingest {split}"), _decode_line, images_path, texts_path


def _ingest_split(raw_dir: Path, out_dir: Path, split: str, config: IngestConfig) -> dict:
    quarantine = _Quarantine(out_dir / "quarantine" / f"{split}.jsonl")
    by_image, lines, decode, images_path, texts_path = _sources(raw_dir, split, quarantine)
    writer = _ShardWriter(out_dir / split, config.shard_rows, config.row_group_rows)
    found: set[int] = set()
    for number, line, (image_id, blob, problem) in _decoded(lines, config, decode):
        if problem:
            quarantine.add(images_path, number, problem, line)
            continue
        if image_id in found:
            quarantine.add(images_path, number, f"duplicate image_id {image_id}", line)
            continue
        found.add(image_id)
        for text_id, text in by_image.get(image_id, []):
            writer.add({"text_id": text_id, "text": text, "image_id": image_id, "image": blob})
    writer.flush()
    missing = sorted(set(by_image) - found)
    for image_id in missing:
        quarantine.add(texts_path, 0, f"image_id {image_id} is referenced by texts but has no usable image in {images_path.name}",
                       json.dumps(by_image[image_id], ensure_ascii=False))
    quarantine.close()
    if writer.total == 0:
        empty = [path.name for path in (images_path, texts_path) if path.stat().st_size == 0]
        raise ZhclipError(f"{split}: no usable (text, image) pairs" + (f"; {', '.join(empty)} is empty" if empty else "")
                          + (f"; see {quarantine.path} for the rejected rows" if quarantine.count else ""))
    return {"pairs": writer.total, "images": len(found & set(by_image)), "unreferenced_images": len(found - set(by_image)),
            "texts": len({t for image_id in found for t, _ in by_image.get(image_id, [])}),
            "quarantined": quarantine.count, "shards": writer.shards}


def ingest(raw_dir: str | Path, out_dir: str | Path, config: IngestConfig, summary_path: str | Path | None = None) -> dict:
    """Ingest every split under `raw_dir` into `out_dir/{split}/part-*.parquet`; returns the summary."""
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    if not raw_dir.is_dir():
        raise ZhclipError(f"raw data folder {raw_dir} not found; generate it with `zhclip demo-data` or point --raw at yours")
    summary: dict = {"out_dir": str(out_dir)}
    with timed(summary):
        summary["splits"] = {split: _ingest_split(raw_dir, out_dir, split, config) for split in SPLITS}
    images = sum(s["images"] + s["unreferenced_images"] for s in summary["splits"].values())
    summary["images_per_s"] = round(images / max(summary["duration_s"], 1e-9), 1)
    if summary_path:
        write_summary(summary_path, summary)
    return summary
