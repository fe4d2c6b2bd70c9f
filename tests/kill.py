"""Killing what a test started, as a preempted pod or `kill -9` would: every process of the tree at
once, with no chance to clean up; and when to do it: Ray Train's recorded checkpoints."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

import psutil


def kill_tree(pid: int) -> list[str]:
    """SIGKILL `pid` and every process under it (Ray's GCS, raylet and workers included); returns
    their command names."""
    root = psutil.Process(pid)
    processes = [root, *root.children(recursive=True)]
    for process in processes:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=30)
    return [process.name() if process.is_running() else "" for process in processes]


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 300, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(every)


def latest_checkpoint_step(storage: Path, runs: str = "*") -> int:
    """The newest step Ray Train has recorded a checkpoint for in the runs under `storage` whose names
    match `runs` (from their snapshots), 0 if none."""
    steps = [0]
    for snapshot in storage.glob(f"{runs}/checkpoint_manager_snapshot.json"):
        try:
            state = json.loads(snapshot.read_text())
        except (OSError, ValueError):
            continue  # being written
        steps += [int(m) for m in _find_steps(state)]
    return max(steps)


def _find_steps(node) -> list:
    if isinstance(node, dict):
        found = [node["step"]] if isinstance(node.get("step"), (int, float)) else []
        return found + [s for value in node.values() for s in _find_steps(value)]
    if isinstance(node, list):
        return [s for value in node for s in _find_steps(value)]
    if isinstance(node, str) and node.startswith(("{", "[")):
        try:
            return _find_steps(json.loads(node))
        except ValueError:
            return []
    return []
