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

from pathlib import Path
from typing import Any

from zhclip.components.core.errors import ZhclipError
from zhclip.components.core.summaries import timed, write_summary
from zhclip.components.data.shards import PreparedSplit
from zhclip.components.evaluation.cnclip_split import embed_cnclip_split, is_cnclip_split
from zhclip.components.evaluation.retrieval import accelerated, metrics_of, rank
from zhclip.components.evaluation.split_embedding import embed_split
from zhclip.components.evaluation.suite_config import PRIMARY, RETRIEVAL, SuiteDataset
from zhclip.components.evaluation.zeroshot import ZeroshotConfig, classify
from zhclip.model import load_model


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
