"""How many true matches a batch hides among its negatives: exact repeats per row in random batches.

    PYTHONPATH=. python <this folder>/false_negatives.py --data data/validated --batch 64

A pair's other exact matches are the batch's other pairs with the same caption text or the same
image id: what `train.false_negatives` turns from negatives into positives. Paraphrases of one class
are not exact repeats and are not counted.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bench.measure import emit
from zhclip.components.data.shards import read_pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/validated"))
    parser.add_argument("--split", default="train")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=200)
    args = parser.parse_args()
    pairs = read_pairs(args.data, args.split)
    texts, images = np.asarray(pairs.text.astype(str)), np.asarray(pairs.image_id.astype(str))
    rng = np.random.default_rng(0)
    extra = []
    for _ in range(args.batches):
        rows = rng.choice(len(pairs), args.batch, replace=False)
        same = (texts[rows][:, None] == texts[rows][None]) | (images[rows][:, None] == images[rows][None])
        extra.append(same.sum(1).mean() - 1)
    summary = {
        "bench": "false_negatives",
        "pairs": len(pairs),
        "distinct_captions": len(set(texts)),
        "distinct_images": len(set(images)),
        "batch": args.batch,
        "other_exact_matches_per_row": round(float(np.mean(extra)), 3),
        "most_repeated_captions": pairs.text.value_counts().head(5).to_dict(),
    }
    emit(summary)


if __name__ == "__main__":
    main()
