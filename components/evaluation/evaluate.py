"""The `zhclip evaluate` step: retrieval recall of a model (or of feature files in the reference's jsonl
format) on a split, written as the reference's prediction and score files beside an HTML report."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from zhclip.components.core.errors import ZhclipError
from zhclip.components.core.settings import setting
from zhclip.components.core.summaries import read_summary, timed, write_summary
from zhclip.components.core.tracking import run_to_log_into
from zhclip.components.data import cnclip_files
from zhclip.components.evaluation import report
from zhclip.components.evaluation.retrieval import (
    KS,
    Rankings,
    RetrievalSet,
    accelerated,
    first_hits,
    metrics_of,
    rank,
    recall_curves,
)
from zhclip.components.evaluation.split_embedding import embed_split
from zhclip.model import load_model

HEADLINE = ("mean_recall", *(f"{d}_r{k}" for d in ("t2i", "i2t") for k in KS))  # what the chain keeps of each model
EXAMPLE_IMAGES = 5


@dataclass
class EvaluateConfig:
    """Section `evaluate`: retrieval recall of a model on a split, and its report."""

    split: str = setting("test", "the split to score")
    batch_size: int = setting(256, "texts or images embedded at once")
    chunk_size: int = setting(
        1024, "at most this many query rows scored at once (fewer when their scores pass score_block_mb)"
    )
    score_block_mb: int = setting(
        64,
        "largest block of scores (queries x gallery x 4 bytes) held at once, so memory does not grow with the gallery",
    )
    examples: int = setting(8, "query texts shown with their top images in the HTML report")
    write_features: bool = setting(False, "also write the reference's feature jsonl files (large for big splits)")


def evaluate(
    model_dir: str | Path,
    prepared_dir: str | Path,
    config: EvaluateConfig,
    summary_path: str | Path | None = None,
    plots_path: str | Path | None = None,
    report_dir: str | Path | None = None,
    mlflow_run_id: str | None = None,
    init_metrics: str | Path | None = None,
    label: str | None = None,
) -> dict:
    """Embed the split's texts and images with the model and score retrieval; returns the metrics.

    Optional outputs: the recall@k curve as CSV (`plots_path`), the reference's prediction and score
    files with an HTML/Markdown report (`report_dir`), and the metrics and report logged to an
    existing MLflow run (`mlflow_run_id`; by default the run that trained the model, when recorded).

    `init_metrics` is the evaluation summary of the model this one was trained from: its `chain`
    (start, then each stage) is carried on, so the summary and report set this model beside every
    model before it, with the gain over the start. `label` names the model there (default: its folder).
    """
    try:
        model, processor = load_model(model_dir)
    except (FileNotFoundError, OSError) as err:
        raise ZhclipError(f"cannot load model from {model_dir}: {err}") from err
    earlier = read_summary(init_metrics).get("chain", []) if init_metrics else []
    summary: dict = {"model": label or Path(model_dir).name, "model_dir": str(model_dir), "split": config.split}
    with timed(summary):
        with accelerated(model):
            data = embed_split(model, processor, prepared_dir, config.split, config.batch_size).data
        summary.update(texts=len(data.text_ids), images=len(data.image_ids))
        summary.update(
            _score(data, config, plots_path, report_dir, run_to_log_into(mlflow_run_id, model_dir), summary, earlier)
        )
    if summary_path:
        write_summary(summary_path, summary)
    return summary


def evaluate_features(
    image_feats: str | Path,
    text_feats: str | Path,
    annotations: str | Path,
    config: EvaluateConfig,
    summary_path: str | Path | None = None,
    plots_path: str | Path | None = None,
    report_dir: str | Path | None = None,
    mlflow_run_id: str | None = None,
) -> dict:
    """Score features in the reference's jsonl format against `{"text_id", "image_ids"}` annotations.

    Every text and image in the feature files is in the gallery, as in the reference's
    `make_topk_predictions(_tr).py`; the annotated texts are the text-to-image queries.
    """
    image_ids, image_emb = cnclip_files.read_features(image_feats, "image_id")
    text_ids, text_emb = cnclip_files.read_features(text_feats, "text_id")
    if image_emb.shape[1] != text_emb.shape[1]:
        raise ZhclipError(
            f"{image_feats} has {image_emb.shape[1]}-d features but {text_feats} has {text_emb.shape[1]}-d"
        )
    positives, captions = cnclip_files.read_annotations(annotations)
    image_row = {image_id: row for row, image_id in enumerate(image_ids)}
    text_row = {text_id: row for row, text_id in enumerate(text_ids)}
    text_to_images: list[set[int]] = [set() for _ in text_ids]
    for text_id, wanted in positives.items():
        if text_id not in text_row:
            raise ZhclipError(f"{annotations}: text_id {text_id} has no feature in {text_feats}")
        missing = [i for i in wanted if i not in image_row]
        if missing:
            raise ZhclipError(
                f"{annotations}: text_id {text_id} references image_ids {missing[:5]} with no feature in {image_feats}"
            )
        text_to_images[text_row[text_id]] = {image_row[i] for i in wanted}
    summary: dict = {
        "model": "features",
        "image_feats": str(image_feats),
        "text_feats": str(text_feats),
        "annotations": str(annotations),
        "texts": len(text_ids),
        "images": len(image_ids),
    }
    data = RetrievalSet(
        text_ids=text_ids,
        image_ids=image_ids,
        text_emb=text_emb,
        image_emb=image_emb,
        text_to_images=text_to_images,
        texts=[captions.get(t, f"text {t}") for t in text_ids],
    )
    with timed(summary):
        summary.update(_score(data, config, plots_path, report_dir, run_to_log_into(mlflow_run_id), summary))
    if summary_path:
        write_summary(summary_path, summary)
    return summary


def _score(
    data: RetrievalSet,
    config: EvaluateConfig,
    plots_path: str | Path | None,
    report_dir: str | Path | None,
    mlflow_run: dict[str, str] | None,
    context: dict[str, Any],
    earlier: Sequence[dict] = (),
) -> dict[str, Any]:
    rankings = rank(
        data.text_emb, data.image_emb, data.text_to_images, config.chunk_size, block_mb=config.score_block_mb
    )
    metrics = metrics_of(rankings, len(data.image_ids), len(data.text_ids))
    curves = recall_curves(rankings)
    chain = [*earlier, {"model": context["model"], **{k: metrics[k] for k in HEADLINE}, "recall_at_k": curves}]
    metrics |= gain_over_start(chain)
    if plots_path:
        write_recall_curves(plots_path, curves)
    artifacts: list[Path] = []
    if report_dir:
        artifacts = write_retrieval_files(report_dir, data, rankings, config.write_features)
        artifacts += report.write(
            _retrieval_report(data, rankings, metrics, curves, context, config.examples, chain), report_dir
        )
    if mlflow_run:
        report.log_to_mlflow(mlflow_run, metrics, artifacts, "evaluate")
    return {**metrics, "chain": chain}


def gain_over_start(chain: Sequence[dict]) -> dict[str, float]:
    """This model's (the chain's last) mean recall against the start's (its first); {} for the start itself."""
    if len(chain) < 2:
        return {}
    start, last = chain[0]["mean_recall"], chain[-1]["mean_recall"]
    return {"start_mean_recall": start, "gain_over_start": round(last - start, 4)}


def write_recall_curves(path: str | Path, curves: dict[str, list[float]]) -> Path:
    """Recall@k for k = 1..10 per direction as CSV (columns k, t2i, i2t) for `dvc plots`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(["k", "t2i", "i2t"])
        for k, (t2i, i2t) in enumerate(zip(curves["t2i"], curves["i2t"]), start=1):
            writer.writerow([k, round(t2i, 4), round(i2t, 4)])
    return path


def write_retrieval_files(
    out_dir: str | Path, data: RetrievalSet, rankings: Rankings, with_features: bool
) -> list[Path]:
    """The reference's files: answers and top-10 predictions both ways, their score JSON, optionally features.

    `evaluation.py answers_t2i.jsonl predictions_t2i.jsonl out.json` (and `evaluation_tr.py` with the
    `_i2t` files) reproduce `score_t2i.json` / `score_i2t.json`.
    """
    out_dir = Path(out_dir)
    text_ids, image_ids = np.asarray(data.text_ids), np.asarray(data.image_ids)

    def ids(ranked: np.ndarray, gallery: np.ndarray, queries: list[int], query_ids: np.ndarray) -> dict[int, list[int]]:
        return dict(zip(query_ids[queries].tolist(), gallery[ranked].tolist()))

    def answers(
        positives: list[set[int]], queries: list[int], query_ids: np.ndarray, gallery: np.ndarray
    ) -> dict[int, list[int]]:
        return {int(query_ids[q]): sorted(int(gallery[p]) for p in wanted) for q, wanted in zip(queries, positives)}

    files = [
        cnclip_files.write_predictions(
            out_dir / "answers_t2i.jsonl",
            "text_id",
            "image_ids",
            answers(rankings.t2i_positives, rankings.t2i_queries, text_ids, image_ids),
        ),
        cnclip_files.write_predictions(
            out_dir / "answers_i2t.jsonl",
            "image_id",
            "text_ids",
            answers(rankings.i2t_positives, rankings.i2t_queries, image_ids, text_ids),
        ),
        cnclip_files.write_predictions(
            out_dir / "predictions_t2i.jsonl",
            "text_id",
            "image_ids",
            ids(rankings.t2i, image_ids, rankings.t2i_queries, text_ids),
        ),
        cnclip_files.write_predictions(
            out_dir / "predictions_i2t.jsonl",
            "image_id",
            "text_ids",
            ids(rankings.i2t, text_ids, rankings.i2t_queries, image_ids),
        ),
    ]
    for direction, ranked, positives in (
        ("t2i", rankings.t2i, rankings.t2i_positives),
        ("i2t", rankings.i2t, rankings.i2t_positives),
    ):
        hits = first_hits(ranked, positives)
        files.append(
            write_summary(
                out_dir / f"score_{direction}.json",
                cnclip_files.score_json({k: int((hits < k).sum()) for k in KS}, len(positives)),
            )
        )
    if with_features:
        files.append(
            cnclip_files.write_features(out_dir / "image_feat.jsonl", "image_id", data.image_ids, data.image_emb)
        )
        files.append(cnclip_files.write_features(out_dir / "text_feat.jsonl", "text_id", data.text_ids, data.text_emb))
    return files


def _retrieval_report(
    data: RetrievalSet,
    rankings: Rankings,
    metrics: dict[str, float],
    curves: dict[str, list[float]],
    context: dict[str, Any],
    examples: int,
    chain: Sequence[dict],
) -> report.Report:
    headline = [["", "R@1", "R@5", "R@10", "mean recall"]]
    for direction, name in (("t2i", "text → image"), ("i2t", "image → text")):
        headline.append(
            [name]
            + [f"{metrics[f'{direction}_r{k}']:.2f}" for k in KS]
            + [f"{metrics[f'{direction}_mean_recall']:.2f}"]
        )
    headline.append(["both", "", "", "", f"{metrics['mean_recall']:.2f}"])
    shown = []
    # Spread over the split: neighbouring texts are often captions of the same image.
    rows = np.unique(np.linspace(0, len(rankings.t2i_queries) - 1, examples).astype(int)) if examples else []
    pictures = (
        data.load_images({int(i) for row in rows for i in rankings.t2i[row][:EXAMPLE_IMAGES]})
        if data.load_images
        else {}
    )
    for row in rows:
        query, ranked, positives = rankings.t2i_queries[row], rankings.t2i[row], rankings.t2i_positives[row]
        shown.append(
            report.Example(
                query=data.texts[query] if data.texts else f"text {data.text_ids[query]}",
                results=[
                    report.Result(
                        label=f"image {data.image_ids[image]}",
                        hit=int(image) in positives,
                        image=pictures.get(int(image)),
                    )
                    for image in ranked[:EXAMPLE_IMAGES]
                ],
            )
        )
    notes = {
        key: context[key]
        for key in ("model_dir", "split", "image_feats", "text_feats", "annotations")
        if key in context
    }
    notes |= {
        "texts": len(data.text_ids),
        "images": len(data.image_ids),
        "chance mean recall": f"{metrics['chance_mean_recall']:.2f}",
    }
    tables, figures = (
        [report.Table("Recall (%)", headline)],
        [report.Figure("Recall@k", report.line_plot(curves, "k", "recall@k (%)"))],
    )
    if len(chain) > 1:
        tables.append(comparison_table(chain))
        figures.append(
            report.Figure(
                "Recall@k: the start and every stage (T2I solid, I2T dashed)",
                report.line_plot(
                    {
                        f"{entry['model']} {d.upper()}": entry["recall_at_k"][d]
                        for entry in chain
                        for d in ("t2i", "i2t")
                    },
                    "k",
                    "recall@k (%)",
                    dashed=lambda name: name.endswith("I2T"),
                ),
            )
        )
    return report.Report(
        title="zhclip retrieval evaluation", notes=notes, tables=tables, figures=figures, examples=shown
    )


def comparison_table(chain: Sequence[dict]) -> report.Table:
    """The start and each stage side by side: recall figures and the gain in mean recall over the start."""
    rows = [["model", *(f"{d.upper()} R@{k}" for d in ("t2i", "i2t") for k in KS), "mean recall", "gain over start"]]
    for entry in chain:
        gain = entry["mean_recall"] - chain[0]["mean_recall"]
        rows.append(
            [
                entry["model"],
                *(f"{entry[f'{d}_r{k}']:.2f}" for d in ("t2i", "i2t") for k in KS),
                f"{entry['mean_recall']:.2f}",
                "" if entry is chain[0] else f"{gain:+.2f}",
            ]
        )
    return report.Table("Start → stages (%)", rows)
