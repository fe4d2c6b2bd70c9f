"""Zero-shot classification of an image set, as Chinese-CLIP's `zeroshot_evaluation.py` scores it.

The set is read in any layout of `classification_set` (ELEVATER, a label file, class-named folders).
Each class embedding is the mean of the L2-normalised embeddings of its prompts (the class name put
into every template of the set's templates), normalised again: the reference's template ensembling.
Images are classified by their dot product with the class embeddings (the reference's softmax of
100 times that product ranks the classes alike).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from zhclip.components.core.errors import ZhclipError
from zhclip.components.core.progress import progress_bar
from zhclip.components.core.settings import setting
from zhclip.components.core.summaries import timed, write_summary
from zhclip.components.core.tracking import run_to_log_into
from zhclip.components.evaluation import report
from zhclip.components.evaluation.classification_set import ClassificationSet, read_classification_set
from zhclip.components.evaluation.retrieval import accelerated, top_k
from zhclip.components.evaluation.templates import templates_for
from zhclip.model import embed_images, embed_texts, load_model

EXAMPLES_PER_CLASS = 5


@dataclass
class ZeroshotConfig:
    """Section `zeroshot`: prompts and image sets of zero-shot classification."""

    templates: list[str] = setting(
        [],
        "prompts, each with one '{}' for the class name; empty: the set's own, by its folder name, as "
        "Chinese-CLIP's zeroshot_evaluation.py chooses them (food-101 its food prompts, any other name the "
        "183 'openai' ones)",
    )
    template_set: str = setting(
        "", "instead of the choice by folder name, one of Chinese-CLIP's named lists (openai, food, imagenet, ...)"
    )
    split: str = setting("test", "the folder of a set with a label file that holds its images (ELEVATER: test)")
    label_file: str = setting(
        "", "class names, one a line in sorted class-folder order; empty: the set's label_cn.txt when it has one"
    )
    batch_size: int = setting(256, "images or prompts embedded at once")
    sets: list[str] = setting(
        ["digits", "shapes"],
        "image sets the pipelines classify: data/raw/zeroshot/<set> (dvc.yaml's zeroshot stages and the "
        "Kubeflow pipeline's zero-shot tasks); `zhclip zeroshot --images` takes any folder instead",
    )

    def __post_init__(self):
        bad = [t for t in self.templates if t.count("{}") != 1]
        if bad:
            raise ValueError(f"templates must be strings with exactly one '{{}}' each; bad: {bad}")


def _prompt(template: str, name: str) -> str:
    # The reference's `_preprocess_text`: lower case, Chinese quotes as ASCII quotes.
    return template.format(name).lower().replace("“", '"').replace("”", '"')


def class_embeddings(
    model, processor, classes: Sequence[str], templates: Sequence[str], batch_size: int = 256
) -> np.ndarray:
    """One unit-norm embedding per class: the renormalised mean of its normalised prompt embeddings."""
    prompts = [_prompt(template, name) for name in classes for template in templates]
    per_prompt = embed_texts(model, processor, prompts, batch_size).reshape(len(classes), len(templates), -1)
    mean = per_prompt.mean(axis=1)
    return mean / np.linalg.norm(mean, axis=1, keepdims=True)


def confusion_counts(labels: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """How many images of each class (row) were predicted as each class (column), as sklearn's
    confusion_matrix counts them; written here because importing sklearn.metrics alone costs 1.3 s of
    every zero-shot run (2 vCPU x86)."""
    return np.bincount(labels * classes + predicted, minlength=classes**2).reshape(classes, classes)


@dataclass
class Classified:
    """A set classified: the summary's figures, the set, each image's top-5 classes and the confusion counts."""

    summary: dict[str, Any]
    dataset: ClassificationSet
    ranked: np.ndarray
    matrix: np.ndarray


def classify(model_dir: str | Path, images_dir: str | Path, config: ZeroshotConfig) -> Classified:
    """Classify every image of the set (a folder or s3:// prefix): top-1/top-5 and per-class accuracy
    (percent), nothing written."""
    dataset = read_classification_set(str(images_dir), config.split, config.label_file)
    template_set, templates = templates_for(dataset.name, config.template_set, config.templates)
    try:
        model, processor = load_model(model_dir)
    except (FileNotFoundError, OSError) as err:
        raise ZhclipError(f"cannot load model from {model_dir}: {err}") from err
    classes, labels = dataset.classes, dataset.labels
    summary: dict[str, Any] = {
        "model_dir": str(model_dir),
        "images_dir": str(images_dir),
        "dataset": dataset.name,
        "layout": dataset.layout,
        "classes": len(classes),
        "images": len(dataset.files),
        "ignored_files": dataset.ignored,
        "template_set": template_set,
        "templates": len(templates),
    }
    with timed(summary):
        with accelerated(model):
            weights = class_embeddings(model, processor, classes, templates, config.batch_size)
            image_embeddings = _embed_set(model, processor, dataset, config.batch_size, Path(model_dir).name)
        ranked = top_k(image_embeddings, weights, 5)
    predicted = ranked[:, 0]
    summary |= {
        "top1": _percent(predicted == labels),
        "top5": _percent((ranked == labels[:, None]).any(axis=1)),
        "chance_top1": round(100.0 / len(classes), 4),
        "per_class_accuracy": {name: _percent(predicted[labels == c] == c) for c, name in enumerate(classes)},
    }
    return Classified(summary, dataset, ranked, confusion_counts(labels, predicted, len(classes)))


def zeroshot(
    model_dir: str | Path,
    images_dir: str | Path,
    config: ZeroshotConfig,
    summary_path: str | Path | None = None,
    predictions_path: str | Path | None = None,
    report_dir: str | Path | None = None,
    mlflow_run_id: str | None = None,
) -> dict[str, Any]:
    """`classify`, with its outputs; returns the summary.

    Optional outputs: one CSV row per image (path, actual, predicted) for DVC's confusion plot, an
    HTML/Markdown report with the confusion matrix, and the metrics and report logged to an existing MLflow run
    (`mlflow_run_id`; by default the run that trained the model, when recorded).
    """
    result = classify(model_dir, images_dir, config)
    summary, dataset, classes = result.summary, result.dataset, result.dataset.classes
    if summary_path:
        write_summary(summary_path, summary)
    if predictions_path:
        actual, predicted = dataset.labels, result.ranked[:, 0]
        _write_predictions(
            predictions_path, dataset.files, [classes[i] for i in actual], [classes[i] for i in predicted]
        )
    artifacts = report.write(_report(summary, dataset, result.ranked, result.matrix), report_dir) if report_dir else []
    run = run_to_log_into(mlflow_run_id, model_dir)
    if run:
        name = dataset.name
        report.log_to_mlflow(
            run, {f"zeroshot_{name}_{k}": summary[k] for k in ("top1", "top5")}, artifacts, f"zeroshot_{name}"
        )
    return summary


def _embed_set(model, processor, dataset: ClassificationSet, batch_size: int, model_name: str) -> np.ndarray:
    """The images' embeddings, decoding one batch at a time (a set of any size fits in memory)."""
    chunks = [
        embed_images(
            model,
            processor,
            [dataset.open(i) for i in range(start, min(start + batch_size, len(dataset.files)))],
            batch_size,
        )
        for start in progress_bar(
            range(0, len(dataset.files), batch_size), unit="batch", desc=f"zero-shot {dataset.name} with {model_name}"
        )
    ]
    return np.concatenate(chunks)


def _percent(hits: np.ndarray) -> float:
    return round(100.0 * float(np.mean(hits)), 4) if hits.size else 0.0


def _write_predictions(path: str | Path, files: Sequence[str], actual: Sequence[str], predicted: Sequence[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(["image", "actual", "predicted"])
        writer.writerows(zip(files, actual, predicted))
    return path


def _report(
    summary: dict[str, Any], dataset: ClassificationSet, ranked: np.ndarray, matrix: np.ndarray
) -> report.Report:
    classes, labels = dataset.classes, dataset.labels
    accuracy = [
        ["", "top-1", "top-5", "chance (top-1)"],
        ["accuracy (%)", f"{summary['top1']:.2f}", f"{summary['top5']:.2f}", f"{summary['chance_top1']:.2f}"],
    ]
    per_class = [["class", "images", "accuracy (%)"]] + [
        [name, int(matrix[c].sum()), f"{summary['per_class_accuracy'][name]:.2f}"] for c, name in enumerate(classes)
    ]
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    confusion = report.Table(
        "Confusion matrix (rows: actual, columns: predicted)",
        [["actual \\ predicted"] + classes] + [[name] + row for name, row in zip(classes, matrix.tolist())],
        shading=rates.tolist(),
    )
    examples = []
    for c, name in enumerate(classes):
        rows = np.flatnonzero(labels == c)[:EXAMPLES_PER_CLASS]
        examples.append(
            report.Example(
                query=name,
                results=[
                    report.Result(
                        label=f"→ {classes[ranked[row, 0]]}",
                        hit=bool(ranked[row, 0] == c),
                        image=dataset.open(int(row)),
                    )
                    for row in rows
                ],
            )
        )
    return report.Report(
        title="zhclip zero-shot classification",
        notes={
            key: summary[key]
            for key in ("model_dir", "images_dir", "layout", "classes", "images", "template_set", "templates")
        },
        tables=[report.Table("Accuracy", accuracy), report.Table("Per-class accuracy", per_class), confusion],
        figures=[
            report.Figure(
                "Top-1 accuracy per class",
                report.bar_plot(summary["per_class_accuracy"], "top-1 accuracy (%)", summary["chance_top1"], "chance"),
            )
        ],
        examples=examples,
        examples_title="Images per class with their top-1 prediction (correct marked ✓)",
    )
