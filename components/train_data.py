"""Training input: each worker's share of the prepared pairs as a stream, in a resumable, reproducible order.

The order (`EpochPlan`) depends only on (seed, epoch) and the split's row groups, never on the data's
bytes: the row groups are permuted, their rows laid end to end, and each of the `world_size` workers
takes an equal contiguous range of that sequence (disjoint; the remainder, less than one global batch
plus one row per worker, is dropped as in the reference). A worker's range is cut into windows of
about `window_rows` rows; the rows of a window, drawn from the several row groups of random shards it
spans, are shuffled. So every batch mixes shards, memory holds a window (not the split), and a run
resumed at step s computes, without reading anything, the window and row it continues from: it reads
exactly the batches an uninterrupted run reads, in the same order.

Why not Ray Data's own split and shuffle: `streaming_split` hands blocks to workers as they ask,
so which pairs a worker gets is not reproducible and an iterator has no state to resume from;
`random_shuffle` moves the whole split through the object store. Ray Data runs the work instead: the
windows are read and their batches decoded (image, augmentation, tokens) by `loader_workers` actors
that can sit on any CPU node of the cluster, in order (`preserve_order`). Without Ray (a bare GPU
host, `bench/`), local processes run the same `BatchDecoder`; with 0 workers, the training process.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from components.shards import PreparedSplit
from model import decode_image
from model.fast import pixels_on_device

CROP_SCALE = (0.9, 1.0)  # Chinese-CLIP's training RandomResizedCrop
CROP_RATIO = (3 / 4, 4 / 3)
PAIR_COLUMNS = ["text_id", "text", "image_id", "image"]
PREFETCH_BATCHES = 4  # decoded batches in flight per training worker (bounds the loader's memory)
WINDOW_READERS = 8  # row groups of a window read at once


def random_resized_crop(image: Image.Image, rng: random.Random) -> Image.Image:
    """A random crop covering 90-100% of the image with aspect ratio 3/4..4/3 (torchvision's
    RandomResizedCrop sampling, with Chinese-CLIP's scale); the processor then resizes it. Written
    here because torchvision cannot be installed beside the pinned CPU torch."""
    width, height = image.size
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        ratio = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
        crop_w, crop_h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
            return image.crop((left, top, left + crop_w, top + crop_h))
    # As torchvision: a centre crop at the nearest allowed aspect ratio (very wide or tall images).
    ratio = min(max(width / height, CROP_RATIO[0]), CROP_RATIO[1])
    crop_w, crop_h = min(width, round(height * ratio)), min(height, round(width / ratio))
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return image.crop((left, top, left + crop_w, top + crop_h))


def steps_per_epoch(pairs: int, batch_size: int, world_size: int) -> int:
    """Full batches each worker gets per epoch (the remainder is dropped, as in the reference)."""
    return (pairs // world_size) // batch_size


@dataclass(frozen=True)
class Window:
    """Rows [skip, skip + take) of window `index` of an epoch: whole batches, in the window's shuffled order."""

    epoch: int
    index: int
    skip: int
    take: int


@dataclass
class EpochPlan:
    """Which rows of the split a worker reads, in which order, for every epoch (see the module doc)."""

    split: PreparedSplit
    batch_size: int
    rank: int
    world_size: int
    seed: int
    window_rows: int = 4096

    def __post_init__(self):
        self.group_rows = np.array([group.rows for group in self.split.groups], dtype=np.int64)
        self.first_rows = self.split.first_rows()
        self.pairs = self.split.rows
        self.steps_per_epoch = steps_per_epoch(self.pairs, self.batch_size, self.world_size)
        self.window_batches = max(1, round(self.window_rows / self.batch_size))

    def windows(self, start_step: int, end_step: int) -> Iterator[Window]:
        """The windows covering this worker's steps [start_step, end_step), across epochs."""
        step = start_step
        while step < end_step:
            epoch, in_epoch = divmod(step, self.steps_per_epoch)
            index, in_window = divmod(in_epoch, self.window_batches)
            window_steps = min(self.window_batches, self.steps_per_epoch - index * self.window_batches)
            steps = min(window_steps - in_window, end_step - step)
            yield Window(epoch, index, in_window * self.batch_size, steps * self.batch_size)
            step += steps

    def rows(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """(row group, row within it) of each row the window hands out, in order."""
        rng = np.random.default_rng([self.seed, window.epoch])
        order = rng.permutation(len(self.group_rows))
        ends = np.cumsum(self.group_rows[order])
        per_worker = self.steps_per_epoch * self.batch_size
        window_size = self.window_batches * self.batch_size
        first = self.rank * (self.pairs // self.world_size) + window.index * window_size
        positions = np.arange(first, first + min(window_size, per_worker - window.index * window_size))
        np.random.default_rng([self.seed, window.epoch, self.rank, window.index]).shuffle(positions)
        positions = positions[window.skip:window.skip + window.take]
        slot = np.searchsorted(ends, positions, side="right")
        return order[slot], positions - (ends[slot] - self.group_rows[order[slot]])


def read_window(plan: EpochPlan, window: Window) -> pa.Table:
    """The window's pairs in order, with their split-wide row number and epoch (augmentation seeds)."""
    groups, offsets = plan.rows(window)
    wanted = np.unique(groups)
    places = [np.flatnonzero(groups == group) for group in wanted]

    def piece(group: int, chosen: np.ndarray) -> pa.Table:
        return plan.split.read(int(group), PAIR_COLUMNS).take(offsets[chosen])

    # The row groups of a window at once: from MinIO each read is a round trip (Arrow releases the GIL).
    with ThreadPoolExecutor(WINDOW_READERS) as pool:
        pieces = list(pool.map(piece, wanted, places))
    table = pa.concat_tables(pieces).take(np.argsort(np.concatenate(places), kind="stable"))
    rows = plan.first_rows[groups] + offsets
    return table.append_column("row", pa.array(rows)).append_column("epoch", pa.array(np.full(len(rows), window.epoch)))


class BatchDecoder:
    """Raw pairs -> model inputs: token ids, pixels (float, or 8-bit for `eight_bit`), and the pair ids.

    Augmentation draws from a generator seeded by (seed, epoch, pair row), so where and in how many
    processes a batch is decoded changes nothing. With `eight_bit` the pixels stay 8-bit after the
    processor's resize and `to_device` scales and normalises them on the training device: the same
    pixels, without the float conversion that takes about half a loader core's time per image.
    """

    def __init__(self, processor, context_length: int, augment: bool = False, seed: int = 0, eight_bit: bool = False):
        self.tokenizer, self.image_processor = processor.tokenizer, processor.image_processor
        self.context_length, self.augment, self.seed, self.eight_bit = context_length, augment, seed, eight_bit

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tokens = self.tokenizer(list(rows["text"]), padding="max_length", truncation=True,
                                max_length=self.context_length, return_tensors="np")
        images = [self._image(blob, int(epoch), int(row)) for blob, epoch, row in zip(rows["image"], rows["epoch"], rows["row"])]
        if self.eight_bit:
            pixels = np.stack([self._eight_bit(image) for image in images])
        else:
            pixels = self.image_processor(images=images, return_tensors="np")["pixel_values"]
        return {"input_ids": tokens["input_ids"].astype(np.int64), "attention_mask": tokens["attention_mask"].astype(np.int64),
                "pixel_values": pixels, "text_id": np.asarray(rows["text_id"]), "image_id": np.asarray(rows["image_id"])}

    def _image(self, blob: bytes, epoch: int, row: int) -> Image.Image:
        image = decode_image(blob)
        return random_resized_crop(image, random.Random(f"{self.seed}-{epoch}-{row}")) if self.augment else image

    def _eight_bit(self, image: Image.Image) -> np.ndarray:
        # the processor's own first step (RGB, squashed to its size with its resampling filter)
        size = self.image_processor.size
        resized = image.convert("RGB").resize((size["width"], size["height"]), Image.Resampling(self.image_processor.resample))
        return np.asarray(resized).transpose(2, 0, 1).copy()

    def to_device(self, batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
        """The model's inputs of a decoded batch on `device`, 8-bit pixels scaled and normalised there."""
        # Pinned host memory lets the copy to a GPU overlap the previous step.
        host = {key: torch.as_tensor(batch[key]) for key in ("input_ids", "attention_mask", "pixel_values")}
        moved = {key: (value.pin_memory() if device.type == "cuda" else value).to(device, non_blocking=True)
                 for key, value in host.items()}
        if moved["pixel_values"].dtype == torch.uint8:
            processor = self.image_processor
            moved["pixel_values"] = pixels_on_device(moved["pixel_values"], processor.size["height"],
                                                     processor.image_mean, processor.image_std)
        return moved


def _batches_of(table: pa.Table, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    for start in range(0, len(table), batch_size):
        piece = table.slice(start, batch_size)
        yield {name: piece.column(name).to_numpy(zero_copy_only=False) for name in piece.column_names}


def _raw_batches(plan: EpochPlan, start_step: int, end_step: int) -> Iterator[dict[str, np.ndarray]]:
    for window in plan.windows(start_step, end_step):
        yield from _batches_of(read_window(plan, window), plan.batch_size)


_process_decoder: BatchDecoder | None = None


def _start_decoder(decoder: BatchDecoder) -> None:
    global _process_decoder
    torch.set_num_threads(1)  # one decoding core per process
    _process_decoder = decoder


def _decode_in_process(rows: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    # As tensors: torch hands them back through shared memory, where numpy arrays would be pickled through a pipe.
    return {name: torch.from_numpy(values) for name, values in _process_decoder(rows).items()}


def _decoded_by_processes(plan: EpochPlan, decoder: BatchDecoder, start_step: int, end_step: int,
                          workers: int) -> Iterator[dict[str, np.ndarray]]:
    """Batches decoded by local processes, `PREFETCH_BATCHES` per process in flight, in order."""
    with ProcessPoolExecutor(workers, initializer=_start_decoder, initargs=(decoder,)) as pool:
        pending: deque = deque()
        for rows in _raw_batches(plan, start_step, end_step):
            pending.append(pool.submit(_decode_in_process, rows))
            if len(pending) >= PREFETCH_BATCHES * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _windows_read(rows: dict[str, np.ndarray], plan: EpochPlan) -> Iterator[pa.Table]:
    """A window's pairs as one block per batch, so that the decoders share a window's batches."""
    for spec in zip(rows["epoch"], rows["index"], rows["skip"], rows["take"]):
        table = read_window(plan, Window(*spec))
        for start in range(0, len(table), plan.batch_size):
            yield table.slice(start, plan.batch_size)


class _DecoderActor:
    """A Ray Data actor holding one decoder, on one core (torch's own threads would oversubscribe the node)."""

    def __init__(self, decoder: BatchDecoder):
        torch.set_num_threads(1)
        self.decoder = decoder

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.decoder(rows)


def _decoded_by_ray_data(plan: EpochPlan, decoder: BatchDecoder, start_step: int, end_step: int,
                         workers: int) -> Iterator[dict[str, np.ndarray]]:
    """Batches decoded by `workers` Ray Data actors (anywhere in the cluster), in order."""
    import logging

    import ray.data

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its notices per dataset are not the trainer's business
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    windows = [vars(window) for window in plan.windows(start_step, end_step)]
    dataset = (ray.data.from_items(windows, override_num_blocks=len(windows))
               # Reading is light (no decoding): it takes no core, so it never waits behind the decoders.
               .map_batches(_windows_read, batch_size=1, batch_format="numpy", fn_kwargs={"plan": plan},
                            num_cpus=0, compute=ray.data.TaskPoolStrategy(size=2))
               .map_batches(_DecoderActor, batch_size=plan.batch_size, batch_format="numpy",
                            fn_constructor_args=(decoder,), num_cpus=1, compute=ray.data.ActorPoolStrategy(size=workers)))
    yield from dataset.iter_batches(batch_size=plan.batch_size, batch_format="numpy", prefetch_batches=PREFETCH_BATCHES)


def training_batches(plan: EpochPlan, decoder: BatchDecoder, start_step: int, end_step: int, loader_workers: int = 0,
                     on_ray: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """This worker's decoded batches for steps [start_step, end_step), in the plan's order.

    Decoded by `loader_workers` Ray Data actors when `on_ray`, by as many local processes otherwise,
    in this process when 0; the batches are the same either way.
    """
    if not loader_workers:
        return (decoder(rows) for rows in _raw_batches(plan, start_step, end_step))
    if on_ray:
        return _decoded_by_ray_data(plan, decoder, start_step, end_step, loader_workers)
    return _decoded_by_processes(plan, decoder, start_step, end_step, loader_workers)


def pair_digest(text_ids: np.ndarray, image_ids: np.ndarray) -> str:
    """An order-free fingerprint of a batch's (text_id, image_id) pairs: equal digests, equal pairs
    (barring a 64-bit collision). The training history keeps one per step, so runs can be compared."""
    keys = (np.asarray(text_ids, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ np.asarray(image_ids, dtype=np.uint64)
    keys ^= keys >> np.uint64(31)
    keys *= np.uint64(0xBF58476D1CE4E5B9)
    keys ^= keys >> np.uint64(29)
    return f"{int(keys.sum(dtype=np.uint64)):016x}"
