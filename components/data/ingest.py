"""Ingest: raw splits -> Parquet shards of (text, image) pairs, bad rows quarantined.

Three raw formats, chosen per split by the files present (a split with files of two is refused,
naming both):
- Chinese-CLIP: `{split}_imgs.tsv` (`image_id<TAB>base64 image`) + `{split}_texts.jsonl`;
- captions CSV: `{split}.csv` with columns `text_id`, `text`, `image` (an image file path relative to
  the raw folder), one row per (text, image) pair; image ids follow the order of first appearance;
- img2dataset's output: a folder `{split}/` of webdataset, Parquet or `files` shards (img2dataset.py),
  one pair per row it fetched, read a shard per Ray task.

The raw folder may be local or an s3:// prefix (MinIO). Streaming, with nothing per pair held in
Python (DuckDB's share is `spill_memory_mb`, whatever the split's rows: spill.py):
1. the captions are checked line by line and spilled to a DuckDB database (captions.py);
2. image lines are read in batches of `batch_lines` (img2dataset: a task per shard, which hands its
   rows back `batch_lines` at a time), decoded and re-encoded by Ray tasks (on any CPU of the cluster
   at $RAY_ADDRESS, or of a local Ray with `workers` CPUs; `workers: 1` decodes in this process); the
   images that decode are spilled in line order, their ids to the database;
3. one query joins captions to images out of core (within `spill_memory_mb`, in hash-partitioned
   passes: spill.py), and its result, in line order, is merged with the spilled images into shards
   of `shard_rows` pairs. An image_id a line repeats is quarantined; so is an image the texts name
   that no line supplied.
Memory: two batches of raw lines and their re-encoded images per CPU in flight (img2dataset: two
shard tasks per CPU, each holding up to three batches), one decoded image per task (images above
`max_image_pixels` are rejected before decoding), a row group of spilled images, one shard, and
DuckDB's `spill_memory_mb`. Disk: the spill holds the split's re-encoded images once,
until the split's shards are written (`spill_folder`).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from zhclip.components.core.cluster import ray_runtime
from zhclip.components.core.errors import ZhclipError
from zhclip.components.core.progress import progress_bar
from zhclip.components.core.settings import setting, shared
from zhclip.components.core.storage import Folder
from zhclip.components.core.summaries import timed, write_summary
from zhclip.components.data import img2dataset
from zhclip.components.data.captions import caption_error, caption_tables, int64, lines, parse_csv, parse_texts
from zhclip.components.data.decode import decode_file_line, decode_line, decoded_lines, decoded_shards
from zhclip.components.data.quarantine import IMAGES, MISSING, Quarantine
from zhclip.components.data.schema import PAIR_SCHEMA, SPLITS
from zhclip.components.data.shards import remove_shards
from zhclip.components.data.spill import Spill, SpillConfig, check_memory, read_parquet, spill_database


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
    batch_lines: int = setting(256, "image lines (img2dataset rows) a decoding task hands back at once")
    spill_memory_mb: int = shared(SpillConfig, "spill_memory_mb")  # the join of captions to images
    spill_folder: str = shared(SpillConfig, "spill_folder")

    def __post_init__(self):
        for name in ("shard_rows", "row_group_rows", "max_image_pixels", "batch_lines"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        check_memory(self.spill_memory_mb)
        if self.image_format.upper() not in ("PNG", "JPEG"):
            raise ValueError(f"image_format must be PNG or JPEG, got {self.image_format!r}")


class _ShardWriter:
    def __init__(self, out_dir: Path, shard_rows: int, row_group_rows: int):
        self.out_dir, self.shard_rows, self.row_group_rows = out_dir, shard_rows, row_group_rows
        self.rows: list[dict] = []
        self.shards = 0
        self.total = 0
        remove_shards(out_dir)

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


def _sources(raw: Folder, split: str, quarantine: Quarantine, spill: Spill):
    """(numbered image lines, decoder, images file, texts file) for a Chinese-CLIP or captions-CSV
    split, its captions spilled into `texts` and `refs` (captions.py)."""
    from pyarrow import fs

    images_file, texts_file, csv_file = f"{split}_imgs.tsv", f"{split}_texts.jsonl", f"{split}.csv"
    if raw.kind(csv_file) == fs.FileType.File:
        parse_csv(raw, csv_file, quarantine, spill)
        image_lines = (
            (row["first_line"], f"{row['image_id']}\t{row['image']}")
            for row in spill.rows("SELECT first_line, image_id, image FROM csv_images ORDER BY first_line")
        )
        return image_lines, decode_file_line, csv_file, csv_file
    for name in (images_file, texts_file):
        if raw.kind(name) != fs.FileType.File:
            raise ZhclipError(
                f"{raw.name(name)} not found: a split needs {images_file} and {texts_file}, {csv_file}, "
                f"or img2dataset's output in {split}/ (docs/own-data.md)"
            )
    parse_texts(raw, texts_file, quarantine, spill)
    image_lines = lines(raw, images_file, quarantine, IMAGES, desc=f"ingest {split}")
    return image_lines, decode_line, images_file, texts_file


class _DecodedImages:
    """The images that decoded, in line order: (line, image_id) in the spill database for the
    whole-split queries, and the re-encoded bytes in Parquet files beside it, read back once.

    A new file every `GROUPS_PER_FILE` row groups, without statistics: a Parquet footer lists every
    row group of its file, and the writer and the reader hold it whole: one file for 10M images in row
    groups of 256 had 2.7 KB of footer a group with statistics (the min and max image), 100 MB in all;
    445 bytes without (bench/investigations/2026-12-05-data-scale-memory/parquet_footer.py).
    """

    SCHEMA = pa.schema(
        [
            ("line", pa.int64()),
            ("image_id", pa.int64()),
            ("image", pa.binary()),
            ("record", pa.string()),
            ("file", pa.dictionary(pa.int32(), pa.string())),
            ("file_line", pa.int64()),
        ]
    )
    GROUPS_PER_FILE = 1024

    def __init__(self, spill: Spill, rows_per_group: int):
        self.ids = spill.table("decoded", line=pa.int64(), image_id=pa.int64())
        self.folder = spill.folder
        self.paths: list[Path] = []
        self._writer = None  # opened with the first image, and again every GROUPS_PER_FILE row groups
        self._groups = 0
        self._rows: list[dict] = []
        self.rows_per_group = rows_per_group

    def add(self, line: int, image_id: int, blob: bytes, record: str, file: str, file_line: int) -> None:
        """Image `image_id` of the split's `line`-th row, which is `file_line` of `file` (what the
        quarantine names if the image_id repeats)."""
        self.ids.add(line, image_id)
        self._rows.append(
            {
                "line": line,
                "image_id": image_id,
                "image": blob,
                "record": record[:200],
                "file": file,
                "file_line": file_line,
            }
        )
        if len(self._rows) >= self.rows_per_group:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        if self._writer is None:
            self.paths.append(self.folder / f"decoded-{len(self.paths):05d}.parquet")
            self._writer = pq.ParquetWriter(self.paths[-1], self.SCHEMA, write_statistics=False)
        self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self.SCHEMA))
        self._rows = []
        self._groups += 1
        if self._groups % self.GROUPS_PER_FILE == 0:
            self._close_file()

    def _close_file(self) -> None:
        if self._writer:
            self._writer.close()
            self._writer = None

    def close(self) -> None:
        self._flush()
        self._close_file()
        self.ids.flush()

    def __iter__(self) -> Iterator[dict]:
        # pre_buffer off: with it, pyarrow keeps every row group read so far (a 1.5 GiB file of 1M images
        # read through: 1616 MiB resident at the end, 63 MiB without;
        # bench/investigations/2026-12-05-data-scale-memory/parquet_pre_buffer.py)
        for path in self.paths:
            for batch in pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=self.rows_per_group):
                yield from batch.to_pylist()


# Each decoded image line with its captions, for the images of one pass (spill.py's `in_pass`): none
# for a line whose image_id an earlier line already supplied (nth > 1), none for an image no caption
# names. A line's image_id puts all its rows in one pass, so the passes merge by line.
_CAPTIONS_OF_DECODED = """
SELECT d.line, d.nth, t.text_id, t.text
FROM (
  SELECT line, image_id, row_number() OVER (PARTITION BY image_id ORDER BY line) AS nth
  FROM decoded WHERE in_pass(image_id)
) d
{captions}
ORDER BY d.line{then}
"""
# Captions from a texts file: every caption that names the image, in text-file order.
CAPTIONS_BY_LINE = _CAPTIONS_OF_DECODED.format(
    captions="""LEFT JOIN (SELECT * FROM refs WHERE in_pass(image_id)) r ON r.image_id = d.image_id AND d.nth = 1
LEFT JOIN texts t ON t.line = r.line""",
    then=", r.line, r.pos",
)
# Captions that come with their image (img2dataset): the caption of the image's own line.
INLINE_CAPTIONS_BY_LINE = _CAPTIONS_OF_DECODED.format(
    captions="LEFT JOIN texts t ON t.line = d.line AND d.nth = 1", then=""
)
# How many distinct text_ids the written pairs of one pass have (passes by text_id, summed). Counted
# over the shards as the first row of each text_id's window, not with count(DISTINCT), SELECT DISTINCT
# or a sort of the whole table: DuckDB's hash aggregate (over a join) and a window without PARTITION
# BY asked for more than spill_memory_mb as the rows grew, where a partitioned window spills; and
# over the shards, not the captions joined to the images again
# (bench/investigations/2026-12-05-data-scale-memory/duckdb_out_of_core.py).
TEXTS_OF_PAIRS = """
SELECT count(*) FROM (
  SELECT row_number() OVER (PARTITION BY text_id) AS nth FROM {shards} WHERE in_pass(text_id)
) WHERE nth = 1
"""
# Images of one pass that the texts name and no line supplied, with their captions (the first few:
# a record is cut at 200 characters anyway).
MISSING_IMAGES = """
SELECT image_id, text_id, text FROM (
  SELECT r.image_id, t.text_id, t.text, row_number() OVER (PARTITION BY r.image_id ORDER BY r.line, r.pos) AS nth
  FROM refs r JOIN texts t USING (line)
  WHERE in_pass(r.image_id) AND r.image_id NOT IN (SELECT image_id FROM decoded WHERE in_pass(image_id))
) WHERE nth <= 32
ORDER BY image_id, nth
"""


def distinct_texts(spill: Spill, shards: Path, pairs: int) -> int:
    """How many distinct text_ids the `pairs` pairs in the `part-*.parquet` shards of folder `shards` have."""
    query = TEXTS_OF_PAIRS.format(shards=read_parquet(shards, "part-*.parquet"))
    return sum(spill.scalar(query) for _ in spill.in_passes(spill.passes(pairs)))


def _ingest_split(raw: Folder, out_dir: Path, split: str, config: IngestConfig, spill: Spill) -> dict:
    found = img2dataset.shards(raw, split)
    one_format(raw, split, found)
    spill.clear()
    quarantine = Quarantine(out_dir / "quarantine" / f"{split}.jsonl", spill)
    decoded = _DecodedImages(spill, config.row_group_rows)
    if found:
        source = _read_img2dataset(raw, found, config, quarantine, decoded, spill)
    else:
        source = _read_lines(raw, split, config, quarantine, decoded, spill)
    decoded.close()
    writer = _ShardWriter(out_dir / split, config.shard_rows, config.row_group_rows)
    images, unreferenced = _write_pairs(decoded, spill, writer, quarantine, source.captions)
    _quarantine_missing_images(spill, quarantine, raw, source)
    quarantine.close()
    if writer.total == 0:
        empty = [name for name in dict.fromkeys(source.files) if raw.size(name) == 0]
        raise ZhclipError(
            f"{split}: no usable (text, image) pairs"
            + (f"; {', '.join(empty)} is empty" if empty else "")
            + (f"; see {quarantine.path} for the rejected rows" if quarantine.count else "")
        )
    return {
        "pairs": writer.total,
        "images": images,
        "unreferenced_images": unreferenced,
        "texts": distinct_texts(spill, writer.out_dir, writer.total),
        "quarantined": quarantine.count,
        "shards": writer.shards,
        **source.summary,
    }


def split_formats(raw: Folder, split: str, shards: tuple[str, list[str]] | None) -> dict[str, str]:
    """Each raw format the split has files of, with what names them (`docs/own-data.md`); `shards` is
    what `img2dataset.shards` found for it (listed once: on s3:// a listing is requests)."""
    from pyarrow import fs

    found = {}
    cnclip = [name for name in (f"{split}_imgs.tsv", f"{split}_texts.jsonl") if raw.kind(name) != fs.FileType.NotFound]
    if cnclip:
        found["Chinese-CLIP"] = " and ".join(raw.name(name) for name in cnclip)
    if raw.kind(f"{split}.csv") != fs.FileType.NotFound:
        found["captions CSV"] = raw.name(f"{split}.csv")
    if shards:
        found[f"img2dataset {shards[0]}"] = f"{raw.name(split)}/ ({len(shards[1])} shards)"
    return found


def one_format(raw: Folder, split: str, shards: tuple[str, list[str]] | None) -> dict[str, str]:
    """The split's format and its files (empty when it has none): a split is read from one format, and
    two side by side (the demo's files left beside a user's, say) are refused, never one picked silently."""
    found = split_formats(raw, split, shards)
    if len(found) > 1:
        named = "; ".join(f"{kind}: {files}" for kind, files in found.items())
        raise ZhclipError(
            f"{split}: the raw folder holds {len(found)} formats for this split ({named}); "
            "move out all but the one to ingest (docs/own-data.md)"
        )
    return found


@dataclass
class _Source:
    """What a split was read from: the files messages name, the query that gives each decoded image
    line its captions, and what the summary adds for this format."""

    images: str
    texts: str
    captions: str = CAPTIONS_BY_LINE
    summary: dict = field(default_factory=dict)

    @property
    def files(self) -> tuple[str, ...]:
        return (self.images, self.texts) if self.captions is CAPTIONS_BY_LINE else ()


def _read_lines(
    raw: Folder, split: str, config: IngestConfig, quarantine: Quarantine, decoded: _DecodedImages, spill: Spill
) -> _Source:
    """A Chinese-CLIP or captions-CSV split: captions spilled, then image lines decoded in Ray tasks."""
    image_lines, decode, images_file, texts_file = _sources(raw, split, quarantine, spill)
    for number, line, (image_id, blob, problem) in decoded_lines(image_lines, config, raw, decode):
        if problem:
            quarantine.add(raw.name(images_file), number, problem, line, IMAGES)
        else:
            decoded.add(number, image_id, blob, line, raw.name(images_file), number)
    return _Source(images_file, texts_file)


def _read_img2dataset(
    raw: Folder,
    found: tuple[str, list[str]],
    config: IngestConfig,
    quarantine: Quarantine,
    decoded: _DecodedImages,
    spill: Spill,
) -> _Source:
    """An img2dataset split, shard by shard in Ray tasks: each row img2dataset fetched, with a key,
    a caption and an image that decodes, is one pair; every other row is quarantined with its reason."""
    kind, shards = found
    split = shards[0].split("/", 1)[0]
    texts, refs = caption_tables(spill)
    number = failed = 0
    progress = progress_bar(total=len(shards), desc=f"ingest {split}", unit="shards", leave=False)
    for shard, rows in decoded_shards(raw, shards, kind, config):
        progress.update()
        for line, (key, caption, blob, problem, fetched) in enumerate(rows, 1):
            number += 1
            failed += not fetched
            record = json.dumps({"key": key, "caption": caption}, ensure_ascii=False, default=repr)
            reason = problem or _key_error(key) or caption_error(caption)
            if reason:
                quarantine.add(raw.name(shard), line, reason, record, IMAGES, number)
                continue
            decoded.add(number, int(key), blob, record, raw.name(shard), line)
            texts.add(number, int(key), caption.strip())
            refs.add(number, 0, int(key))
    progress.close()
    texts.flush()
    refs.flush()
    return _Source(split, split, INLINE_CAPTIONS_BY_LINE, {"format": f"img2dataset {kind}", "not_fetched": failed})


def _key_error(key: str) -> str | None:
    """Why an img2dataset key cannot be the pair's id (img2dataset's keys are numbers), or None."""
    if key.isascii() and key.isdigit() and int64(int(key)):
        return None
    return f"key {key!r} is not a non-negative 64-bit integer (img2dataset numbers its rows)"


def _write_pairs(
    decoded: _DecodedImages, spill: Spill, writer: _ShardWriter, quarantine: Quarantine, captions_query: str
) -> tuple[int, int]:
    """Each decoded image's pairs, in line order, merged from the spilled images and the captions
    query (both in line order); a repeated image_id is quarantined. Returns the number of images
    written (each image_id once) and of images no text names."""
    captions = spill.merged_passes(captions_query, decoded.ids.rows, key=itemgetter("line"))
    row = next(captions, None)
    written = unreferenced = 0
    for image in decoded:
        pairs = []
        while row is not None and row["line"] == image["line"]:
            pairs.append(row)
            row = next(captions, None)
        if pairs[0]["nth"] > 1:
            reason = f"duplicate image_id {image['image_id']}"
            quarantine.add(image["file"], image["file_line"], reason, image["record"], IMAGES, image["line"])
        elif pairs[0]["text_id"] is None:
            unreferenced += 1
        else:
            written += 1
            for pair in pairs:
                writer.add(
                    {
                        "text_id": pair["text_id"],
                        "text": pair["text"],
                        "image_id": image["image_id"],
                        "image": image["image"],
                    }
                )
    writer.flush()
    return written, unreferenced


def _quarantine_missing_images(spill: Spill, quarantine: Quarantine, raw: Folder, source: _Source) -> None:
    """Quarantine each image the captions name that no line supplied, with its captions."""
    refs = spill.scalar("SELECT count(*) FROM refs")
    missing = spill.merged_passes(MISSING_IMAGES, refs, key=itemgetter("image_id"))
    for image_id, group in itertools.groupby(missing, key=itemgetter("image_id")):
        quarantine.add(
            raw.name(source.texts),
            0,
            f"image_id {image_id} is referenced by texts but has no usable image in {source.images}",
            json.dumps([[row["text_id"], row["text"]] for row in group], ensure_ascii=False),
            MISSING,
            image_id,
        )


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
    with (
        timed(summary),
        ray_runtime(config.workers or None) if config.workers != 1 else nullcontext(),
        spill_database(config.spill_memory_mb, config.spill_folder) as spill,
    ):
        summary["splits"] = {split: _ingest_split(raw, out_dir, split, config, spill) for split in SPLITS}
    images = sum(s["images"] + s["unreferenced_images"] for s in summary["splits"].values())
    summary["images_per_s"] = round(images / max(summary["duration_s"], 1e-9), 1)
    if summary_path:
        write_summary(summary_path, summary)
    return summary
