"""Which int8 recipe keeps the top 10 of the fp32 text encoder, and how fast is each on this CPU?

    PYTHONPATH=. python <this folder>/int8_variants.py --model models/stage2 --data data/validated

For each ONNX Runtime quantisation of the text encoder (`onnx-int8` is `dynamic`):

- `dynamic`: int8 MatMul weights, activations quantised per tensor at run time;
- `dynamic-per-channel`: the same with one weight scale per output channel;
- `dynamic-last-layer-fp32`: `dynamic` on every MatMul but those of the last layer;
- `weight-only-<block>-int8-compute`: 8-bit weights in blocks of 32 or 128 (MatMulNBits), activations
  quantised per block too (accuracy_level 4);
- `weight-only-32-fp32-compute`: 8-bit weights in blocks of 32, computed in fp32.

Fidelity on `--model` (the demo's): the cosine to torch's embeddings of every caption of the split,
and the share of captions whose top 10 over the split's images (embedded by torch) is the same set.
Speed on a random RoBERTa-base text tower (`--speed-preset`): median ms for 1 and for 8 queries.
One JSON line per variant on stdout (and appended to `--out`).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from bench.measure import emit, median_seconds
from bench.search import random_model
from zhclip.components.data.shards import read_pairs
from zhclip.model import embed_texts, load_model
from zhclip.model.onnx_towers import cached_encoders
from zhclip.model.pyfunc import load_embedder

QUERIES = [
    "红色的圆形",
    "一只小狗在草地上奔跑",
    "蓝色背景上的黄色三角形",
    "手写的数字七",
    "城市夜景",
    "穿着汉服的女孩",
    "一碗热腾腾的面条",
    "海边的日落",
]


def _dynamic(source: str, target: str, **options) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(source, target, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"], **options)


def _weight_only(source: str, target: str, block: int, level: int) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, accuracy_level=level, bits=8)
    quantizer = MatMulNBitsQuantizer(
        onnx.load(source), bits=8, block_size=block, is_symmetric=True, accuracy_level=level, algo_config=config
    )
    quantizer.process()
    quantizer.model.save_model_to_file(target, use_external_data_format=False)


def _last_layer_matmuls(source: str) -> list[str]:
    """The MatMuls with a weight of the encoder's last layer (the last six: Q, K, V, output, FFN in/out)."""
    import onnx

    graph = onnx.load(source).graph
    weights = {initializer.name for initializer in graph.initializer}
    return [node.name for node in graph.node if node.op_type == "MatMul" and node.input[1] in weights][-6:]


def variants(source: str) -> dict:
    return {
        "dynamic": lambda target: _dynamic(source, target),
        "dynamic-per-channel": lambda target: _dynamic(source, target, per_channel=True),
        "dynamic-last-layer-fp32": lambda target: _dynamic(
            source, target, nodes_to_exclude=_last_layer_matmuls(source)
        ),
        "weight-only-32-int8-compute": lambda target: _weight_only(source, target, 32, 4),
        "weight-only-128-int8-compute": lambda target: _weight_only(source, target, 128, 4),
        "weight-only-32-fp32-compute": lambda target: _weight_only(source, target, 32, 0),
    }


def _session(path: str):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _feeds(processor, texts: list[str]) -> dict:
    tokens = processor.tokenizer(texts, padding="longest", truncation=True, max_length=52, return_tensors="np")
    return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _median_ms(run, repeats: int) -> float:
    return round(1000 * median_seconds(run, repeats), 2)


def fidelity_parser(description: str) -> argparse.ArgumentParser:
    """The options of a text-encoder fidelity bench (this one and openvino_precisions.py beside it)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the model folder whose fidelity is measured")
    parser.add_argument("--data", type=Path, default=Path("data/validated"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--speed-preset", default="ViT-B-16", help="the random model timed (ViT-B-16: RoBERTa-base)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--machine", default=f"{os.cpu_count()} CPU cores, no GPU")
    parser.add_argument("--out", type=Path)
    return parser


def torch_reference(args: argparse.Namespace) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(the split's captions, torch's embeddings of its images, torch's embeddings of the captions)."""
    pairs = read_pairs(args.data, args.split)
    texts = pairs.groupby("text_id").agg(text=("text", "first"))["text"].tolist()
    reference = load_embedder(args.model)
    gallery = reference.predict(pd.DataFrame({"image": pairs.drop_duplicates("image_id")["image"].tolist()}))
    return texts, gallery, reference.predict(pd.DataFrame({"text": texts}))


def main() -> None:
    args = fidelity_parser(__doc__).parse_args()
    logging.disable(logging.WARNING)  # the quantisers' advice, once per call

    texts, gallery, expected = torch_reference(args)
    expected_top = np.argsort(-(expected @ gallery.T), axis=1)[:, :10]
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
        torch_ms = {
            "torch_ms_1_text": _median_ms(
                lambda: embed_texts(speed_model, speed_processor, QUERIES[1:2]), args.repeats
            ),
            "torch_ms_8_texts": _median_ms(lambda: embed_texts(speed_model, speed_processor, QUERIES), args.repeats),
        }
        demo_feeds = _feeds(processor, texts)
        for name, quantise in variants(demo_graph).items():
            quantise(str(root / f"demo-{name}.onnx"))
            vectors = _unit(_session(str(root / f"demo-{name}.onnx")).run(None, demo_feeds)[0])
            top = np.argsort(-(vectors @ gallery.T), axis=1)[:, :10]
            variants(speed_graph)[name](str(root / f"speed-{name}.onnx"))
            session = _session(str(root / f"speed-{name}.onnx"))
            emit(
                {
                    "bench": "int8_variants",
                    "variant": name,
                    "captions": len(texts),
                    "cosine_min": round(float((vectors * expected).sum(axis=1).min()), 6),
                    "same_top10": round(float(np.mean([set(a) == set(b) for a, b in zip(top, expected_top)])), 4),
                    "speed_preset": args.speed_preset,
                    "speed_cosine_min_vs_torch": round(
                        float((_unit(session.run(None, eight)[0]) * torch_8).sum(axis=1).min()), 5
                    ),
                    "ms_1_text": _median_ms(functools.partial(session.run, None, one), args.repeats),
                    "ms_8_texts": _median_ms(functools.partial(session.run, None, eight), args.repeats),
                    **torch_ms,
                    "machine": args.machine,
                },
                args.out,
            )


if __name__ == "__main__":
    main()
