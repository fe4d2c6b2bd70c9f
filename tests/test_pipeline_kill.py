"""Crash consistency of `dvc repro`: SIGKILL the whole process tree (dvc, the step, Ray) during ingest,
during training and during registration, as a preempted pod or `kill -9` would, then run it again. The
killed stage is never taken as done (`dvc status` names it), the re-run completes with the figures of
an uninterrupted run, and the registry holds each checkpoint once, gated."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess

import psutil
import pytest
import yaml
from mlflow import MlflowClient

from conftest import BIN, copy_of, run_tool, update_params
from kill import kill_tree, latest_checkpoint_step, wait_for

pytestmark = pytest.mark.slow


def _repro_in_background(project, *args: str) -> subprocess.Popen:
    log = open(project / "logs" / "killed-repro.log", "ab")  # noqa: SIM115 (the process writes to it)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    return subprocess.Popen([str(BIN / "dvc"), "repro", *args], cwd=project, stdout=log, stderr=log, env=env)


def _step_running(repro: subprocess.Popen, command: str) -> bool:
    """Whether `command` (e.g. `zhclip ingest`) runs under the `dvc repro` process."""
    for process in psutil.Process(repro.pid).children(recursive=True):
        try:
            if command in " ".join(process.cmdline()):
                return True
        except psutil.Error:
            continue
    return False


def _changed_stages(project) -> set[str]:
    out = subprocess.run(
        [str(BIN / "dvc"), "status", "--json"], cwd=project, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout or "{}"))


def _lock(project) -> dict:
    return yaml.safe_load((project / "dvc.lock").read_text())["stages"]


def _out_hash(project, stage: str, path: str) -> str:
    return next(out["md5"] for out in _lock(project)[stage]["outs"] if out["path"] == path)


def _metrics(project, name: str) -> dict:
    return json.loads((project / "metrics" / f"{name}.json").read_text())


def _runs(project) -> int:
    with sqlite3.connect(project / "mlflow.db") as db:
        return db.execute("select count(*) from runs").fetchone()[0]


def _versions_by_checkpoint(project, name: str) -> dict[str, list[int]]:
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    versions: dict[str, list[int]] = {}
    for version in client.search_model_versions(f"name = '{name}'"):
        assert "promotion.champion_version" in version.tags, f"version {version.version} was never gated"
        versions.setdefault(version.tags["model_dvc_hash"], []).append(int(version.version))
    return versions


@pytest.fixture(scope="module")
def project(small_project, tmp_path_factory):
    """A copy of the reproduced small project: its stage 2 checkpoints every 2 steps and its killed
    registrations hold the gate for 10 s (tests/conftest.py's SMALL_PROJECT_PARAMS)."""
    root = copy_of(small_project, tmp_path_factory.mktemp("killed"))
    assert not _changed_stages(root)
    return root


def test_killed_during_ingest(project):
    prepared = _out_hash(project, "ingest", "data/prepared")
    running = _repro_in_background(project, "--force", "--single-item", "ingest")
    # dvc removes the stage's outputs before the step runs: a data/prepared while it runs is being written
    wait_for(
        lambda: _step_running(running, "zhclip ingest") and (project / "data" / "prepared").is_dir(),
        "ingest to start writing",
    )
    kill_tree(running.pid)
    assert "ingest" in _changed_stages(project)  # the half-written data/prepared is not taken as its output
    out = run_tool("dvc", "repro", cwd=project)
    # DVC restores the output its lock records from its cache (the project ran ingest before); a first
    # run would run ingest again. Either way the data is the same, and nothing downstream runs again.
    assert "Stage 'ingest' is cached - skipping run, checking out outputs" in out or "Running stage 'ingest'" in out
    assert "Running stage 'validate'" not in out
    assert _out_hash(project, "ingest", "data/prepared") == prepared and not _changed_stages(project)


def test_killed_during_training(project):
    before = {name: _metrics(project, name) for name in ("train_stage2", "evaluate_stage2")}
    for run in (project / "ray_results").glob("zhclip-stage2-*"):
        shutil.rmtree(run)  # the run trains from its start, as a first run would
    running = _repro_in_background(project, "--force", "--single-item", "train@stage2")
    wait_for(
        lambda: latest_checkpoint_step(project / "ray_results", "zhclip-stage2-*") >= 2, "stage 2's first checkpoint"
    )
    kill_tree(running.pid)
    assert "train@stage2" in _changed_stages(project)
    # Forced, as a retried pipeline task runs it: plain `dvc repro` would restore the earlier run's model
    # from DVC's cache instead of running the stage, which resumes from its checkpoint.
    run_tool("dvc", "repro", "--force", "--single-item", "train@stage2", cwd=project)
    run_tool("dvc", "repro", cwd=project)
    assert not _changed_stages(project)
    trained = _metrics(project, "train_stage2")
    assert trained["resumed_at_steps"] and trained["steps"] == before["train_stage2"]["steps"]
    assert trained["final_loss"] == pytest.approx(before["train_stage2"]["final_loss"], abs=1e-4)
    assert _metrics(project, "evaluate_stage2")["mean_recall"] == pytest.approx(
        before["evaluate_stage2"]["mean_recall"], abs=1e-6
    )
    name = _metrics(project, "register")["model_name"]
    assert all(len(versions) == 1 for versions in _versions_by_checkpoint(project, name).values())


def test_killed_during_registration(project):
    name = "zhclip-killed"  # a model name of its own, so the registration is a new one
    update_params(project, {"register": {"model_name": name}})
    runs = _runs(project)
    running = _repro_in_background(project, "register")
    wait_for(lambda: _runs(project) > runs, "the registration's MLflow run")
    kill_tree(running.pid)
    assert "register" in _changed_stages(project)
    run_tool("dvc", "repro", cwd=project)
    assert not _changed_stages(project)
    assert list(_versions_by_checkpoint(project, name).values()) == [[1]]
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    assert int(client.get_model_version_by_alias(name, "champion").version) == 1
    assert _metrics(project, "register")["version"] == 1
