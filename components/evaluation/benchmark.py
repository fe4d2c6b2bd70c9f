"""The `zhclip benchmark` step: one model scored on one dataset of the benchmark suite.

The suite (params `benchmark.suite`) lists the paper's kind of table: retrieval datasets, scored with
text-to-image and image-to-text R@1/5/10 and mean recall as `zhclip evaluate` scores them, and
zero-shot classification sets, scored with top-1/top-5 as `zhclip zeroshot` does. A retrieval dataset
is a split as Chinese-CLIP distributes MUGE, Flickr30K-CN and COCO-CN (`{split}_imgs.tsv` +
`{split}_texts.jsonl`) or a prepared split (data/validated); a zero-shot set any layout of
`classification_set` (ELEVATER, a label file, class folders). Each (model, dataset) is a step of its
own, so DVC re-scores only what changed; `suite.py` gathers them into the suite's table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from zhclip.components.core.errors import ZhclipError
from zhclip.components.core.settings import setting
from zhclip.components.core.summaries import timed, write_summary
from zhclip.components.data.shards import PreparedSplit
from zhclip.components.evaluation.cnclip_split import embed_cnclip_split, is_cnclip_split
from zhclip.components.evaluation.retrieval import accelerated, metrics_of, rank
from zhclip.components.evaluation.split_embedding import embed_split
from zhclip.components.evaluation.zeroshot import ZeroshotConfig, classify
from zhclip.model import load_model

RETRIEVAL, ZEROSHOT = "retrieval", "zeroshot"
# the figure a dataset is ranked, averaged and gated on
PRIMARY = {RETRIEVAL: "mean_recall", ZEROSHOT: "top1"}
RETRIEVAL_METRICS = (*(f"{d}_r{k}" for d in ("t2i", "i2t") for k in (1, 5, 10)), "t2i_mean_recall", "i2t_mean_recall")
NAME = re.compile(r"^\w[\w.-]*$")  # a file name and part of an MLflow metric name as it stands (数字 too)


@dataclass(frozen=True)
class SuiteDataset:
    """One dataset of the suite, as params `benchmark.suite` lists it."""

    name: str
    task: str  # retrieval or zeroshot
    path: str  # local or s3://
    split: str = "test"  # retrieval: the split's files or prepared folder; zero-shot: the images' folder
    label_file: str = ""  # zero-shot: the class names (default: the set's label_cn.txt, else folder names)
    template_set: str = ""  # zero-shot: one of Chinese-CLIP's lists instead of the choice by folder name
    published: str = ""  # the dataset's name in Chinese-CLIP's published tables (default: name)


DEMO_SUITE = [
    {"name": "demo-test", "task": RETRIEVAL, "path": "data/validated", "split": "test"},
    {"name": "demo-unseen", "task": RETRIEVAL, "path": "data/raw/benchmark/unseen", "split": "test"},
    {"name": "digits", "task": ZEROSHOT, "path": "data/raw/zeroshot/digits"},
    {"name": "shapes", "task": ZEROSHOT, "path": "data/raw/zeroshot/shapes"},
]


@dataclass
class BenchmarkConfig:
    """Section `benchmark`: the benchmark suite and the models the pipelines score on it."""

    suite: list[dict] = setting(
        DEMO_SUITE,
        "the datasets, each {name, task: retrieval or zeroshot, path, split, label_file, template_set, "
        "published}; docs/evaluation.md shows MUGE, Flickr30K-CN, COCO-CN and ELEVATER",
    )
    models: list[str] = setting(
        ["start", "stage1", "stage2"],
        "models/<name> dvc.yaml's benchmark stages score, each one the pipeline makes (start, start.stages); "
        "the Kubeflow pipeline scores the start and its final model",
    )
    batch_size: int = setting(256, "images or texts embedded at once")

    def __post_init__(self):
        suite_datasets(self.suite)

    def dataset(self, name: str) -> SuiteDataset:
        """The suite's dataset called `name`."""
        found = {dataset.name: dataset for dataset in suite_datasets(self.suite)}
        if name not in found:
            raise ZhclipError(f"benchmark.suite has no dataset {name!r}; it has {', '.join(found) or 'none'}")
        return found[name]


def suite_datasets(suite: list[dict]) -> list[SuiteDataset]:
    """The suite's entries checked: known keys, a name, task and path each, names unique."""
    known = {field.name for field in fields(SuiteDataset)}
    datasets: list[SuiteDataset] = []
    for number, entry in enumerate(suite, start=1):
        where = f"benchmark.suite entry {number}"
        if not isinstance(entry, dict):
            raise ZhclipError(f"{where}: expected {{name, task, path, ...}}, got {entry!r}")
        unknown, missing = set(entry) - known, {"name", "task", "path"} - set(entry)
        if unknown or missing:
            raise ZhclipError(
                f"{where}: unknown keys {sorted(unknown)}, missing {sorted(missing)} (keys: {sorted(known)})"
            )
        dataset = SuiteDataset(**{key: str(value) for key, value in entry.items()})
        if not NAME.match(dataset.name):
            raise ZhclipError(
                f"{where}: name {dataset.name!r} must be letters (of any script), digits, '.', '_' or '-'"
            )
        if dataset.task not in PRIMARY:
            raise ZhclipError(f"{where} ({dataset.name}): task {dataset.task!r} is neither {RETRIEVAL} nor {ZEROSHOT}")
        if dataset.name in {d.name for d in datasets}:
            raise ZhclipError(f"{where}: a second dataset named {dataset.name!r}")
        datasets.append(dataset)
    return datasets


def benchmark(
    model_dir: str | Path, dataset: SuiteDataset, batch_size: int = 256, summary_path: str | Path | None = None
) -> dict[str, Any]:
    """The model's figures on the dataset: retrieval recalls or zero-shot accuracies, and its `score`
    (mean recall or top-1) that the suite averages and the gate compares."""
    summary: dict[str, Any] = {
        "model_dir": str(model_dir),
        "dataset": dataset.name,
        "task": dataset.task,
        "path": dataset.path,
        "split": dataset.split,
    }
    with timed(summary):
        figures = (
            _retrieval(model_dir, dataset, batch_size)
            if dataset.task == RETRIEVAL
            else _zeroshot(model_dir, dataset, batch_size)
        )
    summary |= figures | {"score": figures[PRIMARY[dataset.task]]}
    if summary_path:
        write_summary(summary_path, summary)
    return summary


def _retrieval(model_dir: str | Path, dataset: SuiteDataset, batch_size: int) -> dict[str, Any]:
    in_cnclip_layout = is_cnclip_split(dataset.path, dataset.split)
    if not in_cnclip_layout:
        try:
            PreparedSplit.open(dataset.path, dataset.split)
        except ZhclipError as err:
            raise ZhclipError(
                f"{dataset.name}: {dataset.path} holds neither {dataset.split}_imgs.tsv and "
                f"{dataset.split}_texts.jsonl (Chinese-CLIP's layout) nor a prepared split ({err})"
            ) from err
    try:
        model, processor = load_model(model_dir)
    except (FileNotFoundError, OSError) as err:
        raise ZhclipError(f"cannot load model from {model_dir}: {err}") from err
    with accelerated(model):
        if in_cnclip_layout:
            data = embed_cnclip_split(model, processor, dataset.path, dataset.split, batch_size)
        else:
            data = embed_split(model, processor, dataset.path, dataset.split, batch_size).data
    rankings = rank(data.text_emb, data.image_emb, data.text_to_images)
    return {"texts": len(data.text_ids), "images": len(data.image_ids)} | metrics_of(
        rankings, len(data.image_ids), len(data.text_ids)
    )


def _zeroshot(model_dir: str | Path, dataset: SuiteDataset, batch_size: int) -> dict[str, Any]:
    config = ZeroshotConfig(
        template_set=dataset.template_set, split=dataset.split, label_file=dataset.label_file, batch_size=batch_size
    )
    result = classify(model_dir, dataset.path, config).summary
    keys = ("layout", "classes", "images", "template_set", "templates", "top1", "top5", "chance_top1")
    return {key: result[key] for key in keys}
