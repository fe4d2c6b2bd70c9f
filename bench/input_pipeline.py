"""Input-pipeline throughput: prepared Parquet shards -> decode -> resize -> normalise, in images/s.

    python -m bench.input_pipeline --images 8192 --workers 4 16 --gpu-decode
    python -m bench.input_pipeline --images 64 --workers 1 --width 64 --height 48   # CPU smoke run

Writes a prepared split of photo-like JPEGs (--width x --height, as `zhclip ingest
image_format: JPEG` stores them) and measures, side by side, the ways to turn it into model-ready
pixels (each case: images/s, and images/s per decoding core):

- `stream`: zhclip's training input, `zhclip.components.training.loader` (the epoch plan's windows read from
  the row groups; `BatchDecoder`: PIL decode, tokenising, the model's ChineseCLIP image processor)
  with N local decoding processes, what a bare GPU host runs; `--ray` adds `stream-ray`, the same
  with N Ray Data actors, what training under Ray runs; `--augment` adds the random resized crop;
- `stream-uint8`: the same with `train.normalize_on_device`: the decoders hand over 8-bit images
  and the scaling and normalisation run on the device (identical pixels, less CPU per image);
- `legacy`, `legacy-uint8`: the loader before streaming (`bench/legacy_loader.py`: the whole split
  in pandas, captions tokenised up front, a DataLoader with N worker processes), the baseline;
- `gpu`: shard bytes decoded by nvJPEG (`torchvision.io.decode_jpeg` on the GPU), resized and
  normalised there (`model.pixels.pixels_on_device`); needs torchvision and a GPU, and JPEG shards.

Each prints one JSON line; the uint8 and nvJPEG cases also give the largest pixel difference from
the image processor's on the same images (nvJPEG and torch's antialiased bicubic differ slightly
from PIL's decoder and resize; the uint8 path should not differ at all).
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from bench.legacy_loader import EpochBatches, PairDataset, epoch_loader
from bench.measure import emit, environment, pick_device, synchronize
from zhclip.components.data.ingest import IngestConfig
from zhclip.components.data.schema import PAIR_SCHEMA
from zhclip.components.data.shards import PreparedSplit, read_pairs
from zhclip.components.training.batch_decoder import BatchDecoder
from zhclip.components.training.epoch_plan import EpochPlan, read_window
from zhclip.components.training.loader import training_batches
from zhclip.model.pixels import pixels_on_device
from zhclip.model.presets import CLIP_MEAN, CLIP_STD, PRESETS, build_processor, default_vocab_path

SHARD_ROWS = 2000


def photo_like_jpeg(seed: int, width: int, height: int) -> bytes:
    """Smooth colour fields plus sensor-like noise, JPEG quality 90: decodes like a photograph
    (plain random noise would be far slower to decode, flat colour far faster)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(coarse, dtype=np.int16) + rng.normal(0, 12, (height, width, 3)).astype(np.int16)
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_prepared(folder: Path, images: int, width: int, height: int, workers: int, varied: bool = False) -> Path:
    """A prepared `train` split (ingest's Parquet schema) of `images` captioned JPEGs. `varied`: sizes
    within 25% of width x height and captions of 6-50 characters, as in a web-crawled split."""
    split = folder / "train"
    split.mkdir(parents=True)
    rng = np.random.default_rng(0)
    scale = rng.uniform(0.75, 1.25, (images, 2)) if varied else np.ones((images, 2))
    widths, heights = (scale[:, 0] * width).astype(int).tolist(), (scale[:, 1] * height).astype(int).tolist()
    with ProcessPoolExecutor(workers) as pool:
        blobs = list(pool.map(photo_like_jpeg, range(images), widths, heights, chunksize=64))
    lengths = rng.integers(6, 51, images) if varied else np.full(images, 0)
    # CJK characters (one token each) from the unified block
    texts = [
        "".join(map(chr, 0x4E00 + rng.integers(0, 20902, n))) if varied else f"第{i}张图片里有一只猫"
        for i, n in enumerate(lengths)
    ]
    for start in range(0, images, SHARD_ROWS):
        ids = list(range(start, min(start + SHARD_ROWS, images)))
        table = pa.Table.from_pydict(
            {
                "text_id": ids,
                "text": texts[ids[0] : ids[-1] + 1],
                "image_id": ids,
                "image": blobs[ids[0] : ids[-1] + 1],
            },
            schema=PAIR_SCHEMA,
        )
        pq.write_table(
            table, split / f"part-{start // SHARD_ROWS:05d}.parquet", row_group_size=IngestConfig().row_group_rows
        )
    return folder


@dataclass
class Rate:
    images_per_s: float  # over the second half of the batches: the rate once buffers filled during start-up are spent
    overall_images_per_s: float  # with the start-up
    startup_s: float  # until the first batch (processes or actors started, the first window or the whole split read)
    first: torch.Tensor  # the first batch's pixels


def delivered(batches, to_pixels, device: torch.device) -> Rate:
    """Consume a loader's batches, turning each into pixels on `device`; time it."""
    started = time.perf_counter()
    first, marks = None, []  # (time, images so far) after each batch
    for batch in batches:
        pixels = to_pixels(batch)
        synchronize(device)
        first = pixels if first is None else first
        marks.append((time.perf_counter(), (marks[-1][1] if marks else 0) + len(pixels)))
    (mid_at, mid_images), (end_at, images) = marks[len(marks) // 2], marks[-1]
    steady = (images - mid_images) / (end_at - mid_at) if end_at > mid_at else images / (end_at - started)
    return Rate(steady, images / (end_at - started), marks[0][0] - started, first)


def legacy_rate(
    prepared: Path, processor, workers: int, batch_size: int, augment: bool, eight_bit: bool, device: torch.device
) -> Rate:
    """The pre-streaming loader (whole split read, then a DataLoader), reading included."""

    def batches():
        dataset = PairDataset(
            read_pairs(prepared, "train"), processor, context_length=52, augment=augment, eight_bit=eight_bit
        )
        order = EpochBatches(len(dataset), batch_size, rank=0, world_size=1, seed=0, epoch=0)
        for batch in epoch_loader(dataset, order, epoch=0, loader_workers=workers, pin_memory=device.type == "cuda"):
            yield dataset.to_device(batch, device)["pixel_values"]

    return delivered(batches(), lambda pixels: pixels, device)


def stream_rate(
    prepared: Path,
    processor,
    workers: int,
    batch_size: int,
    augment: bool,
    eight_bit: bool,
    on_ray: bool,
    device: torch.device,
    max_batches: int | None = None,
) -> Rate:
    """zhclip's streaming training input, reading included (one epoch, or its first `max_batches`)."""
    plan = EpochPlan(PreparedSplit.open(str(prepared), "train"), batch_size, rank=0, world_size=1, seed=0)
    decoder = BatchDecoder(processor, 52, augment=augment, eight_bit=eight_bit)
    batches = training_batches(
        plan, decoder, 0, min(plan.steps_per_epoch, max_batches or plan.steps_per_epoch), workers, on_ray
    )
    return delivered(batches, lambda batch: decoder.to_device(batch, device)["pixel_values"], device)


def _first_rows(plan: EpochPlan):
    window = next(iter(plan.windows(0, 1)))
    table = read_window(plan, window)
    yield {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def max_difference_from_processor(pixels: torch.Tensor, rows: dict, processor, augment: bool = False) -> float:
    """Largest difference of a path's first pixels from zhclip's image processor on the same (first 8) images."""
    first = {name: values[:8] for name, values in rows.items()}
    on_cpu = torch.from_numpy(BatchDecoder(processor, 52, augment=augment)(first)["pixel_values"])
    return round((pixels[: len(on_cpu)].float().cpu() - on_cpu).abs().max().item(), 4)


def gpu_images_per_s(prepared: Path, size: int, batch_size: int, device: torch.device) -> tuple[float, torch.Tensor]:
    """Images/s of nvJPEG decoding plus on-device resize and normalisation (reading included), and
    the first batch's pixels."""
    from torchvision.io import decode_jpeg

    def run() -> tuple[int, torch.Tensor]:
        blobs = [
            blob
            for table in PreparedSplit.open(str(prepared), "train").tables(["image"])
            for blob in table["image"].to_pylist()
        ]
        first = None
        for start in range(0, len(blobs), batch_size):
            encoded = [torch.frombuffer(blob, dtype=torch.uint8) for blob in blobs[start : start + batch_size]]
            pixels = pixels_on_device(decode_jpeg(encoded, device=device), size, CLIP_MEAN, CLIP_STD)
            first = pixels if first is None else first
        synchronize(device)
        return len(blobs), first

    run()  # warm-up: nvJPEG handles and kernels
    started = time.perf_counter()
    count, first = run()
    return count / (time.perf_counter() - started), first


@contextmanager
def ray_session(wanted: bool, workers: int):
    """A local Ray with room for `workers` decoders, for the Ray Data case only (bare GPU hosts have no Ray)."""
    if not wanted:
        yield
        return
    import ray

    ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--width", type=int, default=500, help="stored image width (typical web photos: 500x375)")
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--workers", type=int, nargs="+", default=[16], help="decoding process counts to measure")
    parser.add_argument("--ray", action="store_true", help="also measure Ray Data decoders (needs Ray)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--augment", action="store_true", help="CPU path with training's random resized crop")
    parser.add_argument(
        "--gpu-decode", action="store_true", help="also measure nvJPEG decoding (needs torchvision, a GPU)"
    )
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    device = pick_device(args.device)
    emit({"bench": "environment", **environment(device)})
    size = PRESETS["ViT-B-16"]["vision"]["image_size"]
    processor = build_processor(default_vocab_path(), size, context_length=52)
    common = {
        "bench": "input",
        "images": args.images,
        "stored_size": f"{args.width}x{args.height}",
        "batch_size": args.batch_size,
        "augment": args.augment,
    }
    with tempfile.TemporaryDirectory() as tmp:
        prepared = write_prepared(Path(tmp), args.images, args.width, args.height, max(1, *args.workers))
        plan = EpochPlan(PreparedSplit.open(str(prepared), "train"), args.batch_size, rank=0, world_size=1, seed=0)
        first_rows = next(_first_rows(plan))
        for workers in args.workers:
            for name, eight_bit, on_ray in (
                ("legacy", False, False),
                ("stream", False, False),
                ("stream-ray", False, True),
                ("legacy-uint8", True, False),
                ("stream-uint8", True, False),
                ("stream-ray-uint8", True, True),
            ):
                if on_ray and not args.ray:
                    continue
                with ray_session(on_ray, workers):
                    rate = (
                        legacy_rate(prepared, processor, workers, args.batch_size, args.augment, eight_bit, device)
                        if name.startswith("legacy")
                        else stream_rate(
                            prepared, processor, workers, args.batch_size, args.augment, eight_bit, on_ray, device
                        )
                    )
                emit(
                    {
                        **common,
                        "case": f"{name}-{workers}-workers",
                        "workers": workers,
                        "images_per_s": round(rate.images_per_s, 1),
                        "images_per_s_per_core": round(
                            rate.images_per_s / max(workers, 1), 1
                        ),  # 0: the consumer decodes
                        "overall_images_per_s": round(rate.overall_images_per_s, 1),
                        "startup_s": round(rate.startup_s, 2),
                        **(
                            {
                                "max_abs_diff_vs_processor": max_difference_from_processor(
                                    rate.first, first_rows, processor, args.augment
                                )
                            }
                            if eight_bit and name.startswith("stream")
                            else {}
                        ),
                    }
                )
        if args.gpu_decode:
            try:
                rate, pixels = gpu_images_per_s(prepared, size, args.batch_size, device)
                in_file_order = {name: values[np.argsort(first_rows["row"])] for name, values in first_rows.items()}
                emit(
                    {
                        **common,
                        "case": "gpu-nvjpeg",
                        "images_per_s": round(rate, 1),
                        "max_abs_diff_vs_processor": max_difference_from_processor(pixels, in_file_order, processor),
                    }
                )
            except Exception as err:  # e.g. no torchvision or no GPU: reported, the CPU figures stand
                emit({**common, "case": "gpu-nvjpeg", "error": f"{type(err).__name__}: {err}"[:2000]})


if __name__ == "__main__":
    main()
