"""Retrieval scoring at scale: queries/s and peak memory of zhclip's exact chunked top-k, both directions.

    python -m bench.retrieval_topk --texts 100000 --images 100000 --dim 512 --chunk-size 1024 [--queries 5000]

Random unit features stand in for embeddings; text i's positive is image i (its feature plus noise),
so recalls are neither 0 nor 100. Prints one JSON line: queries/s over both directions, the recalls,
and peak resident memory next to the memory the features alone take. `--queries N` scores only the
first N texts and the first N images as queries, each still against the whole other gallery (the
cost per query and the memory bound do not depend on the number of queries), and extrapolates the
time of the full run.
"""

import argparse
import time

import numpy as np
import torch

from bench.measure import emit, peak_rss_mb
from zhclip.components.evaluation.retrieval import metrics_of, rank


def random_features(rows: int, dim: int, rng: np.random.Generator, like: np.ndarray | None = None) -> np.ndarray:
    """Unit rows, made 10k at a time so that generating them does not raise the peak above the result.

    With `like`, row i is like[i % len(like)] plus noise (a positive pair); otherwise random.
    """
    out = np.empty((rows, dim), dtype=np.float32)
    for start in range(0, rows, 10_000):
        block = rng.standard_normal((min(10_000, rows - start), dim), dtype=np.float32)
        if like is not None:
            block = like[np.arange(start, start + len(block)) % len(like)] + 0.3 * block
        out[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=100_000)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--block-mb", type=int, default=64, help="largest block of scores (evaluate.score_block_mb)")
    parser.add_argument("--queries", type=int, default=0, help="queries per direction (default: every text and image)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = random_features(args.images, args.dim, rng)
    texts = random_features(args.texts, args.dim, rng, like=images)
    queried = args.queries or args.texts
    # Texts past --queries stay in the image-to-text gallery without being text-to-image queries.
    positives = [{t % args.images} if t < queried else set() for t in range(args.texts)]
    features_mb = (images.nbytes + texts.nbytes) / 2**20
    before_mb = peak_rss_mb()
    start = time.perf_counter()
    rankings = rank(texts, images, positives, args.chunk_size, block_mb=args.block_mb)
    seconds = time.perf_counter() - start
    queries = len(rankings.t2i_queries) + len(rankings.i2t_queries)
    metrics = metrics_of(rankings, args.images, args.texts)
    emit(
        {
            "bench": "retrieval_topk",
            "texts": args.texts,
            "images": args.images,
            "dim": args.dim,
            "chunk_size": args.chunk_size,
            "device": "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)",
            "queries": queries,
            "seconds": round(seconds, 1),
            "queries_per_s": round(queries / seconds, 1),
            "full_run_s_estimate": round((args.texts + min(args.texts, args.images)) * seconds / queries),
            "features_mb": round(features_mb),
            "peak_rss_before_scoring_mb": round(before_mb),
            "peak_rss_mb": round(peak_rss_mb()),
            "scoring_peak_increase_mb": round(peak_rss_mb() - before_mb),
            "score_block_mb": round(min(args.chunk_size * max(args.images, args.texts) * 4 / 2**20, args.block_mb)),
            "t2i_r1": metrics["t2i_r1"],
            "i2t_r1": metrics["i2t_r1"],
        }
    )


if __name__ == "__main__":
    main()
