"""Where `dvc repro` leaves its results, and the headline figures, for people at a terminal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# The output paths declared in dvc.yaml.
STAGE_METRICS = {1: Path("metrics/evaluate_stage1.json"), 2: Path("metrics/evaluate_stage2.json")}
REGISTER_SUMMARY = Path("metrics/register.json")


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def headline() -> str:
    """A short report: model folders, metric files, chance level, stage 1 vs stage 2, registry state."""
    lines = ["zhclip results", "  models:   models/stage1, models/stage2 (Hugging Face folders)",
             "  metrics:  metrics/*.json (dvc metrics show), plots/*.csv (dvc plots show)"]
    stages = {stage: _load(path) for stage, path in STAGE_METRICS.items()}
    if not any(stages.values()):
        return "\n".join(lines + ["  no evaluation results yet: run `dvc repro` (or `make demo`)"])
    chance = next(m["chance_mean_recall"] for m in stages.values() if m)
    lines.append(f"  test mean recall (T2I+I2T R@1/5/10, %), chance level {chance:.2f}:")
    for stage, metrics in stages.items():
        if metrics:
            lines.append(f"    stage {stage}: {metrics['mean_recall']:.2f}  ({metrics['mean_recall'] / chance:.1f}x chance; "
                         f"T2I R@1 {metrics['t2i_r1']:.1f}, I2T R@1 {metrics['i2t_r1']:.1f})")
    registered = _load(REGISTER_SUMMARY)
    if registered:
        lines.append(f"  registry: {registered['model_name']} version {registered['version']} at {registered['tracking_uri']}; "
                     f"champion is version {registered['champion_version']}")
        lines.append(f"  pull it:  mlflow.pyfunc.load_model(\"models:/{registered['model_name']}@champion\")")
    return "\n".join(lines)
