"""Raw pairs -> model inputs (`BatchDecoder`): tokens, decoded and augmented pixels, the pairs' keys.

The same decoder runs wherever the loader puts it (a Ray Data actor, a local process, the training
process) and gives the same batch: augmentation is seeded by (seed, epoch, pair row).
"""

from __future__ import annotations

import hashlib
import io
import math
import random

import numpy as np
import torch
from PIL import Image

from zhclip.components.training.gpu_decode import Box, decode_jpegs
from zhclip.model import decode_image
from zhclip.model.pixels import pixels_on_device

CROP_SCALE = (0.9, 1.0)  # Chinese-CLIP's training RandomResizedCrop
CROP_RATIO = (3 / 4, 4 / 3)


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
        inputs = {key: _moved(torch.as_tensor(batch[key]), device) for key in keys}
        if self.on_device:
            inputs["pixel_values"] = self._decoded_on_device(batch, device)
        elif inputs["pixel_values"].dtype == torch.uint8:
            inputs["pixel_values"] = pixels_on_device(
                inputs["pixel_values"], processor.size["height"], processor.image_mean, processor.image_std
            )
        return inputs

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
