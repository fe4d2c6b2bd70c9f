"""Demo data, ingest and the validation gate, on real files."""

import base64
import io
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from zhclip.components.core.errors import ZhclipError
from zhclip.components.data import validate as validate_module
from zhclip.components.data.ingest import IngestConfig, ingest
from zhclip.components.data.schema import PAIR_SCHEMA
from zhclip.components.data.shards import read_pairs
from zhclip.components.data.spill import spill_database
from zhclip.components.data.validate import ValidateConfig, flagged_rows, validate
from zhclip.components.demo.data import SHAPES, DemoDataConfig, generate_demo_data

from conftest import BIN, run_tool

pytestmark = pytest.mark.usefixtures("shared_ray")  # its in-process steps join one Ray


def _lines(path):
    return path.read_text(encoding="utf-8").splitlines()


def test_demo_data_is_deterministic_and_in_chinese_clip_format(tmp_path):
    config = DemoDataConfig(
        train_images=12,
        valid_images=4,
        test_images=30,
        captions_per_image=3,
        train_digits=0,
        valid_digits=0,
        test_digits=0,
    )
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
    assert all(
        set(t["image_ids"]) <= set(images) and any("\u4e00" <= ch <= "\u9fff" for ch in t["text"]) for t in texts
    )
    # 30 images over 96 attribute combinations: some captions must have several positive images.
    assert any(len(t["image_ids"]) > 1 for t in texts)
    train = [json.loads(line) for line in _lines(tmp_path / "a" / "train_texts.jsonl")]
    assert all(len(t["image_ids"]) == 1 for t in train)


def test_demo_data_includes_real_digit_scans_and_zero_shot_sets(tmp_path):
    from sklearn.datasets import load_digits

    summary = generate_demo_data(
        tmp_path,
        DemoDataConfig(
            train_images=4,
            valid_images=2,
            test_images=2,
            train_digits=20,
            valid_digits=5,
            test_digits=30,
            zeroshot_per_class=3,
        ),
    )
    assert summary["splits"]["test"]["images"] == 32 and summary["zeroshot"]["digits"] == {"classes": 10, "images": 30}
    texts = [json.loads(line) for line in _lines(tmp_path / "test_texts.jsonl")]
    digit_texts = [t for t in texts if "数字" in t["text"] or "手写" in t["text"]]
    assert digit_texts and any(len(t["image_ids"]) > 1 for t in digit_texts)
    # ELEVATER's layout, as Chinese-CLIP distributes its zero-shot sets: line i of label_cn.txt names test/<i>/
    for name, classes in (("digits", ["零", "一", "二", "三", "四", "五", "六", "七", "八", "九"]), ("shapes", SHAPES)):
        folder = tmp_path / "zeroshot" / name
        assert (folder / "label_cn.txt").read_text(encoding="utf-8").splitlines() == classes
        counts = [len(list((folder / "test" / str(i)).iterdir())) for i in range(len(classes))]
        assert counts == [3] * len(classes), name
    # The zero-shot "七" images are real scans of a 7, upscaled from scikit-learn's 8x8 data.
    seven = np.asarray(
        Image.open(tmp_path / "zeroshot" / "digits" / "test" / "7" / "000.png")
        .convert("L")
        .resize((8, 8), Image.Resampling.BOX)
    )
    sevens = load_digits().images[load_digits().target == 7] * (255 / 16)
    assert min(np.abs(s - seven).mean() for s in sevens) < 20
    # No picture appears twice across the splits and the benchmark's second retrieval set.
    tsvs = [tmp_path / f"{split}_imgs.tsv" for split in ("train", "valid", "test")]
    blobs = [
        line.split("\t")[1]
        for tsv in [*tsvs, tmp_path / "benchmark" / "unseen" / "test_imgs.tsv"]
        for line in _lines(tsv)
    ]
    assert len(blobs) == len(set(blobs)) and summary["benchmark"]["unseen"]["images"] == 60 + 20


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
        "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in text_records),
        encoding="utf-8",
    )


def _png_b64(colour="red", urlsafe=True):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(buffer.getvalue()).decode()


def _encoded(image, fmt="PNG"):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("workers, passes", [(1, "one"), (2, "one"), (1, "several")])
def test_ingest_quarantines_each_kind_of_bad_row_with_its_reason(tmp_path, workers, passes, request):
    if passes == "several":  # the same rows kept and quarantined
        request.getfixturevalue("seven_passes")
    raw = tmp_path / "raw"
    jpeg = _encoded(Image.new("RGB", (64, 64), "green"), "JPEG")
    huge = _encoded(Image.new("RGB", (8000, 5000), "white"))  # 40 megapixels
    good = [f"1\t{_png_b64()}", f"2\t{_png_b64('blue', urlsafe=False)}", f"5\t{base64.b64encode(jpeg).decode()}"]
    bad = {  # line number in the tsv -> (line, expected reason)
        4: ("3\tnot-base64!!", "image does not decode"),
        5: (f"4\t{base64.b64encode(b'plain text, not an image').decode()}", "image does not decode"),
        6: ("no tab here", "expected 'image_id<TAB>base64 image'"),
        7: (f"1\t{_png_b64()}", "duplicate image_id 1"),
        8: (f"6\t{base64.b64encode(jpeg[: len(jpeg) // 2]).decode()}", "image does not decode"),
        9: (f"7\t{base64.b64encode(huge).decode()}", "40.0 megapixels, above max_image_pixels 25.0"),
    }
    texts = [
        {"text_id": 1, "text": "红色方块", "image_ids": [1]},
        {"text_id": 2, "text": "蓝色方块", "image_ids": [2, 9]},
        {"text_id": 8, "text": "绿色照片", "image_ids": [5]},
        "{broken json",
        {"text_id": 3, "text": " \t ", "image_ids": [1]},
        {"text_id": 4, "text": "绿色", "image_ids": ["x"]},
        {"text_id": 1, "text": "重复的编号", "image_ids": [2]},
        {"text_id": 10, "image_ids": [2]},
    ]
    for split in ("train", "valid", "test"):
        _write_split(raw, split, good + [line for line, _ in bad.values()], texts)
    with open(raw / "test_texts.jsonl", "ab") as texts_file:
        texts_file.write(b'{"text_id": 5, "text": "\xff\xfe", "image_ids": [1]}\n')
    summary = ingest(raw, tmp_path / "out", IngestConfig(workers=workers, batch_lines=3))
    assert summary["splits"]["test"]["pairs"] == 3
    pairs = read_pairs(tmp_path / "out", "test")
    assert set(zip(pairs.text_id, pairs.image_id)) == {(1, 1), (2, 2), (8, 5)}
    quarantined = [json.loads(line) for line in _lines(tmp_path / "out" / "quarantine" / "test.jsonl")]
    images_file = {q["line"]: q["reason"] for q in quarantined if q["file"].endswith("test_imgs.tsv")}
    assert images_file.keys() == bad.keys()
    for line, reason in images_file.items():
        assert bad[line][1] in reason, (line, reason)
    text_reasons = [q["reason"] for q in quarantined if q["file"].endswith("test_texts.jsonl")]
    expected = {
        "not a text record": 2,
        "empty or non-string text": 1,
        "list of integers": 1,
        "duplicate text_id 1": 1,
        "not UTF-8": 1,
        "image_id 9 is referenced": 1,
    }
    for fragment, count in expected.items():
        assert sum(fragment in reason for reason in text_reasons) == count, (fragment, text_reasons)
    assert len(quarantined) == summary["splits"]["test"]["quarantined"] == len(bad) + sum(expected.values())
    assert summary["splits"]["test"]["texts"] == 3


def test_parallel_ingest_writes_the_same_shards_as_serial(raw_dir, tmp_path):
    ingest(raw_dir, tmp_path / "serial", IngestConfig(workers=1, shard_rows=50))
    ingest(raw_dir, tmp_path / "parallel", IngestConfig(workers=2, shard_rows=50, batch_lines=7))
    for split in ("train", "test"):
        assert read_pairs(tmp_path / "serial", split).equals(read_pairs(tmp_path / "parallel", split))


def test_ingest_in_several_passes_writes_the_same_shards_and_summary_as_in_one(raw_dir, tmp_path, request):
    one = ingest(raw_dir, tmp_path / "one", IngestConfig(workers=1, shard_rows=50))
    request.getfixturevalue("seven_passes")
    several = ingest(raw_dir, tmp_path / "several", IngestConfig(workers=1, shard_rows=50))
    assert several["splits"] == one["splits"]
    for split in ("train", "valid", "test"):
        assert read_pairs(tmp_path / "one", split).equals(read_pairs(tmp_path / "several", split))


@pytest.mark.parametrize("passes", ["one", "several"])
def test_every_later_line_of_a_repeated_text_id_is_quarantined(tmp_path, passes, request):
    if passes == "several":  # the repeated ids fall in different passes
        request.getfixturevalue("seven_passes")
    images = [f"{i}\t{_png_b64()}" for i in range(1, 4)]
    texts = [{"text_id": 1 + n % 10, "text": f"第{n}行", "image_ids": [1 + n % 3]} for n in range(25)]
    for split in ("train", "valid", "test"):
        _write_split(tmp_path / "raw", split, images, texts)
    summary = ingest(tmp_path / "raw", tmp_path / "out", IngestConfig(workers=1))
    quarantined = [json.loads(line) for line in _lines(tmp_path / "out" / "quarantine" / "train.jsonl")]
    assert {q["line"]: q["reason"] for q in quarantined} == {
        n + 1: f"duplicate text_id {1 + n % 10}" for n in range(10, 25)
    }
    pairs = read_pairs(tmp_path / "out", "train").sort_values("text_id")
    assert list(pairs.text) == [f"第{n}行" for n in range(10)]
    assert summary["splits"]["train"]["quarantined"] == 15


def test_an_empty_split_file_is_named(tmp_path):
    _write_split(tmp_path, "train", [], [{"text_id": 1, "text": "红色", "image_ids": [1]}])
    for split in ("valid", "test"):
        _write_split(tmp_path, split, [f"1\t{_png_b64()}"], [{"text_id": 1, "text": "红色", "image_ids": [1]}])
    with pytest.raises(ZhclipError, match="train: no usable .* train_imgs.tsv is empty"):
        ingest(tmp_path, tmp_path / "out", IngestConfig())


def test_ingest_names_a_missing_split_file(tmp_path):
    _write_split(tmp_path, "train", [f"1\t{_png_b64()}"], [{"text_id": 1, "text": "红色", "image_ids": [1]}])
    with pytest.raises(ZhclipError, match="valid_imgs.tsv not found"):
        ingest(tmp_path, tmp_path / "out", IngestConfig())


def test_validation_passes_good_data_and_reports_counts(prepared_dir, tmp_path):
    report = validate(
        prepared_dir,
        tmp_path / "validated",
        ValidateConfig(),
        tmp_path / "report.json",
        tmp_path / "q.jsonl",
        tmp_path / "docs",
    )
    assert report["success"]
    saved = json.loads((tmp_path / "report.json").read_text())
    test = saved["splits"]["test"]
    assert (
        test["rows_in"] == test["rows_out"] == len(read_pairs(prepared_dir, "test")) and test["rows_quarantined"] == 0
    )
    assert test["checked"] == 17 and test["failed"] == 0
    assert read_pairs(tmp_path / "validated", "test").equals(read_pairs(prepared_dir, "test"))
    assert (tmp_path / "q.jsonl").read_text() == ""
    assert (tmp_path / "docs" / "index.html").is_file()


def test_data_docs_index_lists_the_newest_results_and_every_result_has_its_page(prepared_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(validate_module, "DOCS_INDEX_RESULTS", 3)
    report = validate(
        prepared_dir, tmp_path / "validated", ValidateConfig(rows_per_check=400), None, tmp_path / "q.jsonl", tmp_path
    )
    results = sum(-(-split["rows_in"] // 400) + 1 for split in report["splits"].values())  # + the split's size
    assert len(list((tmp_path / "validations").rglob("*.html"))) == results > 3
    assert len(re.findall(r"validations/[^\"']+\.html", (tmp_path / "index.html").read_text())) == 3


def _faulty_dataset(folder):
    """Prepared-data faults no ingest check catches, each in a known row of the test split."""
    images = {
        i: _encoded(Image.new("RGB", (16, 16), colour))
        for i, colour in enumerate(["red", "blue", "green", "white", "black"], 1)
    }
    good_image = images[1]
    tiny = _encoded(Image.new("RGB", (4, 4), "purple"))  # below min_image_side
    strip = _encoded(Image.new("RGB", (200, 10), "purple"))  # aspect 20
    train = [(1, "红色的方块", 1, images[1])]
    test = [
        (10, "蓝色的方块", 2, images[2]),  # good
        (11, "绿色的方块", 3, images[3]),  # good
        (12, "a photo of a cat", 4, images[4]),  # mostly not Chinese
        (13, "黑", 5, images[5]),  # too short
        (14, "红色的方块再次出现", 6, good_image),  # the train image, leaked into test
        (15, "很小的紫色图片", 7, tiny),  # too small
        (16, "细长的紫色图片", 8, strip),  # aspect ratio
        (10, "蓝色的方块", 2, images[2]),  # exact duplicate pair of the first row
    ]
    valid = [(2, "黄色的圆形", 20, _encoded(Image.new("RGB", (16, 16), "yellow"))), *train]
    for split, rows in (("train", train), ("valid", valid), ("test", test)):
        (folder / split).mkdir(parents=True)
        table = pa.Table.from_pylist(
            [dict(zip(["text_id", "text", "image_id", "image"], r)) for r in rows], schema=PAIR_SCHEMA
        )
        pq.write_table(table, folder / split / "part-00000.parquet")
    return {12: "chinese_ratio", 13: "text_chars", 14: "leaked_from_train", 15: "image_width", 16: "image_aspect"}


@pytest.mark.parametrize("passes", ["one", "several"])
def test_validation_catches_each_fault_exactly_and_quarantines_below_the_threshold(tmp_path, passes, request):
    if passes == "several":
        request.getfixturevalue("seven_passes")
    faults = _faulty_dataset(tmp_path / "prepared")
    config = ValidateConfig(max_bad_fraction=0.75)
    report = validate(tmp_path / "prepared", tmp_path / "validated", config, tmp_path / "r.json", tmp_path / "q.jsonl")
    rows = [json.loads(line) for line in _lines(tmp_path / "q.jsonl")]
    test_rows = [r for r in rows if r["split"] == "test"]
    # valid repeats train's row: leakage there too, and nothing else.
    assert [(r["split"], r["text_id"]) for r in rows if r["split"] != "test"] == [("valid", 1)]
    by_id = {}
    for row in test_rows:
        by_id.setdefault(row["text_id"], []).append(" ".join(row["reasons"]))
    assert by_id.pop(10) == ["expect_column_values_to_be_in_set(duplicate_pair)"]
    assert {text_id: reasons[0] for text_id, reasons in by_id.items()}.keys() == faults.keys()
    for text_id, column in faults.items():
        assert f"({column})" in by_id[text_id][0], (text_id, by_id[text_id])
    kept = read_pairs(tmp_path / "validated", "test")
    assert sorted(kept.text_id) == [10, 11]
    test = report["splits"]["test"]
    assert test["rows_in"] == test["rows_out"] + test["rows_quarantined"] == 8


def test_a_profile_whose_folder_looks_like_a_glob_pattern_is_read_as_named(tmp_path):
    def profile(folder, duplicated_rows):
        folder.mkdir()
        rows = 3 + duplicated_rows
        table = pa.table(
            {"row": range(rows), "text_id": [1] * rows, "text_hash": ["t"] * rows}
            | {"image_id": [1] * rows, "image_hash": ["i"] * rows}
        )
        pq.write_table(table, folder / "test.parquet")
        return folder / "test.parquet"

    named, decoy = profile(tmp_path / "p[1]", 0), profile(tmp_path / "p1", 5)  # the pattern p[1] matches p1
    with spill_database(128, str(tmp_path)) as spill:
        flagged = list(flagged_rows(spill, named, None))
    assert [row["row"] for row in flagged] == [1, 2] and decoy.exists()  # the named file's duplicates only


def test_validation_gate_fails_above_the_threshold_naming_expectations_and_ids(tmp_path):
    _faulty_dataset(tmp_path / "prepared")
    with pytest.raises(ZhclipError) as failure:
        validate(
            tmp_path / "prepared", tmp_path / "validated", ValidateConfig(), tmp_path / "r.json", tmp_path / "q.jsonl"
        )
    message = str(failure.value)
    assert "max_bad_fraction 0.0" in message
    assert (
        'test: expect_column_values_to_be_between(chinese_ratio) failed: 1 rows, e.g. [{"text_id": 12, "image_id": 4}]'
        in message
    )
    assert "leaked_from_train" in message and str(tmp_path / "q.jsonl") in message
    assert len(_lines(tmp_path / "q.jsonl")) == 7  # six test rows and the leaked valid row
    assert json.loads((tmp_path / "r.json").read_text())["success"] is False


@pytest.mark.slow
def test_ingest_memory_does_not_grow_with_the_data(tmp_path):
    """6 and then 60 images of 7.5 megapixels (0.14 and 1.35 GB decoded), decoded by Ray tasks: the
    peak memory of ingest's whole process tree (Ray's processes included) grows by far less than the data."""
    from bench.data_scale import measured

    blob = base64.b64encode(_encoded(Image.new("RGB", (3000, 2500), "orange"))).decode()
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump({"ingest": {"workers": 2, "batch_lines": 4, "max_image_side": 256, "shard_rows": 16}})
    )
    peaks = {}
    for count in (6, 60):
        images = [f"{i}\t{blob}" for i in range(1, count + 1)]
        texts = [{"text_id": i, "text": f"第{i}张橙色图片", "image_ids": [i]} for i in range(1, count + 1)]
        raw = tmp_path / f"raw{count}"
        for split in ("train", "valid", "test"):
            _write_split(
                raw, split, images if split == "train" else images[:2], texts if split == "train" else texts[:2]
            )
        peaks[count] = measured(
            [str(BIN / "zhclip"), "ingest", "--raw", raw.name, "--out", f"out{count}"],
            tmp_path / f"ingest{count}.log",
            tmp_path,
        )["peak_pss_mb"]
        assert len(read_pairs(tmp_path / f"out{count}", "train")) == count
    extra_decoded_mb = 54 * 3000 * 2500 * 3 / 2**20
    assert peaks[60] - peaks[6] < 0.1 * extra_decoded_mb, peaks


def test_captions_csv_with_an_image_folder(tmp_path):
    raw = tmp_path / "raw"
    (raw / "images").mkdir(parents=True)
    Image.new("RGB", (20, 20), "red").save(raw / "images" / "red.png")
    Image.new("RGB", (20, 20), "blue").save(raw / "images" / "blue.jpg")
    (raw / "images" / "broken.png").write_bytes(b"not an image")
    rows = [
        "text_id,text,image",
        "1,红色方块,images/red.png",
        "1,红色方块,images/blue.jpg",
        "2,蓝色方块,images/blue.jpg",
        "3,   ,images/red.png",
        "x,坏编号,images/red.png",
        "4,缺失的图片,images/missing.png",
        "5,坏图片,images/broken.png",
    ]
    for split in ("train", "valid", "test"):
        (raw / f"{split}.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    summary = ingest(raw, tmp_path / "out", IngestConfig(workers=1))
    pairs = read_pairs(tmp_path / "out", "test")
    assert sorted(zip(pairs.text_id, pairs.text)) == [(1, "红色方块"), (1, "红色方块"), (2, "蓝色方块")]
    assert pairs.groupby("text_id").image_id.nunique()[1] == 2  # one caption, two positive images
    reasons = {
        q["line"]: q["reason"]
        for q in map(json.loads, _lines(tmp_path / "out" / "quarantine" / "test.jsonl"))
        if q["line"]
    }
    assert "empty or non-string text" in reasons[5] and "not an integer" in reasons[6]
    assert "cannot be read" in reasons[7] and "missing.png" in reasons[7] and "does not decode" in reasons[8]
    assert summary["splits"]["test"]["quarantined"] == 6  # the four rows above and their two unusable images' texts
    assert (summary["splits"]["test"]["texts"], summary["splits"]["test"]["images"]) == (2, 2)  # text 1 once
    (raw / "test.csv").write_text("text_id,caption,image\n1,红色,images/red.png\n", encoding="utf-8")
    with pytest.raises(ZhclipError, match=r"test.csv: missing column\(s\) \['text'\]"):
        ingest(raw, tmp_path / "again", IngestConfig(workers=1))


def test_dvc_hash_equals_what_dvc_records(tmp_path):
    """zhclip.components.core.lineage.dvc_hash reproduces DVC's folder hash, checked with DVC itself."""
    from zhclip.components.core.lineage import dvc_hash

    data = tmp_path / "repo" / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_text("一二三\n", encoding="utf-8")
    (data / "sub" / "b.bin").write_bytes(bytes(range(256)))
    run_tool("git", "init", "-q", cwd=tmp_path / "repo")
    run_tool("dvc", "init", "-q", cwd=tmp_path / "repo")
    run_tool("dvc", "add", "-q", "data", cwd=tmp_path / "repo")
    recorded = yaml.safe_load((tmp_path / "repo" / "data.dvc").read_text())["outs"][0]["md5"]
    assert dvc_hash(data) == recorded
    assert dvc_hash(data / "a.txt") != dvc_hash(data / "sub" / "b.bin")
