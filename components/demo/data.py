"""Deterministic demo dataset in Chinese-CLIP format, with Chinese captions and zero-shot sets.

Two kinds of pictures: synthetic ones (one shape of one colour in one quadrant, on a noisy
background) and real ones, the 1,797 handwritten-digit scans that scikit-learn ships (8x8, no
download). Captions paraphrase what is shown. In the evaluation splits a caption lists every image
of its split that shows the same thing, so retrieval has genuinely multiple positives. Digit scans
kept out of every split form `zeroshot/digits/`, and fresh shapes `zeroshot/shapes/`: zero-shot sets
in the ELEVATER layout Chinese-CLIP distributes (`label_cn.txt` with the Chinese class names,
`test/<class number>/<images>`).
"""

from __future__ import annotations

import base64
import io
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
from PIL import Image, ImageDraw

from zhclip.components.core.settings import setting
from zhclip.components.core.summaries import timed, write_summary

COLOURS = {
    "红色": (220, 40, 40),
    "绿色": (40, 180, 60),
    "蓝色": (40, 80, 220),
    "黄色": (230, 210, 40),
    "紫色": (150, 60, 190),
    "白色": (245, 245, 245),
}
SHAPES = ["圆形", "正方形", "三角形", "十字"]
POSITIONS = {"左上角": (0, 0), "右上角": (1, 0), "左下角": (0, 1), "右下角": (1, 1)}
TEMPLATES = [
    "{position}有一个{colour}的{shape}",
    "一个{colour}{shape}位于画面{position}",
    "图片{position}是{colour}{shape}",
    "{colour}的{shape}在{position}",
    "画面的{position}画着一个{colour}{shape}",
]
DIGIT_NAMES = ["零", "一", "二", "三", "四", "五", "六", "七", "八", "九"]
# English words for the pretraining corpus of the demo's stand-in for OpenAI CLIP (see demo_towers.py).
ENGLISH = {
    "红色": "red",
    "绿色": "green",
    "蓝色": "blue",
    "黄色": "yellow",
    "紫色": "purple",
    "白色": "white",
    "圆形": "circle",
    "正方形": "square",
    "三角形": "triangle",
    "十字": "cross",
    "左上角": "top left",
    "右上角": "top right",
    "左下角": "bottom left",
    "右下角": "bottom right",
}
ENGLISH_DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
ENGLISH_TEMPLATES = [
    "a {colour} {shape} in the {position}",
    "a picture of a {colour} {shape} at the {position}",
    "there is a {colour} {shape} in the {position} corner",
    "{position} corner shows a {colour} {shape}",
]
ENGLISH_DIGIT_TEMPLATES = [
    "a handwritten digit {digit}",
    "the number {digit} written by hand",
    "a scan of a handwritten {digit}",
]
DIGIT_TEMPLATES = [
    "手写数字{digit}",
    "一个手写的数字{digit}",
    "这是数字{digit}的手写图片",
    "黑底白字写着{digit}",
    "图中是手写的{digit}",
]
SPLITS = ("train", "valid", "test")


@dataclass
class _Picture:
    same_as: tuple  # pictures with equal `same_as` show the same thing (shared positives)
    image: Image.Image
    captions: list[str]  # every paraphrase; captions_per_image of them are sampled
    english: list[str]  # English paraphrases, for the pretraining corpus


@dataclass
class DemoDataConfig:
    """Section `demo_data`: the bundled demo dataset (coloured shapes with Chinese captions, digit scans)."""

    seed: int = setting(0, "random seed: the same seed writes the same bytes")
    train_images: int = setting(600, "generated shape pictures in the train split")
    valid_images: int = setting(60, "generated shape pictures in the valid split")
    test_images: int = setting(100, "generated shape pictures in the test split")
    captions_per_image: int = setting(3, "Chinese captions written for each picture")
    image_size: int = setting(64, "side of each generated picture, in pixels")
    train_digits: int = setting(300, "real handwritten-digit scans (scikit-learn) added to each split")
    valid_digits: int = setting(30, "real handwritten-digit scans (scikit-learn) added to the valid split")
    test_digits: int = setting(60, "real handwritten-digit scans (scikit-learn) added to the test split")
    zeroshot_per_class: int = setting(8, "held-out images per class in data/raw/zeroshot/{digits,shapes}")
    pretrain_images: int = setting(1500, "fresh shapes (plus the train split's digit scans) in the pretraining corpus")
    unseen_images: int = setting(
        60, "fresh shape pictures in data/raw/benchmark/unseen, the benchmark suite's second retrieval dataset"
    )
    unseen_digits: int = setting(20, "held-out digit scans in data/raw/benchmark/unseen")

    def __post_init__(self):
        if not 1 <= self.captions_per_image <= len(TEMPLATES):
            raise ValueError(f"captions_per_image must be 1..{len(TEMPLATES)}, got {self.captions_per_image}")
        if min(self.train_images, self.valid_images, self.test_images) < 1 or self.image_size < 16:
            raise ValueError("each split needs at least one image and image_size must be at least 16")
        counts = (self.train_digits, self.valid_digits, self.test_digits, self.zeroshot_per_class, self.unseen_digits)
        digits = sum(counts) + 9 * self.zeroshot_per_class
        if min(counts) < 0 or self.unseen_images < 0 or digits > 1797:
            raise ValueError(f"digit counts must be non-negative and use at most the 1,797 scans (asked for {digits})")


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


def _shapes(count: int, config: DemoDataConfig, rng: random.Random, shapes: Sequence[str] = ()) -> list[_Picture]:
    """`count` random pictures, or one of each entry of `shapes` (in random colours and places)."""
    pictures = []
    for index in range(len(shapes) or count):
        colour = rng.choice(list(COLOURS))
        shape = shapes[index] if shapes else rng.choice(SHAPES)
        position = rng.choice(list(POSITIONS))
        captions = [t.format(colour=colour, shape=shape, position=position) for t in TEMPLATES]
        english = [
            t.format(colour=ENGLISH[colour], shape=ENGLISH[shape], position=ENGLISH[position])
            for t in ENGLISH_TEMPLATES
        ]
        pictures.append(
            _Picture(
                ("shape", colour, shape, position),
                draw_image(colour, shape, position, config.image_size, rng),
                captions,
                english,
            )
        )
    return pictures


def digit_image(scan, size: int) -> Image.Image:
    """An 8x8 scikit-learn digit scan (values 0..16) as a size x size RGB image."""
    grey = Image.fromarray((np.asarray(scan) * (255 / 16)).round().astype(np.uint8), mode="L")
    return grey.resize((size, size), Image.Resampling.BILINEAR).convert("RGB")


def _digits(scans, labels, config: DemoDataConfig) -> list[_Picture]:
    return [
        _Picture(
            ("digit", int(label)),
            digit_image(scan, config.image_size),
            [t.format(digit=DIGIT_NAMES[label]) for t in DIGIT_TEMPLATES],
            [t.format(digit=ENGLISH_DIGITS[label]) for t in ENGLISH_DIGIT_TEMPLATES],
        )
        for scan, label in zip(scans, labels)
    ]


def _write_split(
    out_dir: Path, split: str, pictures: list[_Picture], config: DemoDataConfig, rng: random.Random, ids: dict
) -> dict:
    image_ids = list(range(ids["image"], ids["image"] + len(pictures)))
    ids["image"] += len(pictures)
    with open(out_dir / f"{split}_imgs.tsv", "w", encoding="utf-8") as tsv:
        for image_id, picture in zip(image_ids, pictures):
            tsv.write(f"{image_id}\t{encode_image(picture.image)}\n")
    same: dict[tuple, list[int]] = {}
    for image_id, picture in zip(image_ids, pictures):
        same.setdefault(picture.same_as, []).append(image_id)
    texts = 0
    with open(out_dir / f"{split}_texts.jsonl", "w", encoding="utf-8") as jsonl:
        for image_id, picture in zip(image_ids, pictures):
            # Training captions pair with their own image (as in MUGE); evaluation captions count
            # every look-alike image of the split as a positive.
            positives = [image_id] if split == "train" else same[picture.same_as]
            for text in rng.sample(picture.captions, config.captions_per_image):
                jsonl.write(
                    json.dumps({"text_id": ids["text"], "text": text, "image_ids": positives}, ensure_ascii=False)
                    + "\n"
                )
                ids["text"] += 1
                texts += 1
    return {"images": len(pictures), "texts": texts}


def _write_zeroshot(folder: Path, pictures: list[_Picture], names: list[str], class_of) -> dict:
    """An ELEVATER-layout set, as Chinese-CLIP distributes its zero-shot datasets: label_cn.txt (class
    i's name on line i) and test/<i>/ (one digit up to ten classes, three beyond: sorted = numbered)."""
    width = 1 if len(names) <= 10 else 3
    counts = [0] * len(names)
    folder.mkdir(parents=True, exist_ok=True)  # zeroshot_per_class=0 (bench's corpora) writes no image
    for picture in pictures:
        index = class_of(picture)
        (folder / "test" / f"{index:0{width}d}").mkdir(parents=True, exist_ok=True)
        picture.image.save(folder / "test" / f"{index:0{width}d}" / f"{counts[index]:03d}.png")
        counts[index] += 1
    (folder / "label_cn.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    return {"classes": len(names), "images": sum(counts)}


def _write_pretraining_corpus(folder: Path, pictures: list[_Picture]) -> dict:
    """What the demo's stand-in pretrained towers learn from: images with English captions (for the
    English CLIP) and Chinese sentences (for the masked-language-model BERT). No test, valid or zero-shot image
    is in it."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "english_pairs.jsonl", "w", encoding="utf-8") as pairs:
        for picture in pictures:
            pairs.write(json.dumps({"image": encode_image(picture.image), "captions": picture.english}) + "\n")
    sentences = sorted({caption for picture in pictures for caption in picture.captions})
    (folder / "chinese_text.txt").write_text("\n".join(sentences) + "\n", encoding="utf-8")
    return {"english_pairs": len(pictures), "chinese_sentences": len(sentences)}


def generate_demo_data(out_dir: str | Path, config: DemoDataConfig, summary_path: str | Path | None = None) -> dict:
    """Write train/valid/test `{split}_imgs.tsv` and `{split}_texts.jsonl` under `out_dir`.

    The same config always writes the same bytes. Returns the summary (counts per split).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from sklearn.datasets import load_digits
    from sklearn.utils import Bunch

    rng = random.Random(config.seed)
    ids = {"image": 1, "text": 1}
    # a Bunch without return_X_y; sklearn has no annotations, so the checker infers that tuple too
    digits = cast(Bunch, load_digits())
    order = list(range(len(digits.target)))
    rng.shuffle(order)
    digit_counts = {"train": config.train_digits, "valid": config.valid_digits, "test": config.test_digits}
    shape_counts = {"train": config.train_images, "valid": config.valid_images, "test": config.test_images}
    summary: dict = {"out_dir": str(out_dir), "splits": {}}
    with timed(summary):
        start = 0
        for split in SPLITS:
            chosen = order[start : start + digit_counts[split]]
            start += digit_counts[split]
            pictures = _shapes(shape_counts[split], config, rng) + _digits(
                digits.images[chosen], digits.target[chosen], config
            )
            rng.shuffle(pictures)
            summary["splits"][split] = _write_split(out_dir, split, pictures, config, rng, ids)
        # Zero-shot images are never in a split: the remaining digit scans and fresh shapes.
        by_class = {
            d: [i for i in order[start:] if digits.target[i] == d][: config.zeroshot_per_class] for d in range(10)
        }
        held_out = [i for d in range(10) for i in by_class[d]]
        summary["zeroshot"] = {
            "digits": _write_zeroshot(
                out_dir / "zeroshot" / "digits",
                _digits(digits.images[held_out], digits.target[held_out], config),
                DIGIT_NAMES,
                lambda picture: picture.same_as[1],
            ),
            "shapes": _write_zeroshot(
                out_dir / "zeroshot" / "shapes",
                _shapes(0, config, rng, [shape for shape in SHAPES for _ in range(config.zeroshot_per_class)]),
                SHAPES,
                lambda picture: SHAPES.index(picture.same_as[2]),
            ),
        }
        # A second retrieval dataset as Chinese-CLIP distributes one (test_imgs.tsv, test_texts.jsonl):
        # fresh shapes from their own generator and digit scans that no split or zero-shot set holds.
        unseen_rng = random.Random(f"{config.seed}-unseen")
        zeroshot_scans = set(held_out)
        unused = [i for i in order[start:] if i not in zeroshot_scans][: config.unseen_digits]
        unseen = _shapes(config.unseen_images, config, unseen_rng) + _digits(
            digits.images[unused], digits.target[unused], config
        )
        unseen_rng.shuffle(unseen)
        (out_dir / "benchmark" / "unseen").mkdir(parents=True, exist_ok=True)
        summary["benchmark"] = {
            "unseen": _write_split(out_dir / "benchmark" / "unseen", "test", unseen, config, unseen_rng, ids)
        }
        # Fresh shapes from their own generator (the splits stay as they were) and the train split's digit scans.
        train_digits = order[: config.train_digits]
        corpus = _shapes(config.pretrain_images, config, random.Random(f"{config.seed}-pretrain")) + _digits(
            digits.images[train_digits], digits.target[train_digits], config
        )
        summary["pretrain"] = _write_pretraining_corpus(out_dir / "pretrain", corpus)
    if summary_path:
        write_summary(summary_path, summary)
    return summary
