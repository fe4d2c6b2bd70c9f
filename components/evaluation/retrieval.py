"""Retrieval math: rank a gallery for each query and score recall@k as Chinese-CLIP's evaluation does.

A text may have several positive images and a hit at k is any positive among the top k; image-to-text
queries are the images at least one text references, and any of their captions counts. Percentages."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

KS = (1, 5, 10)
TOP_K = 10  # predictions per query in the reference's files, and the recall@k curve's range


@dataclass
class RetrievalSet:
    """Embedded texts and images with their ids, and the positive image rows of each text row."""

    text_ids: list[int]
    image_ids: list[int]
    text_emb: np.ndarray
    image_emb: np.ndarray
    text_to_images: list[set[int]]
    texts: list[str] = field(default_factory=list)  # for the report; may be empty
    # image rows -> decoded images, for the few the report shows (the split's images are never all held)
    load_images: Callable[[Collection[int]], dict[int, Image.Image]] | None = None


@dataclass
class Rankings:
    """Top-k gallery rows per query, both directions, with each query's positives (row indices)."""

    t2i_queries: list[int]
    t2i: np.ndarray
    t2i_positives: list[set[int]]
    i2t_queries: list[int]
    i2t: np.ndarray
    i2t_positives: list[set[int]]


@contextmanager
def accelerated(model: torch.nn.Module) -> Iterator[torch.device]:
    """Run the model on the GPU in bfloat16 autocast when there is one; on the CPU in float32 otherwise."""
    if not torch.cuda.is_available():
        yield torch.device("cpu")
        return
    model.to("cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        yield torch.device("cuda")


def _stable_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Row-wise top k of a score block, ties going to the lower column as a stable descending sort would.

    torch.topk finds the best without sorting the whole row but breaks ties arbitrarily, so it takes
    one extra column: the k chosen are reordered by (score desc, index asc), and the rare rows whose
    k-th score equals the (k+1)-th (a tie across the cut) are sorted in full.
    """
    extra = min(k + 1, scores.shape[1])
    values, indices = torch.topk(scores, extra, dim=1)
    tied_at_cut = (values[:, k - 1] == values[:, k]).nonzero().flatten().tolist() if extra > k else []
    values, indices = values[:, :k], indices[:, :k]
    indices, by_index = indices.sort(dim=1)
    order = torch.sort(-values.gather(1, by_index), dim=1, stable=True).indices
    ranked = indices.gather(1, order)
    for row in tied_at_cut:
        ranked[row] = torch.sort(-scores[row], stable=True).indices[:k]
    return ranked


def top_k(
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int,
    chunk_size: int = 1024,
    device: torch.device | str | None = None,
    rows: Sequence[int] | None = None,
    block_mb: int = 64,
) -> np.ndarray:
    """Indices of the k best gallery rows per query (the `rows` of `queries`, default all), by dot product.

    Queries are scored chunk_size at a time, fewer if their block of scores would exceed `block_mb`,
    so memory holds one block of at most `block_mb` (or one row), whatever the number of queries and
    the size of the gallery. Ties go to the lower gallery index, as in the reference's stable sort.
    """
    picked = np.arange(len(queries)) if rows is None else np.asarray(rows, dtype=np.int64)
    chunk_size = max(1, min(chunk_size, block_mb * 2**20 // (4 * max(1, len(gallery)))))
    k = min(k, len(gallery))
    dtype = torch.float64 if np.result_type(queries, gallery) == np.float64 else torch.float32
    gallery_t = torch.as_tensor(gallery, dtype=dtype, device=device)
    ranked = np.zeros((len(picked), k), dtype=np.int64)
    if k == 0:
        return ranked
    # One score buffer for every block: a fresh tens-of-MB block per chunk would leave freed copies
    # resident in the allocator's per-thread heaps.
    scores = torch.empty((min(chunk_size, len(picked)), len(gallery)), dtype=dtype, device=device)
    for start in range(0, len(picked), chunk_size):
        block = torch.as_tensor(queries[picked[start : start + chunk_size]], dtype=dtype, device=device)
        torch.matmul(block, gallery_t.T, out=scores[: len(block)])
        ranked[start : start + len(block)] = _stable_top_k(scores[: len(block)], k).cpu().numpy()
    return ranked


def first_hits(ranked: np.ndarray, positives: Sequence[set[int]]) -> np.ndarray:
    """0-based rank of each query's first positive in its ranked row; the row length when none is there."""
    return np.array(
        [
            next((rank for rank, item in enumerate(row) if item in wanted), len(row))
            for row, wanted in zip(ranked.tolist(), positives)
        ],
        dtype=np.int64,
    )


def recalls(ranked: np.ndarray, positives: Sequence[set[int]], ks: Sequence[int] = KS) -> dict[int, float]:
    """Percentage of queries with at least one positive in their top k, for each k."""
    hits = first_hits(ranked, positives)
    return {k: 100.0 * float(np.mean(hits < k)) for k in ks}


def chance_recalls(positives: Sequence[set[int]], gallery_size: int, ks: Sequence[int] = KS) -> dict[int, float]:
    """Expected recall@k of a uniformly random ranking: 1 - C(N-p, k) / C(N, k) per query, averaged.

    A gallery smaller than k is ranked whole, as `top_k` does.
    """

    def expected(p: int, k: int) -> float:
        k = min(k, gallery_size)
        return 1 - math.comb(gallery_size - p, k) / math.comb(gallery_size, k)

    return {k: 100.0 * float(np.mean([expected(len(p), k) for p in positives])) for k in ks}


def rank(
    text_emb: np.ndarray,
    image_emb: np.ndarray,
    text_to_images: Sequence[set[int]],
    chunk_size: int = 1024,
    k: int = TOP_K,
    block_mb: int = 64,
) -> Rankings:
    """Top-k retrieval both ways. Text rows without positives are no T2I query but stay in the I2T gallery."""
    t2i_queries = [text for text, images in enumerate(text_to_images) if images]
    image_to_texts: dict[int, set[int]] = {}
    for text, images in enumerate(text_to_images):
        for image in images:
            image_to_texts.setdefault(image, set()).add(text)
    i2t_queries = sorted(image_to_texts)
    device = "cuda" if torch.cuda.is_available() else None
    return Rankings(
        t2i_queries=t2i_queries,
        t2i=top_k(text_emb, image_emb, k, chunk_size, device, rows=t2i_queries, block_mb=block_mb),
        t2i_positives=[set(text_to_images[t]) for t in t2i_queries],
        i2t_queries=i2t_queries,
        i2t=top_k(image_emb, text_emb, k, chunk_size, device, rows=i2t_queries, block_mb=block_mb),
        i2t_positives=[image_to_texts[i] for i in i2t_queries],
    )


def recall_curves(rankings: Rankings) -> dict[str, list[float]]:
    """Recall@k in percent for k = 1..TOP_K, per direction (what the recall@k plot draws)."""
    ks = range(1, TOP_K + 1)
    return {
        "t2i": list(recalls(rankings.t2i, rankings.t2i_positives, ks).values()),
        "i2t": list(recalls(rankings.i2t, rankings.i2t_positives, ks).values()),
    }


def metrics_of(rankings: Rankings, gallery_images: int, gallery_texts: int) -> dict[str, float]:
    """R@1/5/10 per direction, mean recall per direction and overall, and the chance level."""
    t2i = recalls(rankings.t2i, rankings.t2i_positives)
    i2t = recalls(rankings.i2t, rankings.i2t_positives)
    chance_t2i = chance_recalls(rankings.t2i_positives, gallery_images)
    chance_i2t = chance_recalls(rankings.i2t_positives, gallery_texts)
    metrics = {f"t2i_r{k}": t2i[k] for k in KS} | {f"i2t_r{k}": i2t[k] for k in KS}
    metrics["t2i_mean_recall"] = float(np.mean(list(t2i.values())))
    metrics["i2t_mean_recall"] = float(np.mean(list(i2t.values())))
    metrics["mean_recall"] = float(np.mean(list(t2i.values()) + list(i2t.values())))
    metrics["chance_mean_recall"] = float(np.mean(list(chance_t2i.values()) + list(chance_i2t.values())))
    return {key: round(value, 4) for key, value in metrics.items()}


def retrieval_metrics(
    text_emb: np.ndarray, image_emb: np.ndarray, text_to_images: Sequence[set[int]], chunk_size: int = 1024
) -> dict[str, float]:
    """All recall figures for texts (rows of text_emb) against images (rows of image_emb).

    `text_to_images[t]` holds the image row indices positive for text row t.
    """
    return metrics_of(rank(text_emb, image_emb, text_to_images, chunk_size), len(image_emb), len(text_emb))
