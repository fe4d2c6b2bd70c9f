"""Lineage facts attached to runs and model versions: the code's git commit and the data's DVC hash."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from zhclip.components.core.errors import ZhclipError
from zhclip.components.core.storage import arrow_filesystem


def git_commit(repo_dir: str | Path = ".") -> str:
    """The checked-out commit, with `-dirty` when tracked files differ from it; "unknown" outside git."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo_dir), *args], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _file_md5(filesystem, path: str) -> str:
    digest = hashlib.md5()
    with filesystem.open_input_stream(path) as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# What a training run writes about itself into the model folder it exports: its MLflow run and its
# step history (with timings). Two runs that trained the same weights differ in these files only.
RUN_FILE = "mlflow_run.json"
HISTORY_FILE = "training_history.json"
# Beside the model in each of its checkpoints: the optimizer, schedule, RNG and progress (the
# exported folder drops it once the driver has read the progress).
TRAINING_STATE_FILE = "training_state.pt"


def weights_hash(model_dir: str | Path) -> str:
    """The DVC-style hash of a model folder without the training run's own records (RUN_FILE,
    HISTORY_FILE): equal for every run that trained the same model, which the folder's hash is not."""
    return dvc_hash(model_dir, leave_out=(RUN_FILE, HISTORY_FILE))


def dvc_hash(path: str | Path, leave_out: tuple[str, ...] = ()) -> str:
    """The md5 DVC records for `path` in dvc.lock (`<md5>.dir` for a folder), computed from the files;
    `path` may be a local path or an s3:// URI; `leave_out`: files of the folder (relative paths) not hashed.

    DVC's own API only hashes paths inside a DVC repository with its cache; KFP components and Ray
    workers see plain folders or buckets, so the same recipe (md5 of the sorted `{md5, relpath}` JSON
    list) is computed here. A test checks it against what DVC writes.
    """
    from pyarrow import fs

    filesystem, root = arrow_filesystem(str(path))
    kind = filesystem.get_file_info(root).type
    if kind == fs.FileType.NotFound:
        raise ZhclipError(f"{path} not found; nothing to hash")
    if kind == fs.FileType.File:
        return _file_md5(filesystem, root)
    files = [
        info.path
        for info in filesystem.get_file_info(fs.FileSelector(root, recursive=True))
        if info.type == fs.FileType.File
    ]
    entries = sorted(
        ({"md5": _file_md5(filesystem, file), "relpath": file[len(root) :].lstrip("/")} for file in files),
        key=lambda entry: entry["relpath"],
    )
    entries = [entry for entry in entries if entry["relpath"] not in leave_out]
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"
