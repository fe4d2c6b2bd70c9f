"""img2dataset's two layouts: read back row for row (every URL img2dataset tried is a row, the failed
ones with its reason, the fetched ones with their caption and image bytes, in its order), ingested in
Ray tasks with every row kept or quarantined, and run through `dvc repro` to a trained stage."""

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from zhclip.components.core.cluster import ordered_streams, ray_runtime
from zhclip.components.core.storage import Folder
from zhclip.components.data.img2dataset import read_shard, shards
from zhclip.components.data.ingest import IngestConfig, ingest

from conftest import copy_of, run_tool
from img2dataset_corpus import write_corpus


@pytest.mark.parametrize("layout", ["webdataset", "parquet"])
def test_every_row_img2dataset_tried_is_read_once_in_order(raw_dir, tmp_path, layout):
    counts = write_corpus(raw_dir, tmp_path, layout)
    raw = Folder(tmp_path)
    for split, expected in counts.items():
        kind, names = shards(raw, split)
        assert kind == layout and len(names) == -(-expected["rows"] // 64)
        rows = [row for name in names for row in read_shard(raw, name, kind)]
        assert len(rows) == expected["rows"]
        assert [row.key for row in rows] == sorted({row.key for row in rows})  # each once, in img2dataset's order
        failed = [row for row in rows if row.problem]
        assert len(failed) == expected["failed"]
        assert all("status failed_to_download: timed out" in row.problem and row.image is None for row in failed)
        fetched = [row for row in rows if not row.problem]
        assert [row.image for row in fetched[: expected["broken"]]] == [b"not an image"] * expected["broken"]
        assert all(isinstance(row.caption, str) and row.caption for row in fetched)


def test_a_folder_without_shards_is_not_img2dataset(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "notes.txt").write_text("x")
    assert shards(Folder(tmp_path), "train") is None
    assert shards(Folder(tmp_path), "valid") is None


@pytest.mark.parametrize("layout", ["webdataset", "parquet"])
def test_an_img2dataset_corpus_ingests_with_every_row_kept_or_quarantined(raw_dir, tmp_path, layout):
    counts = write_corpus(raw_dir, tmp_path / "raw", layout, rows_per_shard=20)
    config = IngestConfig(workers=2, shard_rows=50, batch_lines=7)  # a shard's 20 rows come back in 3 batches
    summary = ingest(tmp_path / "raw", tmp_path / "out", config)["splits"]
    for split, expected in counts.items():
        got = summary[split]
        assert got["format"] == f"img2dataset {layout}" and got["not_fetched"] == expected["failed"]
        assert got["pairs"] + got["quarantined"] == expected["rows"]
        quarantined = [json.loads(line) for line in (tmp_path / "out" / "quarantine" / f"{split}.jsonl").open()]
        reasons = [entry["reason"] for entry in quarantined]
        assert sum("did not fetch" in reason for reason in reasons) == expected["failed"]
        assert sum("image does not decode" in reason for reason in reasons) == expected["broken"]
        assert len(reasons) == expected["failed"] + expected["broken"]
        pairs = pq.read_table(tmp_path / "out" / split).to_pandas()
        assert len(pairs) == got["pairs"] and pairs.text_id.is_unique and (pairs.text_id == pairs.image_id).all()
        assert pairs.image_id.is_monotonic_increasing  # img2dataset's order, batches and shards joined in order


def test_a_shard_task_pauses_while_its_batches_wait_to_be_read(tmp_path):
    made = tmp_path / "made"
    made.mkdir()

    def _numbered(folder: str, items: int) -> Iterator[int]:  # nested: Ray's workers cannot import tests
        """Yields 0..items-1, leaving a file for each before yielding it (what the task has made so far)."""
        for item in range(items):
            (Path(folder) / str(item)).touch()
            yield item

    with ray_runtime(2):
        stream = next(ordered_streams(_numbered, [(str(made), 40)], unread_per_task=2))
        first = next(stream)
        time.sleep(3)  # time enough for the task to make all 40 if nothing held it back
        made_while_waiting = len(list(made.iterdir()))
        rest = list(stream)
    assert made_while_waiting <= 4  # the one read, two unread, one being made
    assert [first, *rest] == list(range(40))


@pytest.mark.parametrize("passes", ["one", "several"])
def test_a_key_img2dataset_wrote_twice_is_quarantined_once(raw_dir, tmp_path, passes, request):
    if passes == "several":
        request.getfixturevalue("seven_passes")
    write_corpus(raw_dir, tmp_path / "raw", "parquet", rows_per_shard=1000)
    shard = tmp_path / "raw" / "valid" / "00000.parquet"
    table = pq.read_table(shard)
    pq.write_table(pa.concat_tables([table, table.slice(3, 1)]), shard)  # row 4 again, at the end
    summary = ingest(tmp_path / "raw", tmp_path / "out", IngestConfig(workers=1))["splits"]["valid"]
    quarantined = [json.loads(line) for line in (tmp_path / "out" / "quarantine" / "valid.jsonl").open()]
    repeated = [entry for entry in quarantined if "duplicate image_id" in entry["reason"]]
    assert len(repeated) == 1 and repeated[0]["line"] == table.num_rows + 1
    assert summary["pairs"] + summary["quarantined"] == table.num_rows + 1


@pytest.mark.slow
def test_an_img2dataset_corpus_trains_through_dvc_repro(small_project, tmp_path):
    """webdataset shards for train, Parquet shards for valid and test, each with failed and broken rows."""
    project = copy_of(small_project, tmp_path)
    run_tool("dvc", "remove", "demo_data", cwd=project)
    raw = project / "data" / "raw"
    demo = tmp_path / "demo"
    shutil.move(raw, demo)
    layouts = {"train": "webdataset", "valid": "parquet", "test": "parquet"}
    counts = write_corpus(demo, raw, layouts, rows_per_shard=40)
    for folder in ("zeroshot", "pretrain"):  # what other stages read from the raw folder
        shutil.copytree(demo / folder, raw / folder)
    run_tool("dvc", "add", "data/raw", cwd=project)
    run_tool("dvc", "repro", "train@stage1", cwd=project)
    ingested = json.loads((project / "metrics" / "ingest.json").read_text())["splits"]
    validated = json.loads((project / "metrics" / "validate.json").read_text())["splits"]
    for split, expected in counts.items():
        assert ingested[split]["format"] == f"img2dataset {layouts[split]}"
        assert ingested[split]["pairs"] + ingested[split]["quarantined"] == expected["rows"]
        assert ingested[split]["not_fetched"] == expected["failed"]
        assert validated[split]["rows_in"] == ingested[split]["pairs"]
    trained = json.loads((project / "metrics" / "train_stage1.json").read_text())
    assert trained["steps"] > 0


def test_a_tar_sample_the_parquet_does_not_list_is_read_without_losing_step(raw_dir, tmp_path):
    """A fetched row missing from the Parquet beside its tar: every listed row still finds its sample,
    the unlisted sample is read in its place, nothing is read twice or reported missing."""
    write_corpus(raw_dir, tmp_path, "webdataset", rows_per_shard=1000)
    meta = tmp_path / "valid" / "00000.parquet"
    table = pq.read_table(meta)
    pq.write_table(pa.concat_tables([table.slice(0, 5), table.slice(6)]), meta)  # row 6 unlisted
    rows = list(read_shard(Folder(tmp_path), "valid/00000.tar", "webdataset"))
    assert [row.key for row in rows] == table.column("key").to_pylist()
    assert not any("lacks it" in (row.problem or "") for row in rows)


def test_chinese_clip_files_win_over_a_split_folder(raw_dir, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(raw_dir, raw)
    (raw / "train").mkdir()
    pq.write_table(pa.table({"x": [1]}), raw / "train" / "stray.parquet")
    summary = ingest(raw, tmp_path / "out", IngestConfig(workers=1))["splits"]["train"]
    assert "format" not in summary and summary["quarantined"] == 0 and summary["pairs"] > 0
