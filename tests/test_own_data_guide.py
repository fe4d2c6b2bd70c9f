"""docs/own-data.md followed as written, in a home folder of its own (`~` is the test's):

- a captions CSV of the user's making, from the reproduced demo's workspace (after `make demo`):
  `zhclip init`, the choices, the starting weights, `dvc repro`; the project prepares exactly the
  user's rows, trains, registers under its own name, then re-runs only what a data change touches;
- a corpus the real img2dataset fetches with the guide's own command (from a server on 127.0.0.1;
  404s among the URLs), from a folder where no demo ran: exactly the fetched rows are prepared.

What a test cannot do as a user does is said where it happens: the choices are written into
params.yaml (a user edits it), and the "downloaded" towers are the demo's tiny stand-ins.
"""

import base64
import csv
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from zhclip.components.data.shards import read_pairs

from conftest import copy_of, run_tool, update_params
from doc_blocks import REPO, shell_blocks
from img2dataset_tool import IMG2DATASET, pair_urls, tried, web_server

pytestmark = pytest.mark.slow
GUIDE = shell_blocks(REPO / "docs" / "own-data.md")
CSV_WALK, CRAWL_WALK, RUN_WALK = (block for block in GUIDE if block.mode == "run in")
SPLITS = ("train", "valid", "test")
# The choices a user makes in params.yaml, for tiny stand-in towers and a quick run: one training
# stage from the start (docs/starting-weights.md's `start.stages`; the two-stage chain is the small
# project's and the demo's), one epoch.
QUICK_CHOICES = {
    "model": {"preset": "tiny"},
    "start": {"stages": {"stage2": "start"}},
    "stage2": {"epochs": 1},
    "train": {"batch_size": 32},
    "benchmark": {"models": ["stage2"]},  # the suite (test split, shapes) for the final model only: test time
}


def _run(block, cwd: Path, home: Path, path: str = "") -> str:
    from doc_blocks import run_block

    extra = {"HOME": str(home), "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
    if path:
        extra["PATH"] = f"{Path(sys.executable).parent}:{os.environ['PATH']}:{path}"
    return run_block(block, cwd, extra)


def _ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def _captions_csv(demo_raw: Path, folder: Path) -> dict[str, list[tuple[int, str, int]]]:
    """The demo's Chinese-CLIP splits as a user's captions CSVs and image files (one shapes zero-shot
    set beside them); returns each split's (text_id, text, image_id) rows, image ids numbered by first
    appearance as docs/own-data.md says."""
    (folder / "images").mkdir(parents=True)
    rows = {}
    for split in SPLITS:
        for line in (demo_raw / f"{split}_imgs.tsv").read_text().splitlines():
            image_id, encoded = line.split("\t")
            (folder / "images" / f"{split}-{image_id}.png").write_bytes(base64.urlsafe_b64decode(encoded))
        pairs = [
            (text["text_id"], text["text"], f"images/{split}-{image_id}.png")
            for text in map(json.loads, (demo_raw / f"{split}_texts.jsonl").read_text(encoding="utf-8").splitlines())
            for image_id in text["image_ids"]
        ]
        with open(folder / f"{split}.csv", "w", encoding="utf-8", newline="") as out:
            csv.writer(out).writerows([("text_id", "text", "image"), *pairs])
        numbers = {image: number for number, image in enumerate(dict.fromkeys(image for *_, image in pairs), 1)}
        rows[split] = sorted((text_id, text, numbers[image]) for text_id, text, image in pairs)
    shutil.copytree(demo_raw / "zeroshot" / "shapes", folder / "zeroshot" / "shapes")
    return rows


def _prepared(project: Path, split: str) -> list[tuple]:
    pairs = read_pairs(project / "data" / "prepared", split)
    return sorted(zip(pairs.text_id.tolist(), pairs.text.tolist(), pairs.image_id.tolist()))


def test_a_captions_csv_walks_the_guide_from_the_demos_workspace(small_project, raw_dir, tmp_path):
    home, workspace = tmp_path / "home", copy_of(small_project, tmp_path)
    rows = _captions_csv(raw_dir, home / "my-captions")
    for role, folder in (("vision", "clip-vit-base-patch16"), ("text", "chinese-roberta-wwm-ext")):
        shutil.copytree(small_project / "weights" / "demo" / role, home / "downloads" / folder)
    _run(CSV_WALK, workspace, home)
    project = home / "my-clip"
    update_params(project, QUICK_CHOICES)  # what the user edits: a preset to match the tiny towers
    out = _run(RUN_WALK, project, home)
    for split in SPLITS:
        assert _prepared(project, split) == rows[split]
    assert "demo_towers" not in _ran(out) and "zeroshot@stage2-shapes" in _ran(out)
    assert "train@stage2" in _ran(out) and "train@stage1" not in _ran(out)  # the stages the user chose
    assert {"benchmark@stage2-suite0", "benchmark@stage2-suite1", "suite"} <= set(_ran(out))
    registered = json.loads((project / "metrics" / "register.json").read_text())
    assert (registered["model_name"], registered["version"]) == ("my-clip", 1)
    assert registered["tracking_uri"] == f"sqlite:///{project}/mlflow.db"  # the project's own registry
    assert _ran(run_tool("dvc", "repro", cwd=project)) == []

    # the user's data changes: ingest and what follows it re-run, nothing else
    image = (project / "data" / "raw" / "test.csv").read_text(encoding="utf-8").splitlines()[1].rsplit(",", 1)[1]
    with open(project / "data" / "raw" / "test.csv", "a", encoding="utf-8") as out:
        out.write(f"999999,新加的一条描述,{image}\n")
    run_tool("dvc", "add", "data/raw", cwd=project)
    assert _ran(run_tool("dvc", "repro", "validate", cwd=project)) == ["ingest", "validate"]
    assert (999999, "新加的一条描述") in {row[:2] for row in _prepared(project, "test")}
    changed = set(json.loads(run_tool("dvc", "status", "--json", cwd=project)))
    assert {"evaluate_start", "train@stage2", "index@test"} <= changed and "start" not in changed
    assert run_tool("git", "status", "--porcelain", cwd=workspace).strip() in ("", "?? .venv")  # demo untouched


def test_an_img2dataset_crawl_walks_the_guide_without_the_demo(raw_dir, tmp_path):
    home, here = tmp_path / "home", tmp_path / "here"
    here.mkdir()
    urls = {split: pair_urls(raw_dir, split) for split in SPLITS}
    # each split's URLs under its own path (pair_urls numbers every split's from /0.png)
    served = {f"/{split}{url.path}": url.body for split in SPLITS for url in urls[split] if url.body is not None}
    with web_server(served) as base:
        for split in SPLITS:  # the URL lists the guide's loop reads
            listing = {
                "url": [f"{base}/{split}{url.path}" for url in urls[split]],
                "caption": [url.caption for url in urls[split]],
            }
            pq.write_table(pa.table(listing), here / f"{split}.parquet")
        _run(CRAWL_WALK, here, home, path=str(IMG2DATASET.parent))
    project = home / "my-crawl-clip"
    run_tool("dvc", "repro", "validate", cwd=project)  # the prepared rows; the full run is the CSV walk's
    ingested = json.loads((project / "metrics" / "ingest.json").read_text())["splits"]
    for split in SPLITS:
        statuses = tried(home / "my-crawl" / split)
        lost = {url.path: statuses[url.path]["error_message"] for url in urls[split] if url.body is not None}
        lost = {path: error for path, error in lost.items() if statuses[path]["status"] != "success"}
        assert not lost, f"img2dataset did not fetch {split} URLs the server had: {lost}"
        fetched = sorted(url.caption for url in urls[split] if url.body is not None)
        assert sorted(text for _, text, _ in _prepared(project, split)) == fetched
        assert ingested[split]["format"] == "img2dataset webdataset"
        assert ingested[split]["not_fetched"] == sum(url.body is None for url in urls[split]) > 0
