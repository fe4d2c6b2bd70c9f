"""Lineage facts attached to runs and model versions: the code's git commit and the data's DVC hash."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path


def git_commit(repo_dir: str | Path = ".") -> str:
    """The checked-out commit, with `-dirty` when tracked files differ from it; "unknown" outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo_dir), *args], capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def dvc_hash(path: str | Path) -> str:
    """The md5 DVC records for `path` in dvc.lock (`<md5>.dir` for a folder), computed from the files.

    DVC's own API only hashes paths inside a DVC repository with its cache; KFP components and Ray
    workers see plain folders, so the same recipe (md5 of the sorted `{md5, relpath}` JSON list) is
    computed here. A test checks it against dvc.lock.
    """
    path = Path(path)
    if path.is_file():
        return _file_md5(path)
    entries = [{"md5": _file_md5(file), "relpath": file.relative_to(path).as_posix()}
               for file in sorted(path.rglob("*")) if file.is_file()]
    entries.sort(key=lambda entry: entry["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"
