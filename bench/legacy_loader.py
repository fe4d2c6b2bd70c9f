"""The training input as it was before streaming (zhclip 2026-11), kept as the benchmark's baseline.

The whole split is read into pandas (`read_pairs`) (image bytes included) and every caption tokenised up front;
a DataLoader's worker processes decode and resize the images of each batch. `bench.input_pipeline`
runs it beside the streaming input (`zhclip.components.training.loader`) to compare images/s per decoding core.
Nothing outside bench/ uses it.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from zhclip.components.training.batch_decoder import random_resized_crop
from zhclip.model import decode_image
from zhclip.model.pixels import pixels_on_device


class PairDataset(Dataset):
    """(token ids, pixel values) per (text, image) pair; images are decoded (and augmented) as read.

    With `eight_bit` the pixels stay 8-bit after the processor's resize, and `to_device` scales and
    normalises them on the training device: the same pixels, without the float conversion and
    normalisation that take about half of a loader process's time per image.
    """

    def __init__(
        self,
        pairs: pd.DataFrame,
        processor,
        context_length: int,
        augment: bool = False,
        seed: int = 0,
        eight_bit: bool = False,
    ):
        tokens = processor.tokenizer(
            list(pairs["text"]), padding="max_length", truncation=True, max_length=context_length, return_tensors="pt"
        )
        self.input_ids, self.attention_mask = tokens["input_ids"], tokens["attention_mask"]
        self.images = list(pairs["image"])
        self.image_processor = processor.image_processor
        self.augment, self.seed, self.epoch, self.eight_bit = augment, seed, 0, eight_bit

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image = decode_image(self.images[index])
        if self.augment:
            image = random_resized_crop(image, random.Random(f"{self.seed}-{self.epoch}-{index}"))
        pixels = (
            self._eight_bit(image)
            if self.eight_bit
            else self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
        )
        return {
            "input_ids": self.input_ids[index],
            "attention_mask": self.attention_mask[index],
            "pixel_values": pixels,
        }

    def _eight_bit(self, image: Image.Image) -> torch.Tensor:
        # the processor's own first step (RGB, squashed to its size with its resampling filter)
        size = self.image_processor.size
        resized = image.convert("RGB").resize(
            (size["width"], size["height"]), Image.Resampling(self.image_processor.resample)
        )
        return torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1)

    def to_device(self, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        """A loader batch on `device`, its 8-bit pixels (if any) scaled and normalised there as the processor does."""
        batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
        if batch["pixel_values"].dtype == torch.uint8:
            processor = self.image_processor
            batch["pixel_values"] = pixels_on_device(
                batch["pixel_values"], processor.size["height"], processor.image_mean, processor.image_std
            )
        return batch


def steps_per_epoch(pairs: int, batch_size: int, world_size: int) -> int:
    """Full batches each worker gets per epoch (the remainder is dropped, as in the reference)."""
    return (pairs // world_size) // batch_size


class EpochBatches(Sampler[list[int]]):
    """This worker's batches of one epoch, from batch `start` on (to resume mid-epoch)."""

    def __init__(self, pairs: int, batch_size: int, rank: int, world_size: int, seed: int, epoch: int, start: int = 0):
        order = torch.randperm(pairs, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        self.indices = order[rank::world_size].tolist()
        self.batch_size, self.start = batch_size, start
        self.steps = steps_per_epoch(pairs, batch_size, world_size)

    def __len__(self) -> int:
        return self.steps - self.start

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.steps):
            yield self.indices[step * self.batch_size : (step + 1) * self.batch_size]


def epoch_loader(
    dataset: PairDataset, batches: EpochBatches, epoch: int, loader_workers: int, pin_memory: bool = False
) -> DataLoader:
    """A DataLoader over `batches`, decoding in `loader_workers` processes (0: in this process)."""
    dataset.epoch = epoch
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=loader_workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if loader_workers else None,
        persistent_workers=False,
        # Its own generator: creating the loader must not draw from the global RNG that the
        # checkpoint restores, or a resumed run would drift from an uninterrupted one.
        generator=torch.Generator().manual_seed(epoch),
    )
