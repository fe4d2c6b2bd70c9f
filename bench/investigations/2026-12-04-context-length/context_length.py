"""The cost of a longer text context: one training step of the text tower at several context lengths.

    PYTHONPATH=. python <this folder>/context_length.py --preset ViT-B-16 --contexts 52 104 208 512

Random weights of the preset's text tower (RoBERTa-base for ViT-B-16), a batch of captions padded to
each context as the training loader pads them: forward to the projected embedding, a loss, backward.
Prints one JSON line per context (median seconds of `--repeats` steps after one warm-up, and the time
relative to the first context) and appends them to `--out` when given.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from bench.measure import emit, median_seconds
from zhclip.model import build_model
from zhclip.model.embedding import projected_features


def step_seconds(model, context: int, batch: int, repeats: int) -> float:
    ids = torch.randint(1000, 20000, (batch, context))
    mask = torch.ones_like(ids)
    return median_seconds(
        lambda: (
            projected_features(model.get_text_features(input_ids=ids, attention_mask=mask)).pow(2).mean().backward()
        ),
        repeats,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="ViT-B-16")
    parser.add_argument("--contexts", type=int, nargs="+", default=[52, 104, 208, 512])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--machine", default=platform.processor() or platform.machine(), help="hardware, as reported")
    parser.add_argument("--out", type=Path, help="append the JSON lines here")
    args = parser.parse_args()
    model, _ = build_model(args.preset, context_length=max(args.contexts))
    model.train()
    first = None
    for context in args.contexts:
        seconds = step_seconds(model, context, args.batch, args.repeats)
        first = first or seconds
        emit(
            {
                "bench": "context_length",
                "preset": args.preset,
                "context": context,
                "batch": args.batch,
                "step_s": round(seconds, 3),
                "relative": round(seconds / first, 2),
                "threads": torch.get_num_threads(),
                "machine": args.machine,
                "date": time.strftime("%Y-%m-%d"),
            },
            args.out,
        )


if __name__ == "__main__":
    main()
