"""Is OpenVINO (fp32 or bf16) a faster text encoder than ONNX Runtime that users cannot tell apart?

    pip install openvino   # not a project dependency: this measures a candidate that was not adopted
    PYTHONPATH=. python <this folder>/openvino_precisions.py --model models/stage2 --data data/validated

OpenVINO compiles the text encoder's ONNX graph (the one `onnx` serves) with its CPU plugin at an
inference precision of f32 or bf16 (bf16 runs on CPUs with AVX512-BF16 or AMX). Fidelity on
`--model` (the demo's), as int8_variants.py beside it measures it: the cosine to torch's embeddings of
every caption of the split and the share of captions whose top 10 over the split's images is the
same set; for each caption whose set differs, the gap between torch's 10th and 11th scores (a
near-tie that any rounding can flip) and the largest change of a score. Speed on a random
RoBERTa-base text tower: median ms for 1 and for 8 queries, beside torch and ONNX Runtime fp32 in
the same run. One JSON line per precision on stdout (and appended to `--out`).
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

import numpy as np
from int8_variants import QUERIES, _feeds, _median_ms, _session, _unit, fidelity_parser, torch_reference

from bench.measure import emit
from bench.search import random_model
from zhclip.model import embed_texts, load_model
from zhclip.model.onnx_towers import cached_encoders

PRECISIONS = ("f32", "bf16")


def _compiled(graph: str, precision: str):
    import openvino

    core = openvino.Core()
    config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
    return core.compile_model(core.read_model(graph), "CPU", config)


def _in_batches(compiled, feeds: dict, size: int = 8) -> np.ndarray:
    """Embeddings of every row of `feeds`, `size` at a time (as serving's batches of 8 queries)."""
    count = len(feeds["input_ids"])
    parts = [compiled({k: v[i : i + size] for k, v in feeds.items()})[0] for i in range(0, count, size)]
    return _unit(np.concatenate(parts))


def _flips(expected_scores: np.ndarray, scores: np.ndarray, expected_top: np.ndarray, top: np.ndarray) -> list:
    """For each caption whose top 10 changed: torch's 10th-11th score gap and the largest score change."""
    flips = []
    for row in np.flatnonzero([set(a) != set(b) for a, b in zip(top, expected_top)]):
        ranked = np.sort(expected_scores[row])[::-1]
        flips.append(
            {
                "gap_10_11": float(f"{ranked[9] - ranked[10]:.3g}"),
                "max_score_change": float(f"{np.abs(scores[row] - expected_scores[row]).max():.3g}"),
            }
        )
    return flips


def main() -> None:
    args = fidelity_parser(__doc__).parse_args()
    texts, gallery, expected = torch_reference(args)
    expected_scores = expected @ gallery.T
    expected_top = np.argsort(-expected_scores, axis=1)[:, :10]
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        os.environ["ZHCLIP_ONNX_CACHE"] = str(root / "cache")
        model, processor = load_model(args.model)
        demo_graph = str(cached_encoders(model, args.model, processor.tokenizer.model_max_length)["text"])
        speed_dir = random_model(root, args.speed_preset, 512)
        speed_model, speed_processor = load_model(speed_dir)
        speed_graph = str(cached_encoders(speed_model, speed_dir, 52)["text"])
        one, eight = _feeds(speed_processor, QUERIES[1:2]), _feeds(speed_processor, QUERIES)
        torch_8 = embed_texts(speed_model, speed_processor, QUERIES)
        runtime = _session(speed_graph)
        baselines = {
            "torch_ms_1_text": _median_ms(
                lambda: embed_texts(speed_model, speed_processor, QUERIES[1:2]), args.repeats
            ),
            "torch_ms_8_texts": _median_ms(lambda: embed_texts(speed_model, speed_processor, QUERIES), args.repeats),
            "onnxruntime_ms_1_text": _median_ms(functools.partial(runtime.run, None, one), args.repeats),
            "onnxruntime_ms_8_texts": _median_ms(functools.partial(runtime.run, None, eight), args.repeats),
        }
        demo_feeds = _feeds(processor, texts)
        for precision in PRECISIONS:
            vectors = _in_batches(_compiled(demo_graph, precision), demo_feeds)
            scores = vectors @ gallery.T
            top = np.argsort(-scores, axis=1)[:, :10]
            speed = _compiled(speed_graph, precision)
            emit(
                {
                    "bench": "openvino_precisions",
                    "precision": precision,
                    "captions": len(texts),
                    "cosine_min": round(float((vectors * expected).sum(axis=1).min()), 6),
                    "same_top10": round(float(np.mean([set(a) == set(b) for a, b in zip(top, expected_top)])), 4),
                    "changed_top10": _flips(expected_scores, scores, expected_top, top),
                    "speed_preset": args.speed_preset,
                    "speed_cosine_min_vs_torch": round(float((_unit(speed(eight)[0]) * torch_8).sum(axis=1).min()), 5),
                    "ms_1_text": _median_ms(functools.partial(speed, one), args.repeats),
                    "ms_8_texts": _median_ms(functools.partial(speed, eight), args.repeats),
                    **baselines,
                    "machine": args.machine,
                },
                args.out,
            )


if __name__ == "__main__":
    main()
