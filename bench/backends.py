"""Embedding backends side by side: can users tell them apart, and how fast is each on this CPU?

    python -m bench.backends --model models/stage2 --data data/validated --split test

For each backend (`torch`, `onnx`, `onnx-int8`; `serve.backend`), with the model given:

- fidelity against torch: the cosine between the two backends' embeddings of every caption of the
  split (min and mean), the share of captions whose top 10 over the split's images (exact search,
  images embedded by torch, as the index stage embeds them) is the same set, and text-to-image R@10;
- speed in one process (no HTTP): median milliseconds to embed one caption and a batch of 8.

One JSON line per backend on stdout (and appended to `--out`).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench.measure import emit, median_seconds
from zhclip.components.data.shards import read_pairs
from zhclip.model.pyfunc import BACKENDS, load_embedder

K = 10


def median_ms(embed, texts: list[str], repeats: int) -> float:
    """Median milliseconds to embed `texts`, after a first call that pays for lazy set-up."""
    frame = pd.DataFrame({"text": texts})
    return round(1000 * median_seconds(lambda: embed(frame), repeats), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model folder")
    parser.add_argument("--data", type=Path, default=Path("data/validated"), help="prepared shards")
    parser.add_argument("--split", default="test")
    parser.add_argument("--backend", action="append", choices=BACKENDS, help="(repeatable; default all)")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per batch size")
    parser.add_argument("--machine", default=f"{os.cpu_count()} CPU cores, no GPU")
    parser.add_argument("--out", type=Path, help="append the JSON lines to this file")
    args = parser.parse_args()

    pairs = read_pairs(args.data, args.split)
    captions = pairs.groupby("text_id").agg(text=("text", "first"), images=("image_id", lambda ids: set(ids)))
    images = pairs.drop_duplicates("image_id")
    texts = captions["text"].tolist()
    with tempfile.TemporaryDirectory() as cache:
        os.environ.setdefault("ZHCLIP_ONNX_CACHE", cache)  # a fresh export unless the caller keeps one
        reference = load_embedder(args.model)
        gallery = reference.predict(pd.DataFrame({"image": images["image"].tolist()}))
        expected = reference.predict(pd.DataFrame({"text": texts}))
        expected_top = np.argsort(-(expected @ gallery.T), axis=1)[:, :K]
        image_ids = images["image_id"].to_numpy()
        for backend in args.backend or list(BACKENDS):
            started = time.perf_counter()
            embedder = reference if backend == "torch" else load_embedder(args.model, {"backend": backend})
            load_s = time.perf_counter() - started
            queries = embedder.predict(pd.DataFrame({"text": texts}))
            top = np.argsort(-(queries @ gallery.T), axis=1)[:, :K]
            cosines = (queries * expected).sum(axis=1)
            hits = [bool(set(image_ids[row]) & wanted) for row, wanted in zip(top, captions["images"])]
            emit(
                {
                    "bench": "backends",
                    "backend": backend,
                    "model": args.model,
                    "captions": len(texts),
                    "images": len(image_ids),
                    "cosine_min": round(float(cosines.min()), 6),
                    "cosine_mean": round(float(cosines.mean()), 6),
                    "same_top10": round(float(np.mean([set(a) == set(b) for a, b in zip(top, expected_top)])), 4),
                    "t2i_r10": round(100 * float(np.mean(hits)), 2),
                    "load_s": round(load_s, 1),
                    "ms_1_text": median_ms(embedder.predict, texts[:1], args.repeats),
                    "ms_8_texts": median_ms(embedder.predict, texts[:8], args.repeats),
                    "machine": args.machine,
                },
                args.out,
            )


if __name__ == "__main__":
    main()
