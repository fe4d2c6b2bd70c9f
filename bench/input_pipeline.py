"""Input-pipeline throughput: prepared Parquet shard -> decode -> resize -> normalise, in images/s.

    python -m bench.input_pipeline --images 8192 --workers 4 16 --gpu-decode
    python -m bench.input_pipeline --images 64 --workers 1 --width 64 --height 48   # CPU smoke run

Writes a prepared split of photo-like JPEGs (--width x --height, as `zhclip ingest
image_format: JPEG` stores them) and measures two ways to turn it into model-ready pixels:

- `cpu`: zhclip's training data path, `components.train_data` (PairDataset: PIL decode, the
  model's ChineseCLIP image processor; epoch_loader: a DataLoader with N worker processes, one
  per core, and prefetching); `--augment` adds training's random resized crop;
- `cpu-uint8`: the same path with `train.normalize_on_device` (PairDataset `eight_bit`): the same
  decoding and PIL resize in the loader workers, which hand over 8-bit 224x224 images, and the
  scaling and normalisation run on the device: identical pixels, less CPU work per image and a
  quarter of the bytes to copy;
- `gpu`: shard bytes decoded by nvJPEG (`torchvision.io.decode_jpeg` on the GPU), resized and
  normalised there (`model.fast.pixels_on_device`); needs torchvision and a GPU, and JPEG shards.

Each prints one JSON line with images/s and, for the last two, the largest pixel difference from
the image processor's on the same images (nvJPEG and torch's antialiased bicubic differ slightly
from PIL's decoder and resize; the uint8 path should not differ at all).
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from bench.measure import emit, environment, pick_device, synchronize
from components.ingest import PAIR_SCHEMA, read_pairs
from components.train_data import EpochBatches, PairDataset, epoch_loader
from model.fast import pixels_on_device
from model.presets import CLIP_MEAN, CLIP_STD, PRESETS, build_processor, default_vocab_path

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


def write_prepared(folder: Path, images: int, width: int, height: int, workers: int) -> Path:
    """A prepared `train` split (ingest's Parquet schema) of `images` captioned JPEGs."""
    split = folder / "train"
    split.mkdir(parents=True)
    with ProcessPoolExecutor(workers) as pool:
        blobs = list(pool.map(photo_like_jpeg, range(images), [width] * images, [height] * images, chunksize=64))
    for start in range(0, images, SHARD_ROWS):
        ids = list(range(start, min(start + SHARD_ROWS, images)))
        table = pa.Table.from_pydict({"text_id": ids, "text": [f"第{i}张图片里有一只猫" for i in ids], "image_id": ids,
                                      "image": blobs[ids[0]:ids[-1] + 1]}, schema=PAIR_SCHEMA)
        pq.write_table(table, split / f"part-{start // SHARD_ROWS:05d}.parquet")
    return folder


def cpu_images_per_s(prepared: Path, processor, workers: int, batch_size: int, augment: bool, eight_bit: bool,
                     device: torch.device) -> tuple[float, torch.Tensor]:
    """Images/s of zhclip's training input (PairDataset + epoch_loader, then `to_device`), reading
    included, and the first batch's pixels. `eight_bit`: the loader hands over 8-bit resized images,
    normalised on `device` (train.normalize_on_device)."""
    started = time.perf_counter()
    dataset = PairDataset(read_pairs(prepared, "train"), processor, context_length=52, augment=augment,
                          eight_bit=eight_bit)
    batches = EpochBatches(len(dataset), batch_size, rank=0, world_size=1, seed=0, epoch=0)
    loader = epoch_loader(dataset, batches, epoch=0, loader_workers=workers, pin_memory=device.type == "cuda")
    first, images = None, 0
    for batch in loader:
        pixels = dataset.to_device(batch, device)["pixel_values"]
        first = pixels if first is None else first
        images += len(pixels)
    synchronize(device)
    return images / (time.perf_counter() - started), first


def max_difference_from_processor(pixels: torch.Tensor, prepared: Path, processor, indices: list[int],
                                  augment: bool = False) -> float:
    """Largest difference of a path's first pixels, the images at `indices`, from zhclip's image
    processor on the same images."""
    dataset = PairDataset(read_pairs(prepared, "train"), processor, context_length=52, augment=augment)
    on_cpu = torch.stack([dataset[i]["pixel_values"] for i in indices])
    return round((pixels[:len(on_cpu)].float().cpu() - on_cpu).abs().max().item(), 4)


def gpu_images_per_s(prepared: Path, size: int, batch_size: int, device: torch.device) -> tuple[float, torch.Tensor]:
    """Images/s of nvJPEG decoding plus on-device resize and normalisation (reading included), and
    the first batch's pixels."""
    from torchvision.io import decode_jpeg

    def run() -> tuple[int, torch.Tensor]:
        blobs = read_pairs(prepared, "train")["image"]
        first = None
        for start in range(0, len(blobs), batch_size):
            encoded = [torch.frombuffer(blob, dtype=torch.uint8) for blob in blobs[start:start + batch_size]]
            pixels = pixels_on_device(decode_jpeg(encoded, device=device), size, CLIP_MEAN, CLIP_STD)
            first = pixels if first is None else first
        synchronize(device)
        return len(blobs), first

    run()  # warm-up: nvJPEG handles and kernels
    started = time.perf_counter()
    count, first = run()
    return count / (time.perf_counter() - started), first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--width", type=int, default=500, help="stored image width (typical web photos: 500x375)")
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--workers", type=int, nargs="+", default=[16], help="DataLoader worker counts to measure")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--augment", action="store_true", help="CPU path with training's random resized crop")
    parser.add_argument("--gpu-decode", action="store_true", help="also measure nvJPEG decoding (needs torchvision, a GPU)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    device = pick_device(args.device)
    emit({"bench": "environment", **environment(device)})
    size = PRESETS["ViT-B-16"]["vision"]["image_size"]
    processor = build_processor(default_vocab_path(), size, context_length=52)
    common = {"bench": "input", "images": args.images, "stored_size": f"{args.width}x{args.height}",
              "batch_size": args.batch_size}
    loader_order = next(iter(EpochBatches(args.images, args.batch_size, rank=0, world_size=1, seed=0, epoch=0)))
    with tempfile.TemporaryDirectory() as tmp:
        prepared = write_prepared(Path(tmp), args.images, args.width, args.height, max(1, *args.workers))
        for workers in args.workers:
            for eight_bit in (False, True):
                rate, pixels = cpu_images_per_s(prepared, processor, workers, args.batch_size, args.augment,
                                                eight_bit, device)
                emit({**common, "case": f"cpu-{'uint8-' if eight_bit else ''}{workers}-workers", "workers": workers,
                      "augment": args.augment, "images_per_s": round(rate, 1),
                      "max_abs_diff_vs_processor": max_difference_from_processor(
                          pixels, prepared, processor, loader_order[:8], args.augment)})
        if args.gpu_decode:
            try:
                rate, pixels = gpu_images_per_s(prepared, size, args.batch_size, device)
                emit({**common, "case": "gpu-nvjpeg", "images_per_s": round(rate, 1),
                      "max_abs_diff_vs_processor": max_difference_from_processor(pixels, prepared, processor, list(range(8)))})
            except Exception as err:  # e.g. no torchvision or no GPU: reported, the CPU figures stand
                emit({**common, "case": "gpu-nvjpeg", "error": f"{type(err).__name__}: {err}"[:2000]})


if __name__ == "__main__":
    main()
