"""Does the fastest configuration train like the plain one? Both loss curves on the same data and seed.

    python -m bench.loss_curve --preset ViT-B-16 --batch-size 128 --steps 200 --workers 16
    python -m bench.loss_curve --preset tiny --batch-size 16 --steps 30 --train-images 200 --workers 1   # CPU run

Writes the demo's shapes data (`zhclip demo-data`: coloured shapes with Chinese captions, which a
model learns within a few hundred steps) as JPEG shards (`zhclip ingest image_format: JPEG`),
then trains stage 2 from the same random initialisation, data order and seed twice:

- `plain`: fp32, no speed switch, the loaders decoding and normalising (train.py's defaults);
- `--fast` (default `fast-pf-s2`): that case of bench/train_throughput.py (bf16 autocast, fused
  AdamW and QKV, padding-free text, channels-last, regional compile), its images decoded on the GPU
  (`train.decode_on_device`) when torchvision is installed, else normalised there.

Each prints one JSON line with its per-step losses; a last line compares them: the curves agree when,
smoothed over `--window` steps, they are never more than `--tolerance` apart (in nats; dropout
draws differ between the two, so they are not equal step by step). `--noise-floor` also trains
plain with other dropout draws: the gap between the two plain curves is what chance alone makes, and
the tolerance becomes the larger of it and `--tolerance` (on the tiny preset on a CPU, two plain
runs differing only in dropout draws ended 0.43 nats apart at most). `bench.report` draws the curves.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.measure import emit, environment, peak_memory_mb, pick_device, reset_peak_memory
from bench.train_throughput import CASES, VIT_PRESETS, Case, build_zhclip
from zhclip.components.data.ingest import IngestConfig, ingest
from zhclip.components.data.shards import PreparedSplit
from zhclip.components.demo.data import DemoDataConfig, generate_demo_data
from zhclip.components.training.batch_decoder import BatchDecoder
from zhclip.components.training.epoch_plan import EpochPlan
from zhclip.components.training.loader import on_device, training_batches
from zhclip.components.training.step import seed_everything
from zhclip.model.fast import compile_model
from zhclip.model.presets import PRESETS, build_processor, default_vocab_path

PLAIN = CASES["fp32-s2"]  # fp32, no speed switch


def smoothed(losses: list[float], window: int) -> np.ndarray:
    """Mean of each `window` consecutive losses (the curve people read, without per-step noise)."""
    return np.convolve(np.asarray(losses, dtype=np.float64), np.ones(window) / window, mode="valid")


def compare_curves(plain: list[float], fast: list[float], window: int, tolerance: float) -> dict:
    """The largest gap between the smoothed curves, where it is, and whether it is within tolerance."""
    gaps = np.abs(smoothed(fast, window) - smoothed(plain, window))
    worst = int(gaps.argmax())
    return {
        "window": window,
        "tolerance_nats": tolerance,
        "max_gap_nats": round(float(gaps[worst]), 4),
        "max_gap_at_step": worst + window,
        "final_plain": round(float(np.mean(plain[-window:])), 4),
        "final_fast": round(float(np.mean(fast[-window:])), 4),
        "curves_agree": bool(gaps[worst] <= tolerance),
    }


def write_split(folder: Path, train_images: int) -> Path:
    """The demo's shapes (no digits), three captions each, as JPEG shards in `folder/prepared`."""
    raw, prepared = folder / "raw", folder / "prepared"
    generate_demo_data(
        raw,
        DemoDataConfig(
            train_images=train_images,
            valid_images=1,
            test_images=1,
            train_digits=0,
            valid_digits=0,
            test_digits=0,
            zeroshot_per_class=0,
            pretrain_images=0,
        ),
    )
    ingest(raw, prepared, IngestConfig(image_format="JPEG", workers=1))
    return prepared


def loss_curve(
    case: Case, decode: str, prepared: Path, args, device: torch.device, dropout_seed: int
) -> tuple[list[float], dict]:
    """Per-step losses of `args.steps` steps of `case`, its images decoded by `decode`
    (processor, uint8 or gpu), and what was applied. Initialisation and data order come from
    `args.seed`; dropout draws from `dropout_seed`."""
    torch._dynamo.reset()
    model, step, _, applied = build_zhclip(
        case,
        args.preset,
        device,
        args.context_length,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        total_steps=args.steps,
    )
    seed_everything(dropout_seed)
    compile_model(model, case.compile_scope)
    processor = build_processor(default_vocab_path(), PRESETS[args.preset]["vision"]["image_size"], args.context_length)
    plan = EpochPlan(PreparedSplit.open(str(prepared), "train"), args.batch_size, rank=0, world_size=1, seed=args.seed)
    decoder = BatchDecoder(
        processor, args.context_length, seed=args.seed, eight_bit=decode == "uint8", on_device=decode == "gpu"
    )
    batches = training_batches(plan, decoder, 0, args.steps, args.workers)
    reset_peak_memory(device)
    losses = [step(inputs)["loss"] for _, inputs in on_device(batches, decoder, device)]
    return losses, {**applied, "compile": case.compile_scope, "decode": decode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", default="fast-pf-s2", help="the zhclip case of bench/train_throughput.py to check")
    parser.add_argument("--preset", default="ViT-B-16", choices=VIT_PRESETS)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--context-length", type=int, default=52)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--train-images", type=int, default=2000, help="shapes in the split (three captions each)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=16, help="loader processes")
    parser.add_argument("--window", type=int, default=20, help="steps each smoothed point averages")
    parser.add_argument("--tolerance", type=float, default=0.1, help="largest allowed gap of the smoothed curves, nats")
    parser.add_argument(
        "--noise-floor",
        action="store_true",
        help="also train plain with other dropout draws: the gap that chance alone makes",
    )
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    fast = CASES.get(args.fast)
    if fast is None or fast.impl != "zhclip" or fast.stage != 2 or fast.cache_image_embeds:
        parser.error(f"--fast must be a stage-2 zhclip case of bench/train_throughput.py, got {args.fast!r}")
    if args.steps < args.window:
        parser.error(f"--steps ({args.steps}) must be at least --window ({args.window})")

    device = pick_device(args.device)
    emit({"bench": "environment", **environment(device)})
    gpu_decode = device.type == "cuda" and importlib.util.find_spec("torchvision") is not None
    common = {
        "bench": "loss-curve",
        "preset": args.preset,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "lr": args.lr,
        "seed": args.seed,
    }
    with tempfile.TemporaryDirectory() as tmp:
        prepared = write_split(Path(tmp), args.train_images)
        curves = {}
        runs = [
            ("plain", PLAIN, "processor", args.seed),
            (args.fast, fast, "gpu" if gpu_decode else "uint8", args.seed),
        ]
        if args.noise_floor:
            runs.append(("plain-reseeded", PLAIN, "processor", args.seed + 1))
        for name, case, decode, dropout_seed in runs:
            started = time.perf_counter()
            curves[name], applied = loss_curve(case, decode, prepared, args, device, dropout_seed)
            emit(
                {
                    **common,
                    "case": name,
                    "applied": applied,
                    "seconds": round(time.perf_counter() - started, 1),
                    "peak_memory_mb": peak_memory_mb(device),
                    "losses": [round(loss, 5) for loss in curves[name]],
                }
            )
    tolerance = args.tolerance
    if args.noise_floor:
        noise = compare_curves(curves["plain"], curves["plain-reseeded"], args.window, args.tolerance)
        noise = {key: value for key, value in noise.items() if key not in ("tolerance_nats", "curves_agree")}
        emit({**common, "case": "noise-floor", "plain": "plain", "fast": "plain-reseeded", **noise})
        tolerance = max(tolerance, noise["max_gap_nats"])  # chance alone made that gap
    emit(
        {
            **common,
            "case": "comparison",
            "plain": "plain",
            "fast": args.fast,
            **compare_curves(curves["plain"], curves[args.fast], args.window, tolerance),
        }
    )


if __name__ == "__main__":
    main()
