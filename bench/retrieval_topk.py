"""Retrieval scoring at scale: queries/s and peak memory of zhclip's exact chunked top-k, both directions.

    python bench/retrieval_topk.py --texts 100000 --images 100000 --dim 512 --chunk-size 1024

Random unit features stand in for embeddings; text i's positive is image i (its feature plus noise),
so recalls are neither 0 nor 100. Prints one JSON line: queries/s over both directions, the recalls,
and peak resident memory next to the memory the features alone take.
"""

import argparse
import json
import resource
import time

import numpy as np
import torch

from components.evaluate import metrics_of, rank


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def unit_rows(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=100_000)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk-size", type=int, default=1024)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = unit_rows(rng.standard_normal((args.images, args.dim), dtype=np.float32))
    texts = images[np.arange(args.texts) % args.images] + 0.04 * rng.standard_normal((args.texts, args.dim), dtype=np.float32)
    texts = unit_rows(texts)
    positives = [{t % args.images} for t in range(args.texts)]
    features_mb = (images.nbytes + texts.nbytes) / 2**20
    before_mb = peak_rss_mb()
    start = time.perf_counter()
    rankings = rank(texts, images, positives, args.chunk_size)
    seconds = time.perf_counter() - start
    queries = len(rankings.t2i_queries) + len(rankings.i2t_queries)
    metrics = metrics_of(rankings, args.images, args.texts)
    print(json.dumps({
        "bench": "retrieval_topk", "texts": args.texts, "images": args.images, "dim": args.dim, "chunk_size": args.chunk_size,
        "device": "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)",
        "queries": queries, "seconds": round(seconds, 1), "queries_per_s": round(queries / seconds, 1),
        "features_mb": round(features_mb), "peak_rss_before_scoring_mb": round(before_mb), "peak_rss_mb": round(peak_rss_mb()),
        "score_block_mb": round(args.chunk_size * args.images * 4 / 2**20),
        "t2i_r1": metrics["t2i_r1"], "i2t_r1": metrics["i2t_r1"],
    }))


if __name__ == "__main__":
    main()
