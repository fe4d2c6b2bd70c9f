"""One training stage (`zhclip train --stage stage2`) under Ray settings of the local instance, each
`--runs` times: its wall time, and the CPU time (user + system) of every process it started, read every
0.1 s with bench.measure.cpu_of_command (Ray's processes outlive their parent's wait).

    PYTHONPATH=. python bench/investigations/2026-12-07-train-stage-ray-env/measure.py PROJECT --runs 2

PROJECT is a project where `dvc repro` ran (tests/conftest.py's SMALL_PROJECT_PARAMS).
"""

import argparse
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from bench.measure import cpu_of_command

VARIANTS = {
    "as shipped": {},
    "no idle workers at start": {"RAY_prestart_worker_first_driver": "0"},
    "no Ray Train metrics": {"RAY_TRAIN_METRICS_ENABLED": "0"},
    "both": {"RAY_prestart_worker_first_driver": "0", "RAY_TRAIN_METRICS_ENABLED": "0"},
}
ZHCLIP = "import sys; sys.argv = ['zhclip'] + sys.argv[1:]; from zhclip.components.cli import main; main()"


def _kind(label: str) -> str:
    """A process's kind: Ray's process title (ray::X), or the program it runs."""
    if label.startswith("ray::"):
        return label.split()[0]
    if "-c import sys" in label:
        return "the zhclip driver"
    words = [Path(word).name for word in label.split() if word.endswith((".py", "server", "raylet"))]
    return words[0] if words else label[:40]


def run_once(project: Path, env: dict[str, str], scratch: Path) -> tuple[float, dict[str, float]]:
    command = [sys.executable, "-c", ZHCLIP, "train", "--stage", "stage2", "--data", "data/validated",
               "--init", "models/stage1", "--out", str(scratch / "stage2"), "--summary", str(scratch / "s.json"),
               "--set", f"train.storage_path={scratch / 'ray'}"]  # fmt: skip
    code, wall, seen = cpu_of_command(command, settle_s=1, cwd=project, env={**os.environ, **env})
    assert code == 0, f"exit {code}"
    by_kind: dict[str, float] = defaultdict(float)
    for cpu, label in seen.values():
        by_kind[_kind(label)] += cpu
    return wall, by_kind


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("project", type=Path)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    for name, env in VARIANTS.items():
        for run in range(1, args.runs + 1):
            with tempfile.TemporaryDirectory() as scratch:
                wall, by_kind = run_once(args.project, env, Path(scratch))
            total = sum(by_kind.values())
            print(f"{name}, run {run}: {wall:.1f} s wall, {total:.1f} CPU-s in all", flush=True)
            for kind, cpu in sorted(by_kind.items(), key=lambda item: -item[1]):
                print(f"  {cpu:6.2f} CPU-s  {kind}")


if __name__ == "__main__":
    main()
