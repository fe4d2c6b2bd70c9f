"""Section `benchmark`: the suite's datasets (params `benchmark.suite`), checked, and the models the
pipelines score on it.

Apart from the scoring (benchmark.py), which loads torch and the model library: the suite's table
(`zhclip suite`), the registration gate and the Kubeflow pipeline read the suite without them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

from zhclip.components.core.errors import ZhclipError
from zhclip.components.core.settings import setting

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
