"""The published results of Chinese-CLIP beside zhclip's: its retrieval recalls and zero-shot top-1 per
model size and dataset, zero-shot and fine-tuned, as the data file `published_chinese_clip.csv` ships
them (each row names its source: Results.md of OFA-Sys/Chinese-CLIP at a fixed commit).

Metric names are the benchmark's: `t2i_r1` ... `i2t_r10`, `t2i_mean_recall` (MUGE's published "MR"),
`mean_recall` (the mean of the six recalls, derived here where all six are published: the paper gives
no such figure for Flickr30K-CN and COCO-CN) and `top1`.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import cache
from pathlib import Path

PUBLISHED_FILE = Path(__file__).with_name("published_chinese_clip.csv")
# zhclip's preset -> the model's name in the published tables (model/presets.py names the same sizes)
PUBLISHED_MODEL = {
    "RN50": "RN50",
    "ViT-B-16": "ViT-B/16",
    "ViT-L-14": "ViT-L/14",
    "ViT-L-14-336": "ViT-L/14@336px",
    "ViT-H-14": "ViT-H/14",
}
SETUPS = ("zeroshot", "finetune")
_METRIC = {"R@1": "r1", "R@5": "r5", "R@10": "r10"}


@dataclass(frozen=True)
class PublishedFigures:
    """One model and dataset's published figures: setup ("zeroshot"/"finetune") -> metric -> value."""

    model: str
    dataset: str
    figures: dict[str, dict[str, float]]
    source: str


@cache
def _rows() -> tuple[dict[str, str], ...]:
    with PUBLISHED_FILE.open(encoding="utf-8", newline="") as table:
        return tuple(csv.DictReader(table))


def published_model(preset: str) -> str | None:
    """The published model of the same size as `preset`, None when Chinese-CLIP released none (tiny)."""
    return PUBLISHED_MODEL.get(preset)


def published_figures(preset: str, dataset: str) -> PublishedFigures | None:
    """The published figures for the preset's size on `dataset` (its name in the tables, e.g. MUGE,
    Flickr30K-CN, CIFAR100, or its ELEVATER folder name, e.g. cifar-100; any case), None if none."""
    model = published_model(preset)
    wanted = dataset.casefold()
    rows = [
        row
        for row in _rows()
        if row["model"] == model and wanted in (row["dataset"].casefold(), row["folder"].casefold())
    ]
    if not rows:
        return None
    figures: dict[str, dict[str, float]] = {}
    for row in rows:
        figures.setdefault(row["setup"], {})[_metric_name(row)] = float(row["value"])
    for values in figures.values():
        names = [f"{direction}_{k}" for direction in ("t2i", "i2t") for k in ("r1", "r5", "r10")]
        if all(name in values for name in names):
            values["mean_recall"] = round(sum(values[name] for name in names) / len(names), 4)
    return PublishedFigures(rows[0]["model"], rows[0]["dataset"], figures, rows[0]["source"])


def _metric_name(row: dict[str, str]) -> str:
    if row["task"] == "classification":
        return row["metric"]
    if row["metric"] == "MR":
        return f"{row['task']}_mean_recall"
    return f"{row['task']}_{_METRIC[row['metric']]}"
