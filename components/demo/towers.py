"""The demo's own pretrained towers, made the way the paper's are, so the demo starts where users start.

The paper locks an OpenAI-CLIP image tower and starts the text tower from Chinese RoBERTa-wwm. No
checkpoint may be downloaded here, so the demo trains small stand-ins from its pretraining corpus
(components/demo/data.py, no test, valid or zero-shot image in it):
- an English CLIP (`CLIPModel` folder), trained contrastively on English captions of the images;
- a Chinese BERT (`BertForMaskedLM` folder, the Chinese-CLIP vocabulary), trained with masked-language
  modelling on Chinese sentences (character masking: whole-word masking needs a Chinese word segmenter).
Both have the preset's tower shapes, and reach the model through `zhclip start` and the same loaders
(model/pretrained.py) as a user's real checkpoints.
"""

from __future__ import annotations

import base64
import io
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from zhclip.components.core.architecture import ModelConfig
from zhclip.components.core.errors import ZhclipError
from zhclip.components.core.progress import progress_bar
from zhclip.components.core.settings import setting, shared
from zhclip.components.core.summaries import timed, write_summary

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
MASK_SHARE = 0.15  # BERT's share of masked tokens


@dataclass
class DemoTowersConfig:
    """Section `demo_towers`: the demo's small stand-ins for OpenAI CLIP and Chinese RoBERTa."""

    preset: str = shared(ModelConfig, "preset")
    seed: int = setting(0, "random seed of the towers' initialisation and batches")
    clip_steps: int = setting(800, "steps of English-caption CLIP pretraining (the stand-in for OpenAI CLIP)")
    mlm_steps: int = setting(800, "steps of Chinese masked-LM pretraining (the stand-in for Chinese RoBERTa)")
    batch_size: int = setting(128, "pictures or sentences per pretraining step")
    lr: float = setting(1e-3, "peak learning rate of both pretrainings (AdamW)")

    def __post_init__(self):
        if min(self.clip_steps, self.mlm_steps, self.batch_size) < 1 or self.lr <= 0:
            raise ValueError("clip_steps, mlm_steps and batch_size must be at least 1 and lr positive")


def _read_corpus(corpus_dir: Path) -> tuple[list[Image.Image], list[list[str]], list[str]]:
    pairs, text = corpus_dir / "english_pairs.jsonl", corpus_dir / "chinese_text.txt"
    for path in (pairs, text):
        if not path.is_file():
            raise ZhclipError(f"{path} not found: run `zhclip demo-data` first (it writes the pretraining corpus)")
    images, captions = [], []
    for line in pairs.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        images.append(Image.open(io.BytesIO(base64.urlsafe_b64decode(row["image"]))).convert("RGB"))
        captions.append(row["captions"])
    return images, captions, [s for s in text.read_text(encoding="utf-8").splitlines() if s]


def _schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )


def _english_tokenizer(captions: list[list[str]], folder: Path):
    """A word-level tokenizer over the corpus' English words (BERT's WordPiece format, nothing to download)."""
    from transformers import BertTokenizer

    words = sorted({word for options in captions for caption in options for word in caption.lower().split()})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(SPECIAL_TOKENS + words) + "\n", encoding="utf-8")
    return BertTokenizer(vocab=str(folder / "vocab.txt"), do_lower_case=True, model_max_length=16)


def train_english_clip(
    images: list[Image.Image], captions: list[list[str]], out_dir: Path, spec: dict, config: DemoTowersConfig
) -> dict:
    """A `CLIPModel` whose image tower has the preset's shape, trained with CLIP's own contrastive loss."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    from zhclip.model.presets import CLIP_MEAN, CLIP_STD

    tokenizer = _english_tokenizer(captions, out_dir)
    vision = spec["vision"]
    text = {
        key: spec["text"][key]
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    }
    clip_config = CLIPConfig(
        text_config={
            **text,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 16,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.cls_token_id,
            "eos_token_id": tokenizer.sep_token_id,
        },
        vision_config={
            key: vision[key]
            for key in (
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "intermediate_size",
                "patch_size",
                "image_size",
            )
        },
        projection_dim=spec["projection_dim"],
    )
    torch.manual_seed(config.seed)
    model = CLIPModel(clip_config)
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": vision["image_size"]},
        crop_size={"height": vision["image_size"], "width": vision["image_size"]},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    rng = random.Random(config.seed)

    def batch_loss() -> torch.Tensor:
        rows = rng.sample(range(len(images)), min(config.batch_size, len(images)))
        tokens = tokenizer([rng.choice(captions[row]) for row in rows], padding=True, return_tensors="pt")
        return model(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            pixel_values=pixels[rows],
            return_loss=True,
        ).loss

    losses = _fit(model, batch_loss, config.clip_steps, config.lr, 0.1, "pretrain English CLIP")
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return {"folder": str(out_dir), "pairs": len(images), "steps": config.clip_steps, **losses}


def train_chinese_bert(sentences: list[str], out_dir: Path, spec: dict, config: DemoTowersConfig) -> dict:
    """A `BertForMaskedLM` with the preset's text-tower shape and the Chinese-CLIP vocabulary."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer

    from zhclip.model import CONTEXT_LENGTH, default_vocab_path

    tokenizer = BertTokenizer(vocab=str(default_vocab_path()))
    bert_config = BertConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        **{
            key: spec["text"][key]
            for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        },
    )
    torch.manual_seed(config.seed)
    model = BertForMaskedLM(bert_config)
    encoded = tokenizer(sentences, padding=True, truncation=True, max_length=CONTEXT_LENGTH, return_tensors="pt")
    generator = torch.Generator().manual_seed(config.seed)

    def batch_loss() -> torch.Tensor:
        rows = torch.randint(len(sentences), (config.batch_size,), generator=generator)
        ids, attention = encoded["input_ids"][rows], encoded["attention_mask"][rows]
        real = attention.bool() & (ids != tokenizer.cls_token_id) & (ids != tokenizer.sep_token_id)
        masked = real & (torch.rand(ids.shape, generator=generator) < MASK_SHARE)
        hidden = model.bert(
            input_ids=ids.masked_fill(masked, tokenizer.mask_token_id), attention_mask=attention
        ).last_hidden_state
        # Vocabulary logits for the masked positions only: over all positions they are most of the step's work.
        return torch.nn.functional.cross_entropy(model.cls(hidden[masked]), ids[masked])

    losses = _fit(model, batch_loss, config.mlm_steps, config.lr, 0.01, "pretrain Chinese BERT (MLM)")
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return {"folder": str(out_dir), "sentences": len(sentences), "steps": config.mlm_steps, **losses}


def _fit(
    model: torch.nn.Module,
    batch_loss: Callable[[], torch.Tensor],
    steps: int,
    lr: float,
    weight_decay: float,
    description: str,
) -> dict[str, float]:
    """`steps` AdamW steps on `batch_loss()` (warm-up, then cosine decay); the mean loss of the first and last tenth."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = _schedule(optimizer, steps)
    losses = []
    model.train()
    for _ in progress_bar(range(steps), desc=description, unit="step"):
        loss = batch_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    tenth = max(1, len(losses) // 10)
    return {
        "first_loss": round(float(np.mean(losses[:tenth])), 4),
        "final_loss": round(float(np.mean(losses[-tenth:])), 4),
    }


def pretrain_demo_towers(
    corpus_dir: str | Path, out_dir: str | Path, config: DemoTowersConfig, summary_path: str | Path | None = None
) -> dict:
    """Write `out_dir/vision` (English CLIP) and `out_dir/text` (Chinese BERT); returns their losses."""
    from zhclip.model import PRESETS

    if config.preset not in PRESETS or "resnet_layers" in PRESETS[config.preset]["vision"]:
        raise ZhclipError(f"demo towers need a ViT preset, got {config.preset!r}")
    spec, out_dir = PRESETS[config.preset], Path(out_dir)
    images, captions, sentences = _read_corpus(Path(corpus_dir))
    summary: dict = {"preset": config.preset, "out_dir": str(out_dir)}
    with timed(summary):
        summary["vision"] = train_english_clip(images, captions, out_dir / "vision", spec, config)
        summary["text"] = train_chinese_bert(sentences, out_dir / "text", spec, config)
    if summary_path:
        write_summary(summary_path, summary)
    return summary
