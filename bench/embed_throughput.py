"""Image-embedding throughput (inference) of the image tower on random pixels.

    python -m bench.embed_throughput --preset ViT-B-16 --batch-size 1024 --cases bf16 bf16-fast
    python -m bench.embed_throughput --preset tiny --batch-size 8 --steps 2 --cases all   # CPU smoke run

Times what `model.embedding.embed_images` runs on the device for each batch (the image tower, the
projection and L2 normalisation), without the CPU-side decoding (bench/input_pipeline.py measures
that). Each case prints one JSON line: images/s, FLOPs per image, achieved TFLOP/s, MFU against the
measured bf16 matmul peak, and peak memory. `reference-fp16` runs cn-clip's `encode_image` with its
weights converted by its own `convert_weights` (fp16 matmuls, fp32 norms), as its feature extraction does.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from bench.measure import case_names, count_then_time, model_bench_parser, rates, run_cases, start
from bench.train_throughput import VIT_PRESETS, reference_model
from zhclip.model import build_model
from zhclip.model.embedding import projected_features
from zhclip.model.fast import apply_speedups, compile_model
from zhclip.model.presets import PRESETS


@dataclass(frozen=True)
class Case:
    impl: str = "zhclip"
    dtype: str = "bf16"  # weights and activations; fp32 is the plain model
    fused_qkv: bool = False
    channels_last: bool = False
    compile_scope: str = "none"
    compile_mode: str | None = None  # torch.compile mode, e.g. reduce-overhead (CUDA graphs: static shapes)


CASES = {
    "reference-fp16": Case(impl="reference", dtype="fp16"),
    "fp32": Case(dtype="fp32"),
    "bf16": Case(),
    "bf16-fast": Case(fused_qkv=True, channels_last=True, compile_scope="regional"),
    "bf16-fast-model": Case(fused_qkv=True, channels_last=True, compile_scope="model"),
    "bf16-fast-cudagraphs": Case(
        fused_qkv=True, channels_last=True, compile_scope="regional", compile_mode="reduce-overhead"
    ),
    "bf16-fast-model-cudagraphs": Case(
        fused_qkv=True, channels_last=True, compile_scope="model", compile_mode="reduce-overhead"
    ),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def embedder(case: Case, preset: str, device: torch.device) -> tuple[Callable, Callable[[], Callable]]:
    """The eager function from pixels to unit-norm image embeddings, and a callback that compiles it
    as the case asks (after the FLOP count, which needs the eager one)."""
    dtype = DTYPES[case.dtype]
    if case.impl == "reference":
        with device:
            reference = reference_model(preset).eval()
        sys.modules["cn_clip.clip.model"].convert_weights(reference)  # cn-clip's fp16 inference weights

        def reference_embed(pixels: torch.Tensor) -> torch.Tensor:
            return F.normalize(reference.encode_image(pixels.to(dtype)), dim=-1)

        return reference_embed, lambda: reference_embed
    with device:
        model, _ = build_model(preset)
    model.to(dtype).eval()
    apply_speedups(model, fused_qkv=case.fused_qkv, channels_last=case.channels_last)

    def embed(pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(projected_features(model.get_image_features(pixel_values=pixels.to(dtype))), dim=-1)

    def compiled() -> Callable:
        mode = {"mode": case.compile_mode} if case.compile_mode else {}
        if case.compile_scope == "model":
            return torch.compile(embed, dynamic=False, **mode)
        compile_model(model, case.compile_scope, dynamic=False, **mode)
        return embed

    return embed, compiled


def run_case(name: str, case: Case, args, device: torch.device, peak_tflops: float | None) -> dict:
    """One case: build, count FLOPs eagerly, compile if asked, warm up, time."""
    torch._dynamo.reset()  # each case compiles afresh
    size = PRESETS[args.preset]["vision"]["image_size"]
    pixels = torch.randn(args.batch_size, 3, size, size, device=device)
    embed, compiled = embedder(case, args.preset, device)

    def finish() -> tuple[Callable, dict]:
        compiled_embed = compiled()
        return lambda: compiled_embed(pixels), {}

    with torch.inference_mode():
        flops, seconds, _, elapsed = count_then_time(lambda: embed(pixels), finish, device, args.warmup, args.steps)
    return {
        "bench": "embed",
        "case": name,
        "preset": args.preset,
        "batch_size": args.batch_size,
        **asdict(case),
        **rates(args.batch_size, "image", seconds, flops, peak_tflops, device),
        "warmup_and_timing_s": round(elapsed, 1),
    }


def main() -> None:
    parser = model_bench_parser(__doc__, CASES, ["bf16", "bf16-fast"], batch_size=1024, presets=VIT_PRESETS)
    args = parser.parse_args()
    names = case_names(parser, args.cases, CASES)
    device, peak = start(args.device, args.peak_tflops)
    run_cases("embed", names, lambda name: run_case(name, CASES[name], args, device, peak), device, args.budget_s)


if __name__ == "__main__":
    main()
