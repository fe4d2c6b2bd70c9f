"""The captions of a raw split, checked line by line and spilled for the join with its images.

Two tables of the split's spill database hold what ingest keeps:
- `texts (line, text_id, text)`: one row per kept caption line (a captions CSV: per kept row);
- `refs (line, pos, image_id)`: the images each kept line names, `pos` its place in the line's list.
What a line alone shows to be wrong is quarantined as it streams past; a text_id already seen on an
earlier line is found by a query over the whole split afterwards, so no set of ids is held in memory.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from zhclip.components.core.errors import ZhclipError
from zhclip.components.core.storage import Folder
from zhclip.components.data.quarantine import TEXTS, Quarantine
from zhclip.components.data.spill import Spill

CSV_COLUMNS = ("text_id", "text", "image")


def lines(
    raw: Folder, name: str, quarantine: Quarantine, phase: int = TEXTS, desc: str | None = None
) -> Iterator[tuple[int, str]]:
    """(line number, text) of the non-blank lines of a UTF-8 file; undecodable lines are quarantined
    (among the entries of `phase`, by line)."""
    from zhclip.components.core.progress import progress_bar

    with raw.open(name) as handle:
        for number, data in enumerate(
            progress_bar(handle, desc=desc, unit="lines", leave=False, disable=desc is None), 1
        ):
            try:
                line = data.decode("utf-8")
            except UnicodeDecodeError as err:
                quarantine.add(raw.name(name), number, f"not UTF-8 ({err})", data.decode("utf-8", "replace"), phase)
                continue
            if line.strip():
                yield number, line


def int64(value: object) -> bool:
    """An integer the Parquet schema's int64 columns hold (a JSON true is 1, as Python has it)."""
    return isinstance(value, int) and -(2**63) <= value < 2**63


def _unicode(text: str) -> bool:
    """Whether `text` encodes as UTF-8: JSON can spell lone surrogates, which are no characters."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def caption_tables(spill: Spill):
    """The `texts` and `refs` tables, empty."""
    texts = spill.table("texts", line=pa.int64(), text_id=pa.int64(), text=pa.string())
    refs = spill.table("refs", line=pa.int64(), pos=pa.int32(), image_id=pa.int64())
    return texts, refs


def caption_error(text: object) -> str | None:
    """Why a caption cannot be kept, or None."""
    if not isinstance(text, str) or not text.strip():
        return "empty or non-string text"
    if not _unicode(text):
        return "text holds a lone surrogate (\\ud800-\\udfff), not a character"
    return None


def _record_error(record: Any) -> str | None:
    """Why a parsed texts-file record cannot be kept, or None."""
    image_ids, text_id = record["image_ids"], record["text_id"]
    problem = caption_error(record["text"])
    if problem:
        return problem
    if not isinstance(image_ids, list) or not image_ids or not all(int64(i) for i in image_ids):
        return "image_ids must be a non-empty list of integers (64-bit)"
    if not int64(text_id):
        return f"text_id {text_id} does not fit in 64 bits"
    return None


def parse_texts(raw: Folder, name: str, quarantine: Quarantine, spill: Spill) -> None:
    """A Chinese-CLIP texts jsonl into `texts` and `refs`, quarantining malformed lines and every
    line whose text_id an earlier kept line has."""
    texts, refs = caption_tables(spill)
    source = raw.name(name)
    for number, line in lines(raw, name, quarantine):
        try:
            record = json.loads(line)
            record = {"text_id": int(record["text_id"]), "text": record["text"], "image_ids": record["image_ids"]}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, OverflowError) as err:
            quarantine.add(source, number, f"not a text record with text_id, text, image_ids ({err!r})", line)
            continue
        problem = _record_error(record)
        if problem:
            quarantine.add(source, number, problem, line)
            continue
        texts.add(number, record["text_id"], record["text"].strip())
        for pos, image_id in enumerate(record["image_ids"]):
            refs.add(number, pos, int(image_id))  # a JSON true is image 1, as Python has it
    texts.flush()
    refs.flush()
    _drop_later_text_ids(raw, name, quarantine, spill, texts.rows)


def _drop_later_text_ids(raw: Folder, name: str, quarantine: Quarantine, spill: Spill, rows: int) -> None:
    """Quarantine each kept line whose text_id an earlier kept line has (`rows` lines are kept), found in
    passes by text_id. Their raw lines are read again from the file (a second pass over the small texts
    file, no copy of every line kept)."""
    spill.sql("CREATE TABLE repeated (line BIGINT, text_id BIGINT)")
    for _ in spill.in_passes(spill.passes(rows)):
        spill.sql(
            """INSERT INTO repeated SELECT line, text_id FROM (
                 SELECT line, text_id, row_number() OVER (PARTITION BY text_id ORDER BY line) AS nth
                 FROM texts WHERE in_pass(text_id)
               ) WHERE nth > 1"""
        )
    if not spill.scalar("SELECT count(*) FROM repeated"):
        return
    repeated = spill.rows("SELECT line, text_id FROM repeated ORDER BY line")
    wanted = next(repeated, None)
    with raw.open(name) as handle:
        for number, data in enumerate(handle, 1):
            if wanted is None:
                break
            if number == wanted["line"]:
                line = data.decode("utf-8")
                quarantine.add(raw.name(name), number, f"duplicate text_id {wanted['text_id']}", line)
                wanted = next(repeated, None)
    spill.sql("DELETE FROM refs WHERE line IN (SELECT line FROM repeated)")
    spill.sql("DELETE FROM texts WHERE line IN (SELECT line FROM repeated)")


def parse_csv(raw: Folder, name: str, quarantine: Quarantine, spill: Spill) -> None:
    """A captions CSV into `texts` and `refs`, with image ids numbered in the order the images first
    appear, and `csv_images (image_id, first_line, image)`; bad rows are quarantined, and so is a row
    whose text_id an earlier kept row has with another caption."""
    rows = spill.table(
        "csv_rows", line=pa.int64(), text_id=pa.int64(), text=pa.string(), image=pa.string(), record=pa.string()
    )
    source = raw.name(name)
    for number, row, record in _csv_rows(raw, name, quarantine):
        try:
            text_id = int(row["text_id"])
        except (TypeError, ValueError):
            quarantine.add(source, number, f"text_id {row['text_id']!r} is not an integer", record)
            continue
        if not int64(text_id):
            quarantine.add(source, number, f"text_id {text_id} does not fit in 64 bits", record)
            continue
        text, image = (row["text"] or "").strip(), (row["image"] or "").strip()
        if not text:
            quarantine.add(source, number, "empty or non-string text", record)
        elif not image:
            quarantine.add(source, number, "empty image path", record)
        else:
            rows.add(number, text_id, text, image, record[:200])
    rows.flush()
    spill.sql(
        """CREATE TABLE conflicting AS SELECT r.line, r.text_id, r.record FROM csv_rows r
           JOIN (SELECT DISTINCT ON (text_id) text_id, text FROM csv_rows ORDER BY text_id, line) first
             ON first.text_id = r.text_id AND first.text <> r.text"""
    )
    for row in spill.rows("SELECT line, text_id, record FROM conflicting ORDER BY line"):
        quarantine.add(source, row["line"], f"duplicate text_id {row['text_id']} with another caption", row["record"])
    spill.sql("DELETE FROM csv_rows WHERE line IN (SELECT line FROM conflicting)")
    spill.sql(
        """CREATE TABLE csv_images AS SELECT image, first_line, row_number() OVER (ORDER BY first_line) AS image_id
           FROM (SELECT image, min(line) AS first_line FROM csv_rows GROUP BY image)"""
    )
    spill.sql("CREATE TABLE texts AS SELECT line, text_id, text FROM csv_rows")
    spill.sql(
        """CREATE TABLE refs AS SELECT r.line, 0::INTEGER AS pos, i.image_id
           FROM csv_rows r JOIN csv_images i USING (image)"""
    )
    spill.sql("DROP TABLE csv_rows")


def _csv_rows(raw: Folder, name: str, quarantine: Quarantine) -> Iterator[tuple[int, dict, str]]:
    """(line, row, the row as JSON) of a captions CSV's UTF-8 rows; the others are quarantined."""
    source = raw.name(name)
    # Bytes that are not UTF-8 become lone surrogates (surrogateescape), so such a row is quarantined
    # by itself instead of stopping the whole file.
    with io.TextIOWrapper(raw.open(name), encoding="utf-8", errors="surrogateescape", newline="") as handle:
        reader = csv.DictReader(handle)
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
            yield number, row, json.dumps(row, ensure_ascii=False)
