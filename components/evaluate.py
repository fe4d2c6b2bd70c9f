"""Evaluate: text-to-image and image-to-text recall@1/5/10 and mean recall, as Chinese-CLIP reports.

Semantics of the reference's `eval/evaluation.py`: a text may have several positive images and a hit
at k is any positive among the top k; image-to-text queries are the images that at least one text
references, and any of their captions counts. Values are percentages.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components.common import ZhclipError, timed, write_summary
from components.ingest import read_pairs
from model import decode_image, embed_images, embed_texts, load_model

KS = (1, 5, 10)


@dataclass
class EvaluateConfig:
    split: str = "test"
    batch_size: int = 256
    chunk_size: int = 1024


def top_k(queries: np.ndarray, gallery: np.ndarray, k: int, chunk_size: int = 1024) -> np.ndarray:
    """Indices of the k best gallery items per query, by cosine score, chunk by chunk.

    Only a chunk_size x gallery block of scores exists at a time. Ties go to the lower gallery
    index (stable sort), so results are deterministic.
    """
    k = min(k, len(gallery))
    rows = []
    for start in range(0, len(queries), chunk_size):
        scores = queries[start : start + chunk_size] @ gallery.T
        rows.append(np.argsort(-scores, axis=1, kind="stable")[:, :k])
    return np.concatenate(rows) if rows else np.zeros((0, k), dtype=np.int64)


def recalls(ranked: np.ndarray, positives: Sequence[set[int]], ks: Sequence[int] = KS) -> dict[int, float]:
    """Percentage of queries with at least one positive in their top k, for each k."""
    return {k: 100.0 * float(np.mean([bool(positives[q] & set(ranked[q, :k].tolist())) for q in range(len(positives))]))
            for k in ks}


def chance_recalls(positives: Sequence[set[int]], gallery_size: int, ks: Sequence[int] = KS) -> dict[int, float]:
    """Expected recall@k of a uniformly random ranking: 1 - C(N-p, k) / C(N, k) per query, averaged.

    A gallery smaller than k is ranked whole, as `top_k` does.
    """
    def expected(p: int, k: int) -> float:
        k = min(k, gallery_size)
        return 1 - math.comb(gallery_size - p, k) / math.comb(gallery_size, k)

    return {k: 100.0 * float(np.mean([expected(len(p), k) for p in positives])) for k in ks}


def retrieval_metrics(text_emb: np.ndarray, image_emb: np.ndarray, text_to_images: Sequence[set[int]], chunk_size: int = 1024) -> dict[str, float]:
    """All recall figures for texts (rows of text_emb) against images (rows of image_emb).

    `text_to_images[t]` holds the image row indices positive for text row t.
    """
    image_to_texts: dict[int, set[int]] = {}
    for text, images in enumerate(text_to_images):
        for image in images:
            image_to_texts.setdefault(image, set()).add(text)
    queried_images = sorted(image_to_texts)
    i2t_positives = [image_to_texts[i] for i in queried_images]
    k = max(KS)
    t2i = recalls(top_k(text_emb, image_emb, k, chunk_size), text_to_images)
    i2t = recalls(top_k(image_emb[queried_images], text_emb, k, chunk_size), i2t_positives)
    chance_t2i = chance_recalls(text_to_images, len(image_emb))
    chance_i2t = chance_recalls(i2t_positives, len(text_emb))
    metrics = {f"t2i_r{k}": t2i[k] for k in KS} | {f"i2t_r{k}": i2t[k] for k in KS}
    metrics["t2i_mean_recall"] = float(np.mean(list(t2i.values())))
    metrics["i2t_mean_recall"] = float(np.mean(list(i2t.values())))
    metrics["mean_recall"] = float(np.mean(list(t2i.values()) + list(i2t.values())))
    metrics["chance_mean_recall"] = float(np.mean(list(chance_t2i.values()) + list(chance_i2t.values())))
    return {key: round(value, 4) for key, value in metrics.items()}


def evaluate(model_dir: str | Path, prepared_dir: str | Path, config: EvaluateConfig, summary_path: str | Path | None = None) -> dict:
    """Embed the split's texts and images with the model and score retrieval; returns the metrics."""
    pairs = read_pairs(prepared_dir, config.split)
    try:
        model, processor = load_model(model_dir)
    except (FileNotFoundError, OSError) as err:
        raise ZhclipError(f"cannot load model from {model_dir}: {err}") from err
    texts = pairs.drop_duplicates("text_id").reset_index(drop=True)
    images = pairs.drop_duplicates("image_id").reset_index(drop=True)
    image_row = {image_id: row for row, image_id in enumerate(images["image_id"])}
    grouped = pairs.groupby("text_id")["image_id"].apply(lambda ids: {image_row[i] for i in ids})
    text_to_images = [grouped[text_id] for text_id in texts["text_id"]]
    summary: dict = {"model_dir": str(model_dir), "split": config.split, "texts": len(texts), "images": len(images)}
    with timed(summary):
        text_emb = embed_texts(model, processor, list(texts["text"]), config.batch_size)
        image_emb = embed_images(model, processor, [decode_image(b) for b in images["image"]], config.batch_size)
        summary.update(retrieval_metrics(text_emb, image_emb, text_to_images, config.chunk_size))
    if summary_path:
        write_summary(summary_path, summary)
    return summary
