"""Generated bad input for ingest's parsers (Hypothesis): random bytes, broken UTF-8, huge fields,
wrong types, base64 of things that are not images. Ingest never crashes, and every line it reads is
kept or quarantined, never lost. The example count follows the Hypothesis profile (tests/conftest.py:
`ci`, or `nightly` with ZHCLIP_HYPOTHESIS_PROFILE=nightly)."""

import base64
import io
import json
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from zhclip.components.core.errors import ZhclipError
from zhclip.components.core.storage import Folder
from zhclip.components.data.captions import parse_csv, parse_texts
from zhclip.components.data.decode import decode_line
from zhclip.components.data.ingest import IngestConfig, ingest
from zhclip.components.data.quarantine import Quarantine
from zhclip.components.data.spill import spill_database

from conftest import fewer_examples


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = base64.b64encode(_png()).decode()
integers = st.one_of(st.integers(), st.integers(min_value=-(2**80), max_value=2**80), st.booleans())
json_values = st.recursive(
    st.none() | st.booleans() | integers | st.floats(allow_nan=True) | st.text(max_size=50),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=10,
)
text_records = st.fixed_dictionaries(
    {},
    optional={
        "text_id": json_values | integers,
        "text": json_values | st.text(max_size=300) | st.text(min_size=1000, max_size=3000),
        "image_ids": json_values | st.lists(integers, max_size=4),
    },
)
# a line: a record as JSON, raw random bytes (often not UTF-8), or a lone surrogate written as \\ud800
text_lines = st.one_of(
    text_records.map(lambda record: json.dumps(record).encode()),
    text_records.map(lambda record: json.dumps(record, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    st.binary(max_size=200),
    st.just(b'{"text_id": 1, "text": "\\ud800", "image_ids": [1]}'),
)
image_lines = st.one_of(
    st.tuples(integers.map(str) | st.text(max_size=20), st.just(PNG)).map(lambda p: f"{p[0]}\t{p[1]}"),
    st.tuples(integers.map(str), st.binary(max_size=300).map(lambda b: base64.b64encode(b).decode())).map(
        lambda p: f"{p[0]}\t{p[1]}"
    ),
    st.text(max_size=300),
)


@pytest.fixture(scope="module")
def spill():
    """One spill database for every example, cleared before each (opening one takes longer than an example)."""
    with spill_database(128) as database:
        yield database


def _lines_file(folder: Path, name: str, lines: list[bytes]) -> Folder:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(b"\n".join(line.replace(b"\n", b" ").replace(b"\r", b" ") for line in lines) + b"\n")
    return Folder(folder)


def _read_lines(path: Path) -> int:
    """Lines ingest reads: every line that is not UTF-8, and the UTF-8 ones that are not blank."""
    count = 0
    for line in path.read_bytes().split(b"\n"):
        try:
            count += bool(line.decode("utf-8").strip())
        except UnicodeDecodeError:
            count += 1
    return count


@settings(max_examples=fewer_examples(4))  # a file and a spill each: 20 ms an example, 2000 took 39 s
@given(lines=st.lists(text_lines, max_size=12))
@example(lines=[b'{"text_id": 99999999999999999999999, "text": "a", "image_ids": [1]}'])
@example(lines=[b'{"text_id": 1, "text": "a", "image_ids": [99999999999999999999999]}'])
@example(lines=[b'{"text_id": 1, "text": "\\ud800", "image_ids": [1]}'])
def test_texts_parser_keeps_or_quarantines_every_line(tmp_path_factory, spill, lines):
    folder = tmp_path_factory.mktemp("texts")
    raw = _lines_file(folder, "t.jsonl", lines)
    spill.clear()
    quarantine = Quarantine(folder / "q.jsonl", spill)
    parse_texts(raw, "t.jsonl", quarantine, spill)
    quarantine.close()
    kept = spill.scalar("SELECT count(*) FROM texts")
    assert kept == spill.scalar("SELECT count(DISTINCT text_id) FROM texts")  # one line per text_id kept
    assert kept + quarantine.count == _read_lines(folder / "t.jsonl")


@settings(max_examples=fewer_examples(1))
@given(line=image_lines)
@example(line=f"99999999999999999999999\t{PNG}")
@example(line=f"1\t{base64.b64encode(b'GIF89a not really').decode()}")
def test_image_line_decoder_returns_an_image_or_a_reason(line):
    image_id, blob, problem = decode_line(line, IngestConfig(), Folder("."))
    assert (blob is None) != (problem is None)
    assert problem is None or isinstance(problem, str) and problem
    if blob is not None:
        assert isinstance(image_id, int) and -(2**63) <= image_id < 2**63


csv_cells = st.one_of(st.text(max_size=40), integers.map(str), st.just(""), st.text(min_size=2000, max_size=4000))


@settings(max_examples=fewer_examples(4))  # a file and a spill each: 30 ms an example, 2000 took 58 s
@given(rows=st.lists(st.tuples(csv_cells, csv_cells, csv_cells), max_size=10), garbage=st.binary(max_size=100))
@example(rows=[("1", "红色", "a.png")], garbage=b"\n2,\x80\xff,b.png\n")
@example(rows=[("9223372036854775808", "红色", "a.png")], garbage=b"")
@example(rows=[("1", "", "a.png")], garbage=b"\n2,,b.png,\xff\n")  # an extra cell that is not UTF-8
def test_captions_csv_parser_keeps_or_quarantines_every_row(tmp_path_factory, spill, rows, garbage):
    import csv

    folder = tmp_path_factory.mktemp("csv")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["text_id", "text", "image"])
    writer.writerows(rows)
    (folder / "c.csv").write_bytes(buffer.getvalue().encode("utf-8", "surrogatepass") + garbage)
    spill.clear()
    quarantine = Quarantine(folder / "q.jsonl", spill)
    parse_csv(Folder(folder), "c.csv", quarantine, spill)  # rows that are not UTF-8 included
    quarantine.close()
    references = spill.scalar("SELECT count(*) FROM refs")
    images = spill.scalar("SELECT count(*) FROM csv_images")
    assert images == spill.scalar("SELECT count(DISTINCT image_id) FROM refs")
    with open(folder / "c.csv", encoding="utf-8", errors="surrogateescape", newline="") as handle:
        data_rows = sum(1 for _ in csv.DictReader(handle))
    assert references + quarantine.count == data_rows  # each row: one (text, image) entry or quarantined


@settings(max_examples=fewer_examples(20))
@given(texts=st.lists(text_lines, max_size=6), images=st.lists(image_lines, max_size=6))
def test_a_split_of_bad_lines_is_ingested_or_refused_and_every_image_line_accounted(tmp_path_factory, texts, images):
    raw = tmp_path_factory.mktemp("raw")
    good_text = json.dumps({"text_id": 1, "text": "一个红色的圆形", "image_ids": [1]}).encode()
    _lines_file(raw, "train_texts.jsonl", [good_text, *texts])
    _lines_file(
        raw, "train_imgs.tsv", [f"1\t{PNG}".encode(), *(line.encode("utf-8", "surrogatepass") for line in images)]
    )
    for split in ("valid", "test"):
        _lines_file(raw, f"{split}_texts.jsonl", [good_text])
        _lines_file(raw, f"{split}_imgs.tsv", [f"1\t{PNG}".encode()])
    out = tmp_path_factory.mktemp("prepared")
    try:
        summary = ingest(raw, out, IngestConfig(workers=1))["splits"]["train"]
    except ZhclipError as err:  # only for a split left without one usable pair; said so
        assert "no usable (text, image) pairs" in str(err)
        return
    # JSON lines split on "\n" only: a record may hold other line breaks (U+2028, \x1c...)
    lines = (out / "quarantine" / "train.jsonl").read_text().split("\n") if summary["quarantined"] else []
    quarantined = [json.loads(line) for line in lines if line]
    from_images = sum(entry["file"].endswith("train_imgs.tsv") for entry in quarantined)
    assert summary["images"] + summary["unreferenced_images"] + from_images == _read_lines(raw / "train_imgs.tsv")
    assert summary["quarantined"] == len(quarantined)
