"""Model presets and the Hugging Face directory contract (build, save, load).

A zhclip model is a `transformers.ChineseCLIPModel` (ViT presets) or the ResNet variant of
model/resnet.py (RN presets), plus a `ChineseCLIPProcessor`, saved with
`save_pretrained` (safetensors weights). ViT models load with plain transformers; ResNet models need
model/resnet.py imported first (this module imports it), which registers them with transformers' Auto
classes.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import TypeAlias

from transformers import (
    AutoModel,
    BertTokenizer,
    ChineseCLIPConfig,
    ChineseCLIPImageProcessorPil,
    ChineseCLIPModel,
    ChineseCLIPProcessor,
)

from .resnet import ChineseCLIPResNetConfig, ChineseCLIPResNetModel
from .specs import CLIP_MEAN, CLIP_STD, CONTEXT_LENGTH, PRESETS

# A zhclip model, of either tower kind: both classes have get_text_features and get_image_features
# (a model output whose pooler_output holds the projected features) and the text tower `text_model`.
# Named rather than PreTrainedModel so the type checker follows their submodules.
ClipModel: TypeAlias = ChineseCLIPModel | ChineseCLIPResNetModel


def default_vocab_path() -> Path:
    """The Chinese BERT vocabulary (21,128 tokens) shipped in the `cn-clip` wheel.

    Located through package metadata rather than `import cn_clip`, whose import pulls torchvision.
    """
    try:
        # str(): typeshed types locate_file as a SimplePath protocol, not os.PathLike
        path = Path(str(importlib.metadata.distribution("cn-clip").locate_file("cn_clip/clip/vocab.txt")))
    except importlib.metadata.PackageNotFoundError as err:
        raise FileNotFoundError(
            "the Chinese vocabulary comes from the cn-clip wheel, which is not installed: "
            "run `pip install --no-deps cn-clip==1.6.0` (make install does) or pass a vocab.txt path"
        ) from err
    if not path.is_file():
        raise FileNotFoundError(f"cn-clip is installed but {path} is missing; reinstall cn-clip")
    return path


def build_processor(vocab_file: str | Path, image_size: int, context_length: int) -> ChineseCLIPProcessor:
    """Tokenizer (Chinese BERT word pieces) and image processor (resize, CLIP normalisation)."""
    tokenizer = BertTokenizer(vocab=str(vocab_file), model_max_length=context_length)
    image_processor = ChineseCLIPImageProcessorPil(
        size={"height": image_size, "width": image_size},
        do_center_crop=False,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    return ChineseCLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_model(
    preset: str, vocab_file: str | Path | None = None, context_length: int = CONTEXT_LENGTH, seed: int = 0
) -> tuple[ClipModel, ChineseCLIPProcessor]:
    """A randomly initialised model of `preset` and its processor."""
    import torch

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    spec = PRESETS[preset]
    processor = build_processor(vocab_file or default_vocab_path(), spec["vision"]["image_size"], context_length)
    config = make_config(spec, vocab_size=len(processor.tokenizer))
    torch.manual_seed(seed)
    return AutoModel.from_config(config), processor


def make_config(spec: dict, vocab_size: int = 21128, max_position_embeddings: int = 512):
    """The model config (SDPA attention) of a preset-shaped spec: text, vision, projection_dim.

    A ViT spec gives a ChineseCLIPConfig; a ResNet spec (`resnet_layers`) a ChineseCLIPResNetConfig.
    """
    text = {**spec["text"], "vocab_size": vocab_size, "max_position_embeddings": max_position_embeddings}
    vision = spec["vision"]
    if "resnet_layers" in vision:
        config = ChineseCLIPResNetConfig(
            text_config=text,
            vision_layers=list(vision["resnet_layers"]),
            vision_width=vision["width"],
            vision_heads=vision["heads"],
            image_size=vision["image_size"],
            projection_dim=spec["projection_dim"],
        )
    else:
        config = ChineseCLIPConfig(
            text_config=text,
            vision_config={**vision, "projection_dim": spec["projection_dim"]},
            projection_dim=spec["projection_dim"],
        )
    config._attn_implementation = "sdpa"
    return config


def image_size(config) -> int:
    """Input resolution of a model config, ViT (vision_config) or ResNet (top level)."""
    return config.vision_config.image_size if hasattr(config, "vision_config") else config.image_size


def save_model(
    model: ClipModel, processor: ChineseCLIPProcessor, out_dir: str | Path, state_dict: dict | None = None
) -> Path:
    """Write the Hugging Face directory: config, safetensors weights (`state_dict`, default the
    model's own), tokenizer and processor."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True, state_dict=state_dict)
    processor.save_pretrained(out_dir)
    return out_dir


def load_model(model_dir: str | Path) -> tuple[ClipModel, ChineseCLIPProcessor]:
    """Load a Hugging Face model directory written by `save_model` (or any ChineseCLIP checkpoint)."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir} is not a Hugging Face model directory (no config.json); "
            "pass the output folder of `zhclip train`"
        )
    model = AutoModel.from_pretrained(model_dir, attn_implementation="sdpa")
    processor = ChineseCLIPProcessor.from_pretrained(model_dir)
    return model.eval(), processor
