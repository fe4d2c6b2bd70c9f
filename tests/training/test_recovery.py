"""Checkpoints and recovery: a killed worker is replaced, an interrupted stage resumes, and both
continue inside the epoch: the same pairs, batch for batch, and the same loss trajectory as an
uninterrupted run (same seed)."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import psutil
import pytest

from zhclip.components.core.errors import ZhclipError
from zhclip.components.training.config import TrainConfig
from zhclip.components.training.loop import train_worker_loop
from zhclip.components.training.runner import train

from kill import latest_checkpoint_step

STEPS, EVERY = 36, 4
pytestmark = pytest.mark.slow


def _config(tmp_path: Path, **overrides) -> TrainConfig:
    return TrainConfig(
        stage=1,
        max_steps=STEPS,
        batch_size=32,
        lr=1e-3,
        warmup_steps=2,
        checkpoint_every=EVERY,
        mask_ratio=0.25,
        augment=True,
        storage_path=str(tmp_path / "ray"),
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        **overrides,
    )


@pytest.fixture(scope="module")
def uninterrupted(prepared_dir) -> list[dict]:
    """The history of the same run without Ray and without interruption."""
    config = {**asdict(_config(Path("/unused"))), "prepared_dir": str(prepared_dir), "init_dir": None}
    return train_worker_loop(config)


def _ray_train_workers() -> list[psutil.Process]:
    """The Ray Train workers of this test's own Ray: another test (an xdist worker) may train beside it."""
    workers = []
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if any("RayTrainWorker" in part for part in process.cmdline()):
                workers.append(process)
    return workers


def _kill_a_worker_after_first_checkpoint(storage: Path, seen: dict, timeout: float = 300) -> threading.Thread:
    """In the background: once a checkpoint exists, SIGKILL the training worker process."""

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            step = latest_checkpoint_step(storage)
            workers = _ray_train_workers()
            if step >= EVERY and workers:
                seen["checkpoint_step"] = step
                for worker in workers:
                    worker.send_signal(signal.SIGKILL)
                seen["killed"] = len(workers)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _assert_continues_the_uninterrupted_run(out_dir: Path, uninterrupted: list[dict]) -> None:
    history = json.loads((out_dir / "training_history.json").read_text())
    # Each step's pairs (an order-free digest of the batch): none repeated, none skipped, batch for batch.
    assert Counter(h["pairs"] for h in history) == Counter(h["pairs"] for h in uninterrupted)
    assert [h["pairs"] for h in history] == [h["pairs"] for h in uninterrupted]
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in uninterrupted], abs=1e-4)


def test_a_killed_worker_is_replaced_and_continues_from_the_last_checkpoint(prepared_dir, tmp_path, uninterrupted):
    seen: dict = {}
    watcher = _kill_a_worker_after_first_checkpoint(tmp_path / "ray", seen)
    summary = train(prepared_dir, tmp_path / "out", _config(tmp_path, max_failures=1, loader_workers=1))
    watcher.join(timeout=5)
    assert seen.get("killed"), "the worker was not killed during the run"
    (resumed_at,) = summary["resumed_at_steps"]
    assert resumed_at % EVERY == 0 and resumed_at >= seen["checkpoint_step"], (
        "more steps lost than since the last checkpoint"
    )
    assert summary["steps"] == STEPS
    _assert_continues_the_uninterrupted_run(tmp_path / "out", uninterrupted)


def test_an_interrupted_stage_resumes_when_run_again(prepared_dir, tmp_path, uninterrupted):
    seen: dict = {}
    watcher = _kill_a_worker_after_first_checkpoint(tmp_path / "ray", seen)
    with pytest.raises(ZhclipError, match="resumes from the last checkpoint"):
        train(prepared_dir, tmp_path / "out", _config(tmp_path, max_failures=0))
    watcher.join(timeout=5)
    summary = train(prepared_dir, tmp_path / "out", _config(tmp_path, max_failures=0))
    (resumed_at,) = summary["resumed_at_steps"]
    assert resumed_at >= seen["checkpoint_step"] and summary["steps"] == STEPS
    _assert_continues_the_uninterrupted_run(tmp_path / "out", uninterrupted)
