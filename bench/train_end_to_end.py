"""End-to-end training throughput: real JPEG shards through the streaming training input into the step.

    python -m bench.train_end_to_end --case fast-pf-s2 --images 8192 --workers 16 --inputs cpu gpu
    python -m bench.train_end_to_end --preset tiny --batch-size 8 --images 64 --workers 1 --steps 2 \\
        --warmup 1 --width 64 --height 48 --inputs cpu        # CPU smoke run

Writes a prepared split of photo-like JPEGs (sizes within 25% of --width x --height, captions of
6-50 characters) and trains one zhclip case of bench/train_throughput.py (its model, switches and
TrainStep, compiled as training compiles it) on it, fed as training feeds it: `EpochPlan` windows,
`BatchDecoder` in `--workers` local processes (a GPU host has no Ray), `on_device` (the GPU
prefetch thread). One JSON line per input:

- `tensors`: the same split's first batches with their real token ids but random pixels, already on
  the device, cycled: the step alone, the rate the others are compared with (`x_tensors`);
- `cpu`: the loaders decode, crop and resize, and hand over 8-bit pixels (`train.normalize_on_device`);
- `gpu`: the loaders hand over the JPEG bytes, the GPU decodes them (`train.decode_on_device`;
  needs torchvision).

Each reports samples/s over the timed steps, the share of the time the step waited for its batch,
and peak GPU memory. Needs torch, transformers, torchvision (for `gpu`) and the cn-clip wheel (its
vocab); no Ray or MLflow.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import torch

from bench.input_pipeline import write_prepared
from bench.measure import emit, environment, peak_memory_mb, pick_device, reset_peak_memory, synchronize
from bench.train_throughput import CASES, VIT_PRESETS, build_zhclip
from zhclip.components.data.shards import PreparedSplit
from zhclip.components.training.batch_decoder import BatchDecoder
from zhclip.components.training.epoch_plan import EpochPlan
from zhclip.components.training.loader import on_device, training_batches
from zhclip.model.fast import compile_model
from zhclip.model.presets import PRESETS, build_processor, default_vocab_path

INPUTS = ("tensors", "cpu", "gpu")


def timed_steps(batches, step, device: torch.device, warmup: int, steps: int) -> dict:
    """Run `step` on each batch; samples/s and the share of the time spent waiting for a batch, over
    the `steps` after `warmup` (compilation for new text lengths happens there). The step waits for
    its loss (TrainStep reads it), so the time between steps is the input's."""
    batches = iter(batches)
    for inputs in itertools.islice(batches, warmup):
        step(inputs)
    synchronize(device)
    reset_peak_memory(device)
    waited, samples, started = 0.0, 0, time.perf_counter()
    for _ in range(steps):
        asked = time.perf_counter()
        inputs = next(batches, None)
        if inputs is None:
            raise ValueError(f"the split gave fewer than {warmup + steps} batches: write more --images")
        waited += time.perf_counter() - asked
        step(inputs)
        samples += len(inputs["input_ids"])
    synchronize(device)
    elapsed = time.perf_counter() - started
    return {
        "samples_per_s": round(samples / elapsed, 1),
        "data_wait_share": round(waited / elapsed, 3),
        "peak_memory_mb": peak_memory_mb(device),
    }


def random_pixel_batches(plan: EpochPlan, decoder: BatchDecoder, device: torch.device, count: int):
    """The split's first `count` batches of token ids, with random pixels, on the device, cycled."""
    size = decoder.image_processor.size["height"]
    batches = []
    for batch in training_batches(plan, decoder, 0, count):
        inputs = {key: torch.as_tensor(batch[key]).to(device) for key in ("input_ids", "attention_mask")}
        inputs["pixel_values"] = torch.randn(len(batch["input_ids"]), 3, size, size, device=device)
        batches.append(inputs)
    return itertools.cycle(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="fast-pf-s2", help="a zhclip case of bench/train_throughput.py")
    parser.add_argument("--inputs", nargs="+", default=list(INPUTS), choices=INPUTS)
    parser.add_argument("--preset", default="ViT-B-16", choices=VIT_PRESETS)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--context-length", type=int, default=52)
    parser.add_argument(
        "--images", type=int, default=8192, help="pairs in the written split (more than warm-up + steps batches)"
    )
    parser.add_argument("--width", type=int, default=500, help="stored image width (typical web photos: 500x375)")
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--workers", type=int, default=16, help="loader processes (tokenising; decoding for `cpu`)")
    parser.add_argument("--augment", action="store_true", help="random resized crops, as train.augment")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    case = CASES.get(args.case)
    if case is None or case.impl != "zhclip" or case.cache_image_embeds:
        parser.error(
            f"--case must be a zhclip case of bench/train_throughput.py that trains on images, got {args.case!r}"
        )

    device = pick_device(args.device)
    torch.backends.cudnn.benchmark = True  # as in bench/train_throughput.py
    emit({"bench": "environment", **environment(device)})
    processor = build_processor(default_vocab_path(), PRESETS[args.preset]["vision"]["image_size"], args.context_length)
    model, train_step, _, applied = build_zhclip(case, args.preset, device, args.context_length)
    compile_model(model, case.compile_scope, **({"mode": case.compile_mode} if case.compile_mode else {}))
    applied["compile"] = case.compile_scope
    common = {
        "bench": "train-e2e",
        "case": args.case,
        "preset": args.preset,
        "batch_size": args.batch_size,
        "images": args.images,
        "stored_size": f"{args.width}x{args.height}",
        "workers": args.workers,
        "augment": args.augment,
        "applied": applied,
    }
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        write_prepared(Path(tmp), args.images, args.width, args.height, args.workers, varied=True)
        emit({"bench": "train-e2e", "wrote_split_s": round(time.perf_counter() - started, 1)})
        plan = EpochPlan(PreparedSplit.open(tmp, "train"), args.batch_size, rank=0, world_size=1, seed=0)
        rates = {}
        for name in args.inputs:
            decoder = BatchDecoder(
                processor, args.context_length, augment=args.augment, eight_bit=name == "cpu", on_device=name == "gpu"
            )
            try:
                if name == "tensors":
                    batches = random_pixel_batches(plan, decoder, device, min(8, plan.steps_per_epoch))
                else:
                    stream = training_batches(plan, decoder, 0, args.warmup + args.steps, args.workers)
                    batches = (inputs for _, inputs in on_device(stream, decoder, device))
                rates[name] = timed_steps(batches, train_step, device, args.warmup, args.steps)
                baseline = rates.get("tensors", {}).get("samples_per_s")
                ratio = {"x_tensors": round(rates[name]["samples_per_s"] / baseline, 3)} if baseline else {}
                emit({**common, "input": name, **rates[name], **ratio})
            except Exception as err:  # e.g. no torchvision for `gpu`: reported, the other inputs stand
                emit({**common, "input": name, "error": f"{type(err).__name__}: {err}"[:2000]})


if __name__ == "__main__":
    main()
