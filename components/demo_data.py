"""Deterministic demo dataset in Chinese-CLIP format: coloured shapes at positions, Chinese captions.

Each image shows one shape of one colour in one quadrant on a noisy background; captions describe it
with several paraphrases. A text lists every image of its split with the same attributes as its
positives in the evaluation splits, so retrieval has genuinely multiple positives.
"""

from __future__ import annotations

import base64
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from components.common import timed, write_summary

COLOURS = {"红色": (220, 40, 40), "绿色": (40, 180, 60), "蓝色": (40, 80, 220), "黄色": (230, 210, 40), "紫色": (150, 60, 190), "白色": (245, 245, 245)}
SHAPES = ["圆形", "正方形", "三角形", "十字"]
POSITIONS = {"左上角": (0, 0), "右上角": (1, 0), "左下角": (0, 1), "右下角": (1, 1)}
TEMPLATES = [
    "{position}有一个{colour}的{shape}",
    "一个{colour}{shape}位于画面{position}",
    "图片{position}是{colour}{shape}",
    "{colour}的{shape}在{position}",
    "画面的{position}画着一个{colour}{shape}",
]
SPLITS = ("train", "valid", "test")


@dataclass
class DemoDataConfig:
    seed: int = 0
    train_images: int = 600
    valid_images: int = 60
    test_images: int = 100
    captions_per_image: int = 3
    image_size: int = 64

    def __post_init__(self):
        if not 1 <= self.captions_per_image <= len(TEMPLATES):
            raise ValueError(f"captions_per_image must be 1..{len(TEMPLATES)}, got {self.captions_per_image}")
        if min(self.train_images, self.valid_images, self.test_images) < 1 or self.image_size < 16:
            raise ValueError("each split needs at least one image and image_size must be at least 16")


def draw_image(colour: str, shape: str, position: str, size: int, rng: random.Random) -> Image.Image:
    """One shape in one quadrant, with jittered size and offset on a noisy dark background."""
    noise = np.random.default_rng(rng.getrandbits(32)).integers(0, 60, (size, size, 3), dtype=np.uint8)
    image = Image.fromarray(noise)
    qx, qy = POSITIONS[position]
    half = size // 2
    extent = rng.randint(half * 5 // 10, half * 8 // 10)
    x0 = qx * half + rng.randint(0, half - extent)
    y0 = qy * half + rng.randint(0, half - extent)
    box = (x0, y0, x0 + extent, y0 + extent)
    fill = COLOURS[colour]
    draw = ImageDraw.Draw(image)
    if shape == "圆形":
        draw.ellipse(box, fill=fill)
    elif shape == "正方形":
        draw.rectangle(box, fill=fill)
    elif shape == "三角形":
        draw.polygon([(x0 + extent // 2, y0), (x0, y0 + extent), (x0 + extent, y0 + extent)], fill=fill)
    else:
        bar = max(2, extent // 4)
        mid = extent // 2
        draw.rectangle((x0 + mid - bar // 2, y0, x0 + mid + bar // 2, y0 + extent), fill=fill)
        draw.rectangle((x0, y0 + mid - bar // 2, x0 + extent, y0 + mid + bar // 2), fill=fill)
    return image


def encode_image(image: Image.Image) -> str:
    """PNG, urlsafe base64: the encoding Chinese-CLIP's preprocessing scripts write."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.urlsafe_b64encode(buffer.getvalue()).decode("ascii")


def _write_split(out_dir: Path, split: str, count: int, config: DemoDataConfig, rng: random.Random, ids: dict) -> dict:
    attributes = [(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(POSITIONS))) for _ in range(count)]
    image_ids = list(range(ids["image"], ids["image"] + count))
    ids["image"] += count
    with open(out_dir / f"{split}_imgs.tsv", "w", encoding="utf-8") as tsv:
        for image_id, (colour, shape, position) in zip(image_ids, attributes):
            image = draw_image(colour, shape, position, config.image_size, rng)
            tsv.write(f"{image_id}\t{encode_image(image)}\n")
    same_attributes: dict[tuple, list[int]] = {}
    for image_id, attrs in zip(image_ids, attributes):
        same_attributes.setdefault(attrs, []).append(image_id)
    texts = 0
    with open(out_dir / f"{split}_texts.jsonl", "w", encoding="utf-8") as jsonl:
        for image_id, (colour, shape, position) in zip(image_ids, attributes):
            # Training captions pair with their own image (as in MUGE); evaluation captions count
            # every look-alike image of the split as a positive.
            positives = [image_id] if split == "train" else same_attributes[(colour, shape, position)]
            for template in rng.sample(TEMPLATES, config.captions_per_image):
                text = template.format(colour=colour, shape=shape, position=position)
                record = {"text_id": ids["text"], "text": text, "image_ids": positives}
                jsonl.write(json.dumps(record, ensure_ascii=False) + "\n")
                ids["text"] += 1
                texts += 1
    return {"images": count, "texts": texts}


def generate_demo_data(out_dir: str | Path, config: DemoDataConfig, summary_path: str | Path | None = None) -> dict:
    """Write train/valid/test `{split}_imgs.tsv` and `{split}_texts.jsonl` under `out_dir`.

    The same config always writes the same bytes. Returns the summary (counts per split).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(config.seed)
    ids = {"image": 1, "text": 1}
    counts = {"train": config.train_images, "valid": config.valid_images, "test": config.test_images}
    summary: dict = {"out_dir": str(out_dir)}
    with timed(summary):
        summary["splits"] = {split: _write_split(out_dir, split, counts[split], config, rng, ids) for split in SPLITS}
    if summary_path:
        write_summary(summary_path, summary)
    return summary
