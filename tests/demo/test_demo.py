"""The real demo, as `make demo` reproduces it: the paper's two stages learn from the pretrained towers.

CI runs `make demo` before `make test`, and
these tests read that reproduction: the repository's own workspace, when `dvc status` finds every
stage up to date with this code, these params and this data (so its results are this code's). In
any other workspace the fixture reproduces the demo in a scratch copy of the project first. Either
way the tests only read it. How `dvc repro` behaves (output, tracking, caching, experiments) is
tested on the small project in tests/test_dvc_repro.py.
"""

import json
import re

import pytest

from conftest import REPO, run_tool
from doc_blocks import fenced_blocks

pytestmark = pytest.mark.slow


def _metrics(root, name):
    return json.loads((root / "metrics" / f"{name}.json").read_text())


def test_demo_follows_the_paper_from_pretrained_towers_and_beats_its_start(demo):
    start, stage1, stage2 = (_metrics(demo, f"evaluate_{name}") for name in ("start", "stage1", "stage2"))
    chance = stage2["chance_mean_recall"]
    assert 5 < chance < 15
    assert _metrics(demo, "start")["source"] == "towers"  # the demo's pretrained English CLIP and Chinese BERT
    towers = _metrics(demo, "demo_towers")
    for tower in ("vision", "text"):
        assert towers[tower]["final_loss"] < 0.7 * towers[tower]["first_loss"], towers[tower]
    assert stage1["mean_recall"] >= 3 * chance, stage1
    assert stage2["mean_recall"] >= stage1["mean_recall"] > start["mean_recall"]
    assert [entry["model"] for entry in stage2["chain"]] == ["start", "stage1", "stage2"]
    assert stage2["gain_over_start"] == pytest.approx(stage2["mean_recall"] - start["mean_recall"], abs=1e-3)
    assert _metrics(demo, "train_stage1")["warnings"] == [] and _metrics(demo, "train_stage2")["warnings"] == []
    # the first model of the demo's registry is its champion (a workspace reproduced again finds it
    # already registered, under the same version)
    registered = _metrics(demo, "register")
    assert registered["champion_version"] == int(registered["version"]), registered
    assert "no champion yet" in registered["decision"], registered
    digits, digits_start = _metrics(demo, "zeroshot_stage2_digits"), _metrics(demo, "zeroshot_start_digits")
    assert (
        digits["images"] == 80 and digits["top1"] > 2 * digits["chance_top1"] and digits["top1"] > digits_start["top1"]
    )
    assert (demo / "reports" / "evaluate_stage2" / "report.html").is_file()
    # the benchmark suite: every model on the test split, a second retrieval set and both ELEVATER-layout
    # zero-shot sets, and the gate's verdict on each
    suite = _metrics(demo, "benchmark")
    assert list(suite["models"]) == ["start", "stage1", "stage2"] and suite["published_model"] is None
    assert list(suite["tasks"]) == ["demo-test", "demo-unseen", "digits", "shapes"]
    assert suite["models"]["stage2"]["demo-test"]["mean_recall"] == stage2["mean_recall"]
    assert suite["models"]["stage2"]["suite_mean"] > suite["models"]["start"]["suite_mean"]
    assert _metrics(demo, "benchmark/stage2/digits")["layout"] == "elevater"
    assert [verdict["passed"] for verdict in registered["suite"]] == [True] * 4
    report = run_tool("zhclip", "results", cwd=demo)
    assert "benchmark suite" in report and "published no model of preset 'tiny'" in report
    assert f"chance level {chance:.2f}" in report and f"{stage2['mean_recall']:.2f}" in report
    assert f"{stage2['gain_over_start']:+.2f} over the start" in report and "zero-shot digits" in report
    for page in (REPO / "README.md", REPO / "docs" / "demo.md"):  # what the docs show is what it prints
        assert _comparable(_results_block(page)) == _comparable(report.replace(str(demo), "/path/to/zhclip")), page


def _results_block(page) -> str:
    (block,) = [code for _, _, code, _ in fenced_blocks(page) if code.startswith("zhclip results")]
    return block


def _comparable(results: str) -> list[str]:
    """`zhclip results` lines without the weights hash: every figure is the same on every run, the
    weights' bytes are not (docs/training.md#reproducibility)."""
    return [re.sub(r"weights [0-9a-f]{12}", "weights …", line.rstrip()) for line in results.strip().splitlines()]


def test_the_demo_index_answers_captions_over_http_as_well_as_evaluate_says(demo, tmp_path):
    """`dvc repro` indexed the test split with the champion; `zhclip serve` finds a caption's image in
    its top 10 for at least as many captions as the evaluation's text-to-image R@10."""
    from zhclip.components.data.shards import read_pairs

    from conftest import caption_recall_at_10, serving

    built, registered = _metrics(demo, "index_test"), _metrics(demo, "register")
    assert built["model"]["version"] == str(registered["champion_version"]) and built["rejected"] == 0
    # by default `zhclip serve` serves the indexes dvc repro built, with the champion
    with serving([], tmp_path / "serve.log", cwd=demo) as base:
        recall = caption_recall_at_10(base, read_pairs(demo / "data" / "validated", "test"))
    assert recall >= _metrics(demo, "evaluate_stage2")["t2i_r10"] - 1e-6
    assert f"zhclip serve --index {built['index']}" in run_tool("zhclip", "results", cwd=demo)
