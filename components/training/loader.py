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

import hashlib
import io
import math
import random
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from queue import Full, Queue
from typing import cast

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from zhclip.components.data.shards import PreparedSplit
from zhclip.components.training.gpu_decode import Box, decode_jpegs
from zhclip.model import decode_image
from zhclip.model.pixels import pixels_on_device

CROP_SCALE = (0.9, 1.0)  # Chinese-CLIP's training RandomResizedCrop
CROP_RATIO = (3 / 4, 4 / 3)
PAIR_COLUMNS = ["text_id", "text", "image_id", "image"]
PREFETCH_BATCHES = 4  # decoded batches in flight per training worker (bounds the loader's memory)
WINDOW_READERS = 8  # row groups of a window read at once
DEVICE_PREFETCH_BATCHES = 2  # batches prepared on the GPU ahead of the step (decoded images held there)


def random_resized_crop(image: Image.Image, rng: random.Random) -> Image.Image:
    """A random crop covering 90-100% of the image with aspect ratio 3/4..4/3 (torchvision's
    RandomResizedCrop sampling, with Chinese-CLIP's scale); the processor then resizes it."""
    return image.crop(crop_box(*image.size, rng))


def crop_box(width: int, height: int, rng: random.Random) -> Box:
    """random_resized_crop's box (left, top, right, bottom) for an image of that size. Written here
    because torchvision cannot be installed beside the pinned CPU torch; the box alone serves the
    images decoded on the device too."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        ratio = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
        crop_w, crop_h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
            return left, top, left + crop_w, top + crop_h
    # As torchvision: a centre crop at the nearest allowed aspect ratio (very wide or tall images).
    ratio = min(max(width / height, CROP_RATIO[0]), CROP_RATIO[1])
    crop_w, crop_h = min(width, round(height * ratio)), min(height, round(width / ratio))
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return left, top, left + crop_w, top + crop_h


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
        positions = positions[window.skip : window.skip + window.take]
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
    """Raw pairs -> model inputs: token ids, pixels (float, or 8-bit for `eight_bit`), the pair ids,
    the pair keys of the false-negative-aware losses (`image_key`: a hash of the image's bytes, so the
    same picture under two ids is one image; `text_key`: a hash of the caption) and `text_truncated`
    (the caption had more tokens than `context_length` and was cut).

    Augmentation draws from a generator seeded by (seed, epoch, pair row), so where and in how many
    processes a batch is decoded changes nothing. With `eight_bit` the pixels stay 8-bit after the
    processor's resize and `to_device` scales and normalises them on the training device: the same
    pixels, without the float conversion that takes about half a loader core's time per image.

    With `on_device` the loaders decode no JPEG at all: they read each image's header (size, for the
    crop box), tokenise, and hand over the bytes with the box; `to_device` decodes them on the
    training device (nvJPEG on a GPU, through torchvision), crops, resizes and normalises there.
    Images a GPU decoder cannot take (PNG, CMYK or progressive JPEG) are decoded by the loaders as with
    `eight_bit`, so a mixed split trains as it is.
    """

    def __init__(
        self,
        processor,
        context_length: int,
        augment: bool = False,
        seed: int = 0,
        eight_bit: bool = False,
        on_device: bool = False,
    ):
        self.tokenizer, self.image_processor = processor.tokenizer, processor.image_processor
        self.context_length, self.augment, self.seed = context_length, augment, seed
        self.eight_bit, self.on_device = eight_bit, on_device

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tokens = self.tokenizer(
            list(rows["text"]),
            padding="max_length",
            truncation=True,
            max_length=self.context_length,
            return_tensors="np",
        )
        batch = {
            "input_ids": tokens["input_ids"].astype(np.int64),
            "attention_mask": tokens["attention_mask"].astype(np.int64),
            "text_id": np.asarray(rows["text_id"]),
            "image_id": np.asarray(rows["image_id"]),
            "image_key": content_keys(rows["image"]),
            "text_key": content_keys(text.encode("utf-8") for text in rows["text"]),
            # the tokenizer keeps what truncation cut off: a caption that lost tokens has some
            "text_truncated": np.array([bool(encoding.overflowing) for encoding in tokens.encodings]),
        }
        samples = list(zip(rows["image"], rows["epoch"], rows["row"]))
        if self.on_device:
            return {**batch, **self._for_device(samples)}
        images = [self._image(blob, int(epoch), int(row)) for blob, epoch, row in samples]
        if self.eight_bit:
            pixels = np.stack([self._eight_bit(image) for image in images])
        else:
            pixels = self.image_processor(images=images, return_tensors="np")["pixel_values"]
        return {**batch, "pixel_values": pixels}

    def _crop(self, epoch: int, row: int, width: int, height: int) -> Box:
        return (
            crop_box(width, height, random.Random(f"{self.seed}-{epoch}-{row}"))
            if self.augment
            else (0, 0, width, height)
        )

    def _image(self, blob: bytes, epoch: int, row: int) -> Image.Image:
        image = decode_image(blob)
        return image.crop(self._crop(epoch, row, *image.size)) if self.augment else image

    def _eight_bit(self, image: Image.Image) -> np.ndarray:
        # the processor's own first step (RGB, squashed to its size with its resampling filter)
        size = self.image_processor.size
        resized = image.convert("RGB").resize(
            (size["width"], size["height"]), Image.Resampling(self.image_processor.resample)
        )
        return np.asarray(resized).transpose(2, 0, 1).copy()

    def _for_device(self, samples: list) -> dict[str, np.ndarray]:
        """Per image: the JPEG bytes and crop box for the device, or (`pixels`) the loader's 8-bit pixels."""
        jpegs, pixels, boxes = [], [], []
        for blob, epoch, row in samples:
            header = Image.open(io.BytesIO(blob))  # the header only; decode_image below names a corrupt one
            if device_decodable(header):
                jpegs.append(blob)
                pixels.append(b"")
                boxes.append(self._crop(int(epoch), int(row), *header.size))
            else:
                jpegs.append(b"")
                pixels.append(self._eight_bit(self._image(blob, int(epoch), int(row))).tobytes())
                boxes.append((0, 0, 0, 0))
        # object arrays of bytes: one entry per row, as Ray Data's batches need
        return {
            "jpeg": np.array(jpegs, dtype=object),
            "pixels": np.array(pixels, dtype=object),
            "crop_box": np.array(boxes, dtype=np.int64).reshape(-1, 4),
        }

    def to_device(self, batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
        """The model's inputs of a decoded batch on `device`, 8-bit pixels scaled and normalised there."""
        processor = self.image_processor
        keys = ("input_ids", "attention_mask", "image_key", "text_key")
        keys += () if self.on_device else ("pixel_values",)
        moved = {key: _moved(torch.as_tensor(batch[key]), device) for key in keys}
        if self.on_device:
            moved["pixel_values"] = self._decoded_on_device(batch, device)
        elif moved["pixel_values"].dtype == torch.uint8:
            moved["pixel_values"] = pixels_on_device(
                moved["pixel_values"], processor.size["height"], processor.image_mean, processor.image_std
            )
        return moved

    def _decoded_on_device(self, batch: dict[str, np.ndarray], device: torch.device) -> torch.Tensor:
        processor = self.image_processor
        size = processor.size["height"]
        images: dict[int, torch.Tensor] = {}  # by row: its JPEG decoded here, or its pixels from the loader
        rows = [index for index, blob in enumerate(batch["jpeg"]) if len(blob)]
        if rows:
            # one host buffer for the batch's JPEGs, each a view of it (torch wants writable memory)
            blobs = [batch["jpeg"][index] for index in rows]
            buffer = torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8)
            ends = np.cumsum([len(blob) for blob in blobs])
            encoded = [buffer[end - len(blob) : end] for blob, end in zip(blobs, ends)]
            boxes = [
                (int(left), int(top), int(right), int(bottom))
                for left, top, right, bottom in (batch["crop_box"][index] for index in rows)
            ]
            for index, image in zip(rows, decode_jpegs(encoded, boxes, device)):
                images[index] = image
        for index, blob in enumerate(batch["pixels"]):
            if len(blob):
                images[index] = _moved(torch.frombuffer(bytearray(blob), dtype=torch.uint8).view(3, size, size), device)
        ordered = [images[index] for index in range(len(batch["jpeg"]))]
        return pixels_on_device(ordered, size, processor.image_mean, processor.image_std)


def content_keys(blobs) -> np.ndarray:
    """One int64 per item: the first 8 bytes of its BLAKE2b hash (equal content, equal key; a
    collision between different items is a 1 in 2^64 chance per pair)."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "little", signed=True) for blob in blobs],
        dtype=np.int64,
    )


def device_decodable(header: Image.Image) -> bool:
    """Baseline RGB or grey JPEGs, which nvJPEG's batched decoder takes (its output equals PIL's
    RGB conversion for both)."""
    return header.format == "JPEG" and header.mode in ("RGB", "L") and not header.info.get("progressive")


def _moved(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    # Pinned host memory lets the copy to a GPU overlap the running step.
    return (tensor.pin_memory() if device.type == "cuda" else tensor).to(device, non_blocking=True)


def on_device(
    batches: Iterator[dict[str, np.ndarray]],
    decoder: BatchDecoder,
    device: torch.device,
    ahead: int = DEVICE_PREFETCH_BATCHES,
) -> Iterator[tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]]:
    """Each decoded batch with its model inputs on `device`. On a GPU a thread prepares the next
    `ahead` batches (copies, nvJPEG decoding, resizing) on a CUDA stream of its own while the step
    runs, so the GPU's decoding and the CPU's launches of it overlap training; elsewhere each batch
    is prepared when it is asked for."""
    if device.type != "cuda":
        return ((batch, decoder.to_device(batch, device)) for batch in batches)
    stream = torch.cuda.Stream(device)

    def prepare(batch: dict[str, np.ndarray]):
        with torch.cuda.device(device), torch.cuda.stream(stream):
            inputs = decoder.to_device(batch, device)
            ready = torch.cuda.Event()
            ready.record(stream)
        return inputs, ready

    def handed_over(items):
        for batch, (inputs, ready) in items:
            current = torch.cuda.current_stream(device)
            current.wait_event(ready)
            for tensor in inputs.values():
                tensor.record_stream(current)  # made on the side stream, freed after the step's use
            yield batch, inputs

    return handed_over(prepared_ahead(batches, prepare, ahead))


def prepared_ahead(items: Iterator, prepare, ahead: int) -> Iterator[tuple]:
    """(item, prepare(item)) for each item, in order, prepared by a thread up to `ahead` items ahead;
    an error in either is raised here, and closing this generator stops the thread."""
    queue: Queue = Queue(maxsize=ahead)
    stop = threading.Event()
    finished = object()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                queue.put(entry, timeout=0.1)
                return True
            except Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put((item, prepare(item))):
                    return
            put(finished)
        except BaseException as err:  # handed to the consumer, raised there
            put(err)

    thread = threading.Thread(target=work, name="zhclip-device-prefetch", daemon=True)
    thread.start()
    try:
        while (entry := queue.get()) is not finished:
            if isinstance(entry, BaseException):
                raise entry
            yield entry
    finally:
        stop.set()
        thread.join()
        close = getattr(items, "close", None)  # a generator's
        if close is not None:
            close()  # the thread no longer runs it: free its processes or Ray actors now


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


def _decode_in_process(rows: dict[str, np.ndarray]) -> dict[str, torch.Tensor | np.ndarray]:
    # As tensors: torch hands them back through shared memory, where numpy arrays would be pickled
    # through a pipe. Byte strings (images for the device) can only be pickled.
    assert _process_decoder is not None  # set by the pool's initializer, _start_decoder
    return {
        name: values if values.dtype == object else torch.from_numpy(values)
        for name, values in _process_decoder(rows).items()
    }


def _decoded_by_processes(
    plan: EpochPlan, decoder: BatchDecoder, start_step: int, end_step: int, workers: int
) -> Iterator[dict[str, np.ndarray]]:
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


def _decoded_by_ray_data(
    plan: EpochPlan, decoder: BatchDecoder, start_step: int, end_step: int, workers: int
) -> Iterator[dict[str, np.ndarray]]:
    """Batches decoded by `workers` Ray Data actors (anywhere in the cluster), in order."""
    import logging

    import ray.data

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its notices per dataset are not the trainer's business
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    windows = [vars(window) for window in plan.windows(start_step, end_step)]
    dataset = (
        ray.data.from_items(windows, override_num_blocks=len(windows))
        # Reading is light (no decoding): it takes no core, so it never waits behind the decoders.
        # Ray's map_batches types fn as batch -> batch; a numpy-format fn with fn_kwargs is outside it
        .map_batches(
            _windows_read,  # pyright: ignore[reportArgumentType]
            batch_size=1,
            batch_format="numpy",
            fn_kwargs={"plan": plan},
            num_cpus=0,
            compute=ray.data.TaskPoolStrategy(size=2),
        )
        .map_batches(
            _DecoderActor,
            batch_size=plan.batch_size,
            batch_format="numpy",
            fn_constructor_args=(decoder,),
            num_cpus=1,
            compute=ray.data.ActorPoolStrategy(size=workers),
        )
    )
    # batch_format="numpy": dicts of arrays (Ray types the batches of every format alike)
    batches = dataset.iter_batches(batch_size=plan.batch_size, batch_format="numpy", prefetch_batches=PREFETCH_BATCHES)
    yield from cast(Iterator[dict[str, np.ndarray]], batches)


def training_batches(
    plan: EpochPlan,
    decoder: BatchDecoder,
    start_step: int,
    end_step: int,
    loader_workers: int = 0,
    on_ray: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
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
    keys = (np.asarray(text_ids, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ np.asarray(
        image_ids, dtype=np.uint64
    )
    keys ^= keys >> np.uint64(31)
    keys *= np.uint64(0xBF58476D1CE4E5B9)
    keys ^= keys >> np.uint64(29)
    return f"{int(keys.sum(dtype=np.uint64)):016x}"
