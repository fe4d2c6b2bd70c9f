"""Bring-your-own-data flow: raw data tracked with `dvc add`; touching one raw file re-runs ingest
and everything downstream, and nothing else changes when nothing changed."""

import json
import re

import pytest

from conftest import copy_of
from conftest import run_tool as _run

pytestmark = pytest.mark.slow
# What a changed raw file re-runs: everything after ingest except the start (its weights did not change)
# and the start's zero-shot scores (nor did its model or the zero-shot images).
DOWNSTREAM = [
    "ingest",
    "validate",
    "evaluate_start",
    "train@stage1",
    "train@stage2",
    "evaluate@stage1",
    "evaluate@stage2",
    "zeroshot@stage2-shapes",
    "register",
    "index@test",
]


def _ran(output):
    return re.findall(r"Running stage '([^']+)'", output)


def test_touching_one_raw_file_reruns_ingest_and_everything_downstream(small_project, tmp_path):
    project = copy_of(small_project, tmp_path)
    # Switch from the generated demo data to raw data the user tracks, as the README describes.
    _run("dvc", "remove", "demo_data", cwd=project)
    _run("dvc", "add", "data/raw", cwd=project)
    _run("git", "add", "-A", cwd=project)
    _run("git", "commit", "-qm", "own data", cwd=project)
    assert _ran(_run("dvc", "repro", cwd=project)) == []
    texts = project / "data" / "raw" / "test_texts.jsonl"
    first = json.loads(texts.read_text(encoding="utf-8").splitlines()[0])
    with open(texts, "a", encoding="utf-8") as out:
        out.write(
            json.dumps(
                {"text_id": 999999, "text": "新加的一条描述", "image_ids": first["image_ids"]}, ensure_ascii=False
            )
            + "\n"
        )
    _run("dvc", "add", "data/raw", cwd=project)
    assert sorted(_ran(_run("dvc", "repro", cwd=project))) == sorted(DOWNSTREAM)
    assert _ran(_run("dvc", "repro", cwd=project)) == []
