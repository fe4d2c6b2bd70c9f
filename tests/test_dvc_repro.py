"""`dvc repro` of the project as users run it (the small project: same stages, small data): what it
prints, how it is tracked, that an unchanged project re-runs nothing, and the experiments docs/dvc.md
and docs/fine-tuning.md show, run as written."""

import json
import time
from collections import Counter

import pytest
import yaml

from conftest import REPO, copy_of, run_tool
from doc_blocks import run_block, shell_blocks

pytestmark = pytest.mark.slow


def _metrics(root, name):
    return json.loads((root / "metrics" / f"{name}.json").read_text())


def test_output_is_steps_progress_and_results_without_repeated_noise(small_project):
    """What `make demo` writes to a log (the small project's `dvc repro --quiet` through a pipe)."""
    log = (small_project / "logs" / "dvc-repro.log").read_text(encoding="utf-8")
    assert "\r" not in log  # progress as whole lines, not a bar redrawn
    lines = [line.strip() for line in log.split("\n")]
    assert max(map(len, lines)) <= 1000, max(lines, key=len)[:300]
    assert any(line.startswith("pretrain English CLIP: 20 step in ") for line in lines)  # a bar's last line
    counts = Counter(line for line in lines if line)
    assert max(counts.values()) <= 3, counts.most_common(5)
    text = "\n".join(lines)
    assert "Failed to query Ray Train Controller" not in text and "Token authentication" not in text
    assert "stage2: test mean recall" in text and "Ray's messages: " in text  # results, and where Ray's logs went


def test_one_repro_is_tracked_as_a_parent_run_with_a_run_per_stage(small_project):
    from mlflow import MlflowClient

    from zhclip.components.core.tracking import parent_run_from

    client = MlflowClient(f"sqlite:///{small_project / 'mlflow.db'}")
    parent = client.get_run(parent_run_from(str(small_project / "models" / "stage1")))
    assert parent.data.tags["zhclip.kind"] == "pipeline"
    stages = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    training = {r.data.tags["zhclip.stage"]: r for r in stages if r.data.tags.get("zhclip.kind") == "training"}
    assert sorted(training) == ["1", "2"]
    for stage, run in training.items():
        steps = _metrics(small_project, f"train_stage{stage}")["steps"]
        for curve in ("loss", "lr", "logit_scale", "samples_per_s", "data_wait_s"):
            assert len(client.get_metric_history(run.info.run_id, curve)) == steps, (stage, curve)
        assert client.get_metric_history(run.info.run_id, "valid_mean_recall")
    assert parent_run_from(str(small_project / "models" / "stage2")) == parent.info.run_id


def test_repro_with_nothing_changed_runs_nothing(small_project):
    before = {p: p.stat().st_mtime_ns for p in (small_project / "metrics").iterdir()}
    out = run_tool("dvc", "repro", cwd=small_project)
    assert "Data and pipelines are up to date" in out
    assert "Running stage" not in out
    assert {p: p.stat().st_mtime_ns for p in (small_project / "metrics").iterdir()} == before


def _run_block(page: str, project) -> str:
    """Run the shell block of docs/`page` marked to run here, in `project`; returns its output."""
    (block,) = [b for b in shell_blocks(REPO / "docs" / page) if b.detail == "tests/test_dvc_repro.py"]
    return run_block(block, project)


def _queue_done(project, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    # each `dvc queue status` costs about 0.8 CPU-s, taken from the experiment it waits for
    while "Queued" in (status := run_tool("dvc", "queue", "status", cwd=project)) or "Running" in status:
        assert time.monotonic() < deadline, status
        time.sleep(10)
    assert "Failed" not in status, status + run_tool("dvc", "queue", "logs", status.split()[3], cwd=project)


def _experiments(project) -> dict[str, dict]:
    """Each experiment of the workspace's baseline: its params.yaml and its stage 2 score."""
    shown = json.loads(run_tool("dvc", "exp", "show", "--json", cwd=project))
    found = {}
    for baseline in shown:
        for experiment in baseline.get("experiments") or []:
            data = experiment["revs"][0]["data"]
            found[experiment["revs"][0]["name"]] = {
                "params": data["params"]["params.yaml"]["data"],
                "recall": data["metrics"]["metrics/evaluate_stage2.json"]["data"]["mean_recall"],
            }
    return found


def test_the_guides_experiments_run_as_written(small_project, tmp_path):
    """docs/dvc.md's variant, then docs/fine-tuning.md's switch and sweep (new keys with `++`, the sweep
    queued and started), each reproduced as far as stage 2's score and compared with the baseline."""
    project = copy_of(small_project, tmp_path)
    out = _run_block("dvc.md", project)
    assert "Running stage 'train@stage2'" in out and "Running stage 'evaluate@stage2'" in out
    assert "Running stage 'train@stage1'" not in out and "Running stage 'register'" not in out
    diff = json.loads(run_tool("dvc", "metrics", "diff", "--all", "--json", cwd=project))
    assert diff["metrics/train_stage2.json"]["epochs"] == {"old": 1, "new": 3, "diff": 2}
    assert (project / "dvc_plots" / "index.html").is_file()
    # the fine-tuning guide from the committed baseline, as a reader who opens it first finds the
    # project (and at its one epoch: three experiments of 6 steps, not 18)
    run_tool("git", "checkout", "--", ".", cwd=project)
    run_tool("dvc", "checkout", cwd=project)
    _run_block("fine-tuning.md", project)
    _queue_done(project)
    experiments = list(_experiments(project).values())
    stage2 = [e["params"]["stage2"] for e in experiments]
    base = yaml.safe_load((small_project / "params.yaml").read_text(encoding="utf-8"))["stage2"]
    assert sorted(map(str, stage2)) == sorted(
        map(
            str,
            [
                {**base, "epochs": 3},
                {**base, "lora": "text"},
                {**base, "lora": "text", "loss": "infonce"},
                {**base, "lora": "text", "loss": "siglip"},
            ],
        )
    )
    assert all(0 <= e["recall"] <= 100 for e in experiments)
    baseline = _metrics(small_project, "evaluate_stage2")["mean_recall"]
    assert len({e["recall"] for e in experiments} | {baseline}) > 1  # the switches changed the model
