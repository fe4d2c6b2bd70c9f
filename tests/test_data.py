"""Demo data, ingest and the validation gate, on real files."""

import base64
import io
import json

import pytest
from PIL import Image

from components.common import ZhclipError
from components.demo_data import DemoDataConfig, generate_demo_data
from components.ingest import IngestConfig, ingest, read_pairs
from components.validate import ValidateConfig, validate


def _lines(path):
    return path.read_text(encoding="utf-8").splitlines()


def test_demo_data_is_deterministic_and_in_chinese_clip_format(tmp_path):
    config = DemoDataConfig(train_images=12, valid_images=4, test_images=30, captions_per_image=3)
    generate_demo_data(tmp_path / "a", config)
    generate_demo_data(tmp_path / "b", config)
    for name in ("train_imgs.tsv", "test_texts.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    images = {}
    for line in _lines(tmp_path / "a" / "test_imgs.tsv"):
        image_id, b64 = line.split("\t")
        images[int(image_id)] = Image.open(io.BytesIO(base64.urlsafe_b64decode(b64)))
    assert len(images) == 30 and all(im.size == (64, 64) for im in images.values())
    texts = [json.loads(line) for line in _lines(tmp_path / "a" / "test_texts.jsonl")]
    assert len(texts) == 90
    assert all(set(t["image_ids"]) <= set(images) and any("\u4e00" <= ch <= "\u9fff" for ch in t["text"]) for t in texts)
    # 30 images over 96 attribute combinations: some captions must have several positive images.
    assert any(len(t["image_ids"]) > 1 for t in texts)
    train = [json.loads(line) for line in _lines(tmp_path / "a" / "train_texts.jsonl")]
    assert all(len(t["image_ids"]) == 1 for t in train)


def test_ingest_writes_one_row_per_text_image_pair(raw_dir, prepared_dir):
    texts = [json.loads(line) for line in _lines(raw_dir / "test_texts.jsonl")]
    pairs = read_pairs(prepared_dir, "test")
    assert len(pairs) == sum(len(t["image_ids"]) for t in texts)
    assert set(zip(pairs.text_id, pairs.image_id)) == {(t["text_id"], i) for t in texts for i in t["image_ids"]}
    assert Image.open(io.BytesIO(pairs.image.iloc[0])).mode == "RGB"
    assert len(list((prepared_dir / "train").glob("part-*.parquet"))) > 1  # sharded at 50 rows


def _write_split(folder, split, image_lines, text_records):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}_imgs.tsv").write_text("".join(line + "\n" for line in image_lines), encoding="utf-8")
    (folder / f"{split}_texts.jsonl").write_text(
        "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in text_records), encoding="utf-8")


def _png_b64(colour="red", urlsafe=True):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(buffer.getvalue()).decode()


def test_ingest_quarantines_bad_rows_with_reasons(tmp_path):
    raw = tmp_path / "raw"
    good = [f"1\t{_png_b64()}", f"2\t{_png_b64('blue', urlsafe=False)}"]
    bad = ["3\tnot-base64!!", f"4\t{base64.b64encode(b'plain text, not an image').decode()}", "no tab here", f"1\t{_png_b64()}"]
    texts = [{"text_id": 1, "text": "红色方块", "image_ids": [1]}, {"text_id": 2, "text": "蓝色方块", "image_ids": [2, 9]},
             "{broken json", {"text_id": 3, "text": "", "image_ids": [1]}, {"text_id": 4, "text": "绿色", "image_ids": ["x"]}]
    for split in ("train", "valid", "test"):
        _write_split(raw, split, good + bad, texts)
    with open(raw / "test_texts.jsonl", "ab") as texts_file:
        texts_file.write(b'{"text_id": 5, "text": "\xff\xfe", "image_ids": [1]}\n')
    summary = ingest(raw, tmp_path / "out", IngestConfig())
    assert summary["splits"]["test"]["pairs"] == 2
    quarantined = [json.loads(line) for line in _lines(tmp_path / "out" / "quarantine" / "test.jsonl")]
    reasons = [q["reason"] for q in quarantined]
    assert len(reasons) == 9 == summary["splits"]["test"]["quarantined"]
    expected = {"image does not decode": 2, "expected 'image_id<TAB>base64 image'": 1, "duplicate image_id 1": 1,
                "not a text record": 1, "empty or non-string text": 1, "list of integers": 1, "not UTF-8": 1,
                "image_id 9 is referenced": 1}
    for fragment, count in expected.items():
        assert sum(fragment in reason for reason in reasons) == count, (fragment, reasons)
    assert {q["line"] for q in quarantined if "does not decode" in q["reason"]} == {3, 4}


def test_ingest_names_a_missing_split_file(tmp_path):
    _write_split(tmp_path, "train", [f"1\t{_png_b64()}"], [{"text_id": 1, "text": "红色", "image_ids": [1]}])
    with pytest.raises(ZhclipError, match="valid_imgs.tsv not found"):
        ingest(tmp_path, tmp_path / "out", IngestConfig())


def test_validation_passes_good_data_and_reports_counts(prepared_dir, tmp_path):
    report = validate(prepared_dir, ValidateConfig(), tmp_path / "report.json")
    assert report["success"]
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["splits"]["test"]["rows"] == len(read_pairs(prepared_dir, "test"))
    assert saved["splits"]["test"]["evaluated"] == 8


def test_validation_gate_fails_naming_the_offending_rows(tmp_path):
    raw = tmp_path / "raw"
    long_text = "很长" * 150
    texts = [{"text_id": 1, "text": "红色方块", "image_ids": [1]}, {"text_id": 7, "text": long_text, "image_ids": [1]}]
    for split in ("train", "valid", "test"):
        _write_split(raw, split, [f"1\t{_png_b64()}"], texts)
    ingest(raw, tmp_path / "prepared", IngestConfig())
    quarantine = tmp_path / "q.jsonl"
    with pytest.raises(ZhclipError, match=r"expect_column_value_lengths_to_be_between.*\"text_id\": 7") as failure:
        validate(tmp_path / "prepared", ValidateConfig(max_text_chars=200), tmp_path / "report.json", quarantine)
    assert str(quarantine) in str(failure.value)
    rows = [json.loads(line) for line in _lines(quarantine)]
    assert {(r["split"], r["text_id"]) for r in rows} == {("train", 7), ("valid", 7), ("test", 7)}
    assert json.loads((tmp_path / "report.json").read_text())["success"] is False
