"""img2dataset's output, written by the real img2dataset (tests/img2dataset_tool.py) from a web server
on 127.0.0.1 serving good images, 404s, HTML named .jpg, JPEGs cut short and empty captions, with
four threads and several shards, in each output format zhclip reads. Every URL it tried is kept once
or quarantined once, never both, whatever order its downloads finished in.

A few cases the real tool cannot make (a key written twice, a sample its Parquet does not list, a
shard's samples in another random order) are made by editing its output, and say so."""

import io
import json
import random
import shutil
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from zhclip.components.core.cluster import ordered_streams, ray_runtime
from zhclip.components.core.errors import ZhclipError
from zhclip.components.core.storage import Folder
from zhclip.components.data.img2dataset import read_shard, shards
from zhclip.components.data.ingest import IngestConfig, ingest

from img2dataset_tool import download, faulty_urls, tried

pytestmark = pytest.mark.usefixtures("shared_ray")  # its in-process steps join one Ray
URLS = faulty_urls(45)
SHARD_SIZE = 10
FORMATS = ("webdataset", "parquet", "files")
# webdataset with --disable_all_reencoding: img2dataset passes the served bytes through, so the HTML
# pages and cut JPEGs reach the tar and zhclip's decoder quarantines them; the other formats with
# img2dataset's default decoding, which fails them itself (failed_to_resize).
EXTRA = {"webdataset": ("--disable_all_reencoding=True",)}
# What becomes of each kind of URL: kept, or quarantined with a reason that starts so.
FATE = {
    "good": "kept",
    "missing": "img2dataset did not fetch it (status failed_to_download: HTTP Error 404",
    "empty caption": "empty or non-string text",
}
UNDECODABLE = ("img2dataset did not fetch it (status failed_to_resize", "image does not decode")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The real img2dataset's output of URLS in one format, as a raw folder (its train split copied
    to valid and test: ingest reads all three), made once per format."""
    made = {}

    def make(output_format: str) -> Path:
        if output_format not in made:
            raw = tmp_path_factory.mktemp(f"img2dataset-{output_format}")
            download(URLS, raw / "train", output_format, SHARD_SIZE, extra=EXTRA.get(output_format, ()))
            for split in ("valid", "test"):
                shutil.copytree(raw / "train", raw / split)
            made[output_format] = raw
        return made[output_format]

    return make


def _fates(out: Path, split: str) -> dict[int, list[str]]:
    """What became of each key of a split: 'kept', and each reason it was quarantined for."""
    fates: dict[int, list[str]] = {}
    for image_id in pq.read_table(out / split, columns=["image_id"]).column("image_id").to_pylist():
        fates.setdefault(image_id, []).append("kept")
    for line in (out / "quarantine" / f"{split}.jsonl").open(encoding="utf-8"):
        entry = json.loads(line)
        fates.setdefault(int(json.loads(entry["record"])["key"]), []).append(entry["reason"])
    return fates


def _check_every_url_once(raw: Path, out: Path, summary: dict) -> None:
    keys = {path: int(row["key"]) for path, row in tried(raw / "train").items()}
    assert sorted(keys) == sorted(url.path for url in URLS)  # img2dataset tried each URL once
    for split, got in summary.items():
        fates = _fates(out, split)
        assert sorted(fates) == sorted(keys.values())  # nothing read that it did not try
        assert got["pairs"] + got["quarantined"] == len(URLS)
        for url in URLS:
            (fate,) = fates[keys[url.path]]  # kept once or quarantined once, never both
            expected = FATE.get(url.fault, UNDECODABLE)
            assert fate.startswith(expected), (url, fate)


@pytest.mark.parametrize("output_format", FORMATS)
def test_every_url_img2dataset_tried_is_kept_or_quarantined_once(corpus, tmp_path, output_format):
    raw = corpus(output_format)
    kind, names = shards(Folder(raw), "train")
    assert kind == output_format and len(names) == len(URLS) // SHARD_SIZE + 1
    # webdataset in Ray tasks, a shard's rows handed back in three batches; the others in this process
    workers = 2 if output_format == "webdataset" else 1
    summary = ingest(raw, tmp_path / "out", IngestConfig(workers=workers, shard_rows=50, batch_lines=4))["splits"]
    assert summary["train"]["format"] == f"img2dataset {output_format}"
    _check_every_url_once(raw, tmp_path / "out", summary)
    pairs = pq.read_table(tmp_path / "out" / "train").to_pylist()
    captions = {url.caption for url in URLS if url.fault == "good"}
    assert {pair["text"] for pair in pairs} == captions and all(pair["text_id"] == pair["image_id"] for pair in pairs)


def _shuffled_shard(folder: Path, name: str, seed: int) -> None:
    """Rewrite one webdataset shard with its samples and its Parquet rows in another random order,
    as another run of img2dataset may write them (the order its downloads finish in)."""
    with tarfile.open(folder / f"{name}.tar") as tar:
        members = [(member, tar.extractfile(member).read()) for member in tar if member.isfile()]
    samples: dict[str, list] = {}
    for member, data in members:
        samples.setdefault(member.name.split(".")[0], []).append((member, data))
    order = list(samples)
    random.Random(seed).shuffle(order)
    with tarfile.open(folder / f"{name}.tar", "w") as tar:
        for key in order:
            for member, data in samples[key]:
                tar.addfile(member, io.BytesIO(data))
    table = pq.read_table(folder / f"{name}.parquet")
    rows = list(range(table.num_rows))
    random.Random(seed + 1).shuffle(rows)
    pq.write_table(table.take(rows), folder / f"{name}.parquet")


@pytest.mark.parametrize("seed", [0, 1])
def test_a_shard_in_another_download_order_ingests_the_same_pairs(corpus, tmp_path, seed):
    raw = Path(shutil.copytree(corpus("webdataset"), tmp_path / "raw"))
    for split in ("train", "valid", "test"):
        for shard in ("00000", "00002"):
            _shuffled_shard(raw / split, shard, seed)
    summary = ingest(raw, tmp_path / "out", IngestConfig(workers=1))["splits"]
    _check_every_url_once(raw, tmp_path / "out", summary)


def test_a_folder_without_shards_is_not_img2dataset(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "notes.txt").write_text("x")
    assert shards(Folder(tmp_path), "train") is None
    assert shards(Folder(tmp_path), "valid") is None


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
def test_a_key_img2dataset_wrote_twice_is_quarantined_once(corpus, tmp_path, passes, request):
    """img2dataset never writes a key twice; a corpus merged by hand may: made by appending a row of
    its Parquet output again."""
    if passes == "several":
        request.getfixturevalue("seven_passes")
    raw = Path(shutil.copytree(corpus("parquet"), tmp_path / "raw"))
    shard = raw / "valid" / "00000.parquet"
    table = pq.read_table(shard)
    rows = zip(table.column("status").to_pylist(), table.column("caption").to_pylist())
    # the first fetched row with a caption (the download order decides which row comes first: an empty
    # caption's row would be quarantined for its caption, never reaching the duplicate check)
    good = next(number for number, (status, caption) in enumerate(rows) if status == "success" and caption)
    pq.write_table(pa.concat_tables([table, table.slice(good, 1)]), shard)  # a fetched row again, at the end
    summary = ingest(raw, tmp_path / "out", IngestConfig(workers=1))["splits"]["valid"]
    quarantined = [json.loads(line) for line in (tmp_path / "out" / "quarantine" / "valid.jsonl").open()]
    repeated = [entry for entry in quarantined if "duplicate image_id" in entry["reason"]]
    assert len(repeated) == 1 and repeated[0]["file"].endswith("00000.parquet")
    assert repeated[0]["line"] == table.num_rows + 1
    assert summary["pairs"] + summary["quarantined"] == len(URLS) + 1


def test_a_sample_its_parquet_does_not_list_is_still_read_once(corpus, tmp_path):
    """A fetched row missing from the Parquet beside its tar (img2dataset lists every row; a shard
    edited by hand may not): made by dropping one row of its Parquet output. Every sample is read once,
    none is reported missing."""
    raw = Path(shutil.copytree(corpus("webdataset"), tmp_path / "raw"))
    meta = raw / "valid" / "00000.parquet"
    table = pq.read_table(meta)
    dropped = table.column("status").to_pylist().index("success")
    pq.write_table(pa.concat_tables([table.slice(0, dropped), table.slice(dropped + 1)]), meta)
    rows = list(read_shard(Folder(raw), "valid/00000.tar", "webdataset"))
    assert sorted(row.key for row in rows) == sorted(table.column("key").to_pylist())
    assert not any("lacks it" in (row.problem or "") for row in rows)


def test_a_split_in_two_formats_is_refused_naming_both(corpus, raw_dir, tmp_path):
    raw = Path(shutil.copytree(corpus("files"), tmp_path / "raw"))
    for name in ("train_imgs.tsv", "train_texts.jsonl"):
        shutil.copy(raw_dir / name, raw / name)
    with pytest.raises(ZhclipError) as refused:
        ingest(raw, tmp_path / "out", IngestConfig(workers=1))
    message = str(refused.value)
    assert "train: the raw folder holds 2 formats" in message
    assert all(name in message for name in ("train_imgs.tsv", "train_texts.jsonl", "img2dataset files", "5 shards"))
    assert not (tmp_path / "out" / "train").exists()
