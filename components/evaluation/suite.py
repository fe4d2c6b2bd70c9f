"""The benchmark suite's table: every model's figures on every dataset (the `zhclip benchmark` results),
the suite's means, and Chinese-CLIP's published figures for the same model size beside them.

Written as one metrics JSON (`dvc metrics diff` compares suites across experiments) and one HTML
report; `zhclip results` prints the same table.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from zhclip.components.core.errors import ZhclipError
from zhclip.components.core.summaries import write_summary
from zhclip.components.evaluation import report
from zhclip.components.evaluation.published import published_figures, published_model
from zhclip.components.evaluation.suite_config import PRIMARY, RETRIEVAL, RETRIEVAL_METRICS, SuiteDataset

RESULT_FILE = "{results}/{model}/{dataset}.json"  # where dvc.yaml's benchmark stages write
ZEROSHOT_METRICS = ("top1", "top5")
SHOWN = {RETRIEVAL: ("mean_recall", *RETRIEVAL_METRICS[:6]), "zeroshot": ZEROSHOT_METRICS}
LABELS = {"mean_recall": "mean recall", "top1": "top-1", "top5": "top-5"} | {
    f"{d}_r{k}": f"{d.upper()} R@{k}" for d in ("t2i", "i2t") for k in (1, 5, 10)
}


def read_results(results_dir: str | Path, models: Sequence[str], datasets: Sequence[SuiteDataset]) -> dict:
    """model -> dataset -> that benchmark step's summary; fails naming the stage a missing one needs."""
    found: dict[str, dict[str, dict]] = {}
    for model in models:
        for number, dataset in enumerate(datasets):
            path = Path(RESULT_FILE.format(results=results_dir, model=model, dataset=dataset.name))
            if not path.is_file():
                raise ZhclipError(
                    f"{path} is missing: run `zhclip benchmark --model models/{model} --dataset {dataset.name} "
                    f"--out {path}` (dvc.yaml's stage benchmark@{model}-suite{number})"
                )
            found.setdefault(model, {})[dataset.name] = json.loads(path.read_text(encoding="utf-8"))
    return found


def suite_summary(results: dict, datasets: Sequence[SuiteDataset], preset: str) -> dict[str, Any]:
    """Each model's figures per dataset with the suite's means (of the datasets' scores: mean recall or
    top-1; per task and overall), and the published figures of the preset's size where there are any."""
    models = {
        model: {
            **{d.name: {key: by_dataset[d.name][key] for key in SHOWN[d.task]} for d in datasets},
            **_means(by_dataset, datasets),
        }
        for model, by_dataset in results.items()
    }
    published = {}
    for dataset in datasets:
        figures = published_figures(preset, dataset.published or dataset.name)
        if figures:
            published[dataset.name] = {"model": figures.model, "dataset": figures.dataset} | figures.figures
    return {
        "preset": preset,
        "tasks": {dataset.name: dataset.task for dataset in datasets},
        "published_model": published_model(preset),
        "published_source": _source(preset, datasets),
        "models": models,
        "published": published,
    }


def _means(by_dataset: dict[str, dict], datasets: Sequence[SuiteDataset]) -> dict[str, float]:
    means = {"suite_mean": _mean([by_dataset[d.name]["score"] for d in datasets])}
    for task in PRIMARY:
        scores = [by_dataset[d.name]["score"] for d in datasets if d.task == task]
        if scores:
            means[f"{task}_mean"] = _mean(scores)
    return means


def _mean(values: list[float]) -> float:
    return round(float(np.mean(values)), 4)


def _source(preset: str, datasets: Sequence[SuiteDataset]) -> str | None:
    for dataset in datasets:
        figures = published_figures(preset, dataset.published or dataset.name)
        if figures:
            return figures.source
    return None


def table_rows(summary: dict[str, Any], every_figure: bool = True) -> list[list[str]]:
    """The suite as a table: a row per dataset and figure (or only its score: mean recall or top-1), a
    column per model, then the published zero-shot and fine-tuned figures of the same size with the
    last model's difference to them, and the suite's means."""
    models, with_published = list(summary["models"]), bool(summary["published"])
    published_columns = ["published zero-shot", "Δ", "published fine-tuned", "Δ"] if with_published else []
    rows = [["dataset", "figure", *models, *published_columns]]
    for name, task in summary["tasks"].items():
        published = summary["published"].get(name, {})
        for key in SHOWN[task] if every_figure else (PRIMARY[task],):
            ours = [summary["models"][model][name][key] for model in models]
            row = [name, LABELS[key], *(f"{value:.2f}" for value in ours)]
            for setup in ("zeroshot", "finetune") if with_published else ():
                theirs = published.get(setup, {}).get(key)
                row += ["", ""] if theirs is None else [f"{theirs:.1f}", f"{ours[-1] - theirs:+.2f}"]
            rows.append(row)
    for key in ("suite_mean", *(f"{task}_mean" for task in PRIMARY)):
        if key in summary["models"][models[0]]:
            rows.append(["suite", key.replace("_", " "), *(f"{summary['models'][m][key]:.2f}" for m in models)])
    return rows


def published_note(summary: dict[str, Any]) -> str:
    """Which published figures the table shows, or why it shows none."""
    if summary["published_model"] is None:
        return f"Chinese-CLIP published no model of preset {summary['preset']!r}: no published columns"
    if not summary["published"]:
        return f"no dataset of the suite has published figures for {summary['published_model']}"
    return f"published: Chinese-CLIP {summary['published_model']}, {summary['published_source']}"


def write_suite(
    results_dir: str | Path,
    models: Sequence[str],
    datasets: Sequence[SuiteDataset],
    preset: str,
    summary_path: str | Path | None = None,
    report_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Gather the benchmark results into the suite's summary (and its metrics JSON and HTML report)."""
    summary = suite_summary(read_results(results_dir, models, datasets), datasets, preset)
    if summary_path:
        write_summary(summary_path, summary)
    if report_dir:
        report.write(_report(summary, datasets), report_dir)
    return summary


def _report(summary: dict[str, Any], datasets: Sequence[SuiteDataset]) -> report.Report:
    last = list(summary["models"])[-1]
    scores = {d.name: summary["models"][last][d.name][PRIMARY[d.task]] for d in datasets}
    return report.Report(
        title="zhclip benchmark suite",
        notes={
            "preset": summary["preset"],
            "published": published_note(summary),
            "models": ", ".join(summary["models"]),
        },
        tables=[report.Table("The suite (percent)", table_rows(summary))],
        figures=[report.Figure(f"{last}: each dataset's score (mean recall or top-1)", report.bar_plot(scores, "%"))],
    )
