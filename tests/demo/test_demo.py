"""`dvc repro` of the real demo in a scratch copy of the project: learning, caching and experiments."""

import json
import os
from collections import Counter

import pytest

from conftest import copy_project
from conftest import run_tool as _run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A git repository holding the project's pipeline files, where `dvc repro --quiet` (as `make demo`) ran once."""
    import subprocess

    from conftest import BIN

    root = copy_project(tmp_path_factory.mktemp("project"))
    _run("git", "add", "-A", cwd=root)
    _run("git", "commit", "-qm", "project", cwd=root)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    result = subprocess.run(
        ["dvc", "repro", "--quiet"], cwd=root, capture_output=True, text=True, timeout=1500, env=env
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (root / "repro.log").write_text(result.stdout + result.stderr, encoding="utf-8")
    return root


def _metrics(root, name):
    return json.loads((root / "metrics" / f"{name}.json").read_text())


def test_demo_follows_the_paper_from_pretrained_towers_and_beats_its_start(project):
    start, stage1, stage2 = (_metrics(project, f"evaluate_{name}") for name in ("start", "stage1", "stage2"))
    chance = stage2["chance_mean_recall"]
    assert 5 < chance < 15
    assert _metrics(project, "start")["source"] == "towers"  # the demo's pretrained English CLIP and Chinese BERT
    towers = _metrics(project, "demo_towers")
    for tower in ("vision", "text"):
        assert towers[tower]["final_loss"] < 0.7 * towers[tower]["first_loss"], towers[tower]
    assert stage1["mean_recall"] >= 3 * chance, stage1
    assert stage2["mean_recall"] >= stage1["mean_recall"] > start["mean_recall"]
    assert [entry["model"] for entry in stage2["chain"]] == ["start", "stage1", "stage2"]
    assert stage2["gain_over_start"] == pytest.approx(stage2["mean_recall"] - start["mean_recall"], abs=1e-3)
    assert _metrics(project, "train_stage1")["warnings"] == [] and _metrics(project, "train_stage2")["warnings"] == []
    registered = _metrics(project, "register")
    assert registered["version"] == 1 and registered["champion_version"] == 1 and registered["rule"] == "first"
    digits, digits_start = _metrics(project, "zeroshot_stage2_digits"), _metrics(project, "zeroshot_start_digits")
    assert (
        digits["images"] == 80 and digits["top1"] > 2 * digits["chance_top1"] and digits["top1"] > digits_start["top1"]
    )
    assert (project / "reports" / "evaluate_stage2" / "report.html").is_file()
    report = _run("zhclip", "results", cwd=project)
    assert f"chance level {chance:.2f}" in report and f"{stage2['mean_recall']:.2f}" in report
    assert f"{stage2['gain_over_start']:+.2f} over the start" in report and "zero-shot digits" in report


def test_demo_output_is_steps_progress_and_results_without_repeated_noise(project):
    lines = [line.split("\r")[-1].strip() for line in (project / "repro.log").read_text(encoding="utf-8").split("\n")]
    counts = Counter(line for line in lines if line)
    assert max(counts.values()) <= 3, counts.most_common(5)
    text = "\n".join(lines)
    assert "Failed to query Ray Train Controller" not in text and "Token authentication" not in text
    assert "stage2: test mean recall" in text and "Ray's messages: " in text  # results, and where Ray's logs went


def test_one_repro_is_tracked_as_a_parent_run_with_a_run_per_stage(project):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("zhclip").experiment_id
    (parent,) = client.search_runs([experiment], "tags.`zhclip.kind` = 'pipeline'")
    stages = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    training = {r.data.tags["zhclip.stage"]: r for r in stages if r.data.tags.get("zhclip.kind") == "training"}
    assert sorted(training) == ["1", "2"]
    for stage, run in training.items():
        steps = _metrics(project, f"train_stage{stage}")["steps"]
        for curve in ("loss", "lr", "logit_scale", "samples_per_s", "data_wait_s"):
            assert len(client.get_metric_history(run.info.run_id, curve)) == steps, (stage, curve)
        assert client.get_metric_history(run.info.run_id, "valid_mean_recall")


def test_repro_with_nothing_changed_runs_nothing(project):
    before = {p: p.stat().st_mtime_ns for p in (project / "metrics").iterdir()}
    out = _run("dvc", "repro", cwd=project)
    assert "Data and pipelines are up to date" in out
    assert "Running stage" not in out
    assert {p: p.stat().st_mtime_ns for p in (project / "metrics").iterdir()} == before


def test_experiment_variant_is_compared_with_the_baseline(project):
    _run("git", "add", "-A", cwd=project)
    _run("git", "commit", "-qm", "baseline", cwd=project)
    out = _run("dvc", "exp", "run", "-S", "stage2.epochs=2", "--name", "short-stage2", cwd=project)
    assert "Running stage 'train@stage2'" in out and "Running stage 'train@stage1'" not in out
    shown = json.loads(_run("dvc", "exp", "show", "--json", cwd=project))
    experiments = [e for baseline in shown for e in (baseline.get("experiments") or [])]
    assert any(e.get("name") == "short-stage2" for e in experiments), shown
    diff = json.loads(_run("dvc", "metrics", "diff", "--json", cwd=project))
    assert diff["metrics/train_stage2.json"]["epochs"] == {"old": 10, "new": 2, "diff": -8}
    assert "mean_recall" in diff["metrics/evaluate_stage2.json"]


def test_the_demo_index_answers_captions_over_http_as_well_as_evaluate_says(project):
    """`dvc repro` indexed the test split with the champion; `zhclip serve` finds a caption's image in
    its top 10 for at least as many captions as the evaluation's text-to-image R@10."""
    from zhclip.components.data.shards import read_pairs

    from conftest import caption_recall_at_10, serving

    built, registered = _metrics(project, "index_test"), _metrics(project, "register")
    assert built["model"]["version"] == str(registered["champion_version"]) and built["rejected"] == 0
    # by default `zhclip serve` serves the indexes dvc repro built, with the champion
    with serving([], project / "serve.log", cwd=project) as base:
        recall = caption_recall_at_10(base, read_pairs(project / "data" / "validated", "test"))
    assert recall >= _metrics(project, "evaluate_stage2")["t2i_r10"] - 1e-6
    assert f"zhclip serve --index {built['index']}" in _run("zhclip", "results", cwd=project)
