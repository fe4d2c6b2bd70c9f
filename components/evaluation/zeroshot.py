"""Zero-shot classification over an image folder (`<root>/<class name>/<image>`), as Chinese-CLIP scores it.

Each class embedding is the mean of the L2-normalised embeddings of its prompts (the class name put
into every template), normalised again: the template ensembling of the reference's
`zeroshot_evaluation.py`. Images are classified by their dot product with the class embeddings.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from zhclip.components.core.errors import ZhclipError
from zhclip.components.core.progress import progress_bar
from zhclip.components.core.settings import setting
from zhclip.components.core.summaries import timed, write_summary
from zhclip.components.core.tracking import run_to_log_into
from zhclip.components.evaluation import report
from zhclip.components.evaluation.retrieval import accelerated, top_k
from zhclip.model import embed_images, embed_texts, load_model

# A subset of the Chinese prompts the reference ships (`eval/cvinw_zeroshot_templates.py`, openai_templates).
DEFAULT_TEMPLATES = [
    "{}的照片",
    "一张包含{}的照片",
    "{}的图片",
    "一张清晰的{}的照片",
    "{}的特写照片",
    "{}的低分辨率照片",
    "{}的黑白照片",
    "{}的手绘画",
    "{}的渲染",
    "我的{}的照片",
]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
EXAMPLES_PER_CLASS = 5


@dataclass
class ZeroshotConfig:
    """Section `zeroshot`: prompts and image sets of zero-shot classification."""

    templates: list[str] = setting(list(DEFAULT_TEMPLATES), "each with one '{}' for the class name")
    batch_size: int = setting(256, "images or prompts embedded at once")
    sets: list[str] = setting(
        ["digits", "shapes"],
        "image sets the pipelines classify: data/raw/zeroshot/<set> (dvc.yaml's zeroshot stages and the "
        "Kubeflow pipeline's zero-shot tasks); `zhclip zeroshot --images` takes any folder instead",
    )

    def __post_init__(self):
        bad = [t for t in self.templates if t.count("{}") != 1]
        if not self.templates or bad:
            raise ValueError(f"templates must be a non-empty list of strings with exactly one '{{}}' each; bad: {bad}")


def image_folder(root: str | Path) -> tuple[list[str], list[Path], np.ndarray]:
    """Class names (sorted subfolder names), image paths and their class indices."""
    root = Path(root)
    if not root.is_dir():
        raise ZhclipError(f"{root} is not a folder; expected <root>/<class name>/<images>")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise ZhclipError(f"{root} needs at least two class subfolders, found {classes}")
    paths, labels = [], []
    for index, name in enumerate(classes):
        found = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise ZhclipError(f"{root / name} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        paths += found
        labels += [index] * len(found)
    return classes, paths, np.array(labels, dtype=np.int64)


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ZhclipError(f"{path}: not a readable image ({err}); remove or replace it") from err


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


def zeroshot(
    model_dir: str | Path,
    images_dir: str | Path,
    config: ZeroshotConfig,
    summary_path: str | Path | None = None,
    predictions_path: str | Path | None = None,
    report_dir: str | Path | None = None,
    mlflow_run_id: str | None = None,
) -> dict[str, Any]:
    """Classify every image of the folder; returns top-1/top-5 and per-class accuracy (percent).

    Optional outputs: one CSV row per image (path, actual, predicted) for DVC's confusion plot, an
    HTML/Markdown report with the confusion matrix, and the metrics and report logged to an existing MLflow run
    (`mlflow_run_id`; by default the run that trained the model, when recorded).
    """
    classes, paths, labels = image_folder(images_dir)
    try:
        model, processor = load_model(model_dir)
    except (FileNotFoundError, OSError) as err:
        raise ZhclipError(f"cannot load model from {model_dir}: {err}") from err
    summary: dict[str, Any] = {
        "model_dir": str(model_dir),
        "images_dir": str(images_dir),
        "classes": len(classes),
        "images": len(paths),
        "templates": len(config.templates),
    }
    with timed(summary):
        with accelerated(model):
            weights = class_embeddings(model, processor, classes, config.templates, config.batch_size)
            chunks = [
                embed_images(
                    model, processor, [_open(p) for p in paths[start : start + config.batch_size]], config.batch_size
                )
                for start in progress_bar(
                    range(0, len(paths), config.batch_size),
                    unit="batch",
                    desc=f"zero-shot {Path(images_dir).name} with {Path(model_dir).name}",
                )
            ]
        ranked = top_k(np.concatenate(chunks), weights, 5)
    predicted = ranked[:, 0]
    matrix = confusion_counts(labels, predicted, len(classes))
    per_class = {name: round(100.0 * float(np.mean(predicted[labels == c] == c)), 4) for c, name in enumerate(classes)}
    summary |= {
        "top1": round(100.0 * float(np.mean(predicted == labels)), 4),
        "top5": round(100.0 * float(np.mean((ranked == labels[:, None]).any(axis=1))), 4),
        "chance_top1": round(100.0 / len(classes), 4),
        "per_class_accuracy": per_class,
    }
    if summary_path:
        write_summary(summary_path, summary)
    if predictions_path:
        _write_predictions(
            predictions_path, paths, images_dir, [classes[i] for i in labels], [classes[i] for i in predicted]
        )
    artifacts = report.write(_report(summary, classes, paths, labels, ranked, matrix), report_dir) if report_dir else []
    run = run_to_log_into(mlflow_run_id, model_dir)
    if run:
        name = Path(images_dir).name
        report.log_to_mlflow(
            run, {f"zeroshot_{name}_{k}": summary[k] for k in ("top1", "top5")}, artifacts, f"zeroshot_{name}"
        )
    return summary


def _write_predictions(
    path: str | Path, paths: Sequence[Path], root: str | Path, actual: Sequence[str], predicted: Sequence[str]
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(["image", "actual", "predicted"])
        writer.writerows([p.relative_to(root).as_posix(), a, b] for p, a, b in zip(paths, actual, predicted))
    return path


def _report(
    summary: dict[str, Any],
    classes: list[str],
    paths: list[Path],
    labels: np.ndarray,
    ranked: np.ndarray,
    matrix: np.ndarray,
) -> report.Report:
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
                        label=f"→ {classes[ranked[row, 0]]}", hit=bool(ranked[row, 0] == c), image=_open(paths[row])
                    )
                    for row in rows
                ],
            )
        )
    return report.Report(
        title="zhclip zero-shot classification",
        notes={key: summary[key] for key in ("model_dir", "images_dir", "classes", "images", "templates")},
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
