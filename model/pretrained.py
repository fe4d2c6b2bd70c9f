"""Stage-1 initialisation from local pretrained towers, as the Chinese-CLIP paper does.

- image tower: an OpenAI-CLIP checkpoint folder in Hugging Face format (`CLIPModel`,
  `CLIPVisionModel` or `CLIPVisionModelWithProjection`, e.g. openai/clip-vit-base-patch16);
- text tower: a Chinese RoBERTa-wwm folder in `BertModel` format (e.g. hfl/chinese-roberta-wwm-ext).

Only local folders are read; nothing is fetched. Any tensor that is missing or has another shape
than the preset expects is named in the error.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers.modeling_utils import load_state_dict

from .presets import ClipModel


def read_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face checkpoint folder: safetensors (single or sharded), else a
    `pytorch_model.bin` read with `weights_only=True`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"pretrained checkpoint folder {folder} not found")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_state_dict(folder / shard).items()}
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return load_state_dict(folder / name, weights_only=True)
    raise FileNotFoundError(f"{folder} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _clip_vision_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # CLIPModel names the tower `vision_model.*`, as ChineseCLIPModel does; a CLIPVisionModel saved
    # by transformers 5 drops that prefix (its layers keep CLIP's names, `pre_layrnorm` included).
    if "pre_layrnorm.weight" in weights:
        weights = {f"vision_model.{k}": v for k, v in weights.items()}
    picked = {k: v for k, v in weights.items() if k.startswith(("vision_model.", "visual_projection."))}
    if not picked:
        raise ValueError("no vision_model.* tensors: not a CLIPModel/CLIPVisionModel checkpoint")
    return picked


def _bert_text_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    picked = {}
    for key, tensor in weights.items():
        name = key.removeprefix("bert.")
        if name.startswith(("cls.", "pooler.")) or not name.startswith(("embeddings.", "encoder.")):
            continue  # pretraining heads and the pooler have no place in the CLIP text tower
        # Checkpoints converted from TensorFlow name LayerNorm parameters gamma/beta.
        name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        picked[f"text_model.{name}"] = tensor
    if not picked:
        raise ValueError("no embeddings.*/encoder.* tensors: not a BertModel checkpoint")
    return picked


def _load_tower(model: ClipModel, weights: dict[str, torch.Tensor], prefix: tuple[str, ...], source: Path) -> int:
    expected = {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    expected.pop("text_model.embeddings.position_ids", None)  # a buffer, not a weight
    wrong = [
        f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in weights and weights[k].shape != v.shape
    ]
    missing = sorted(k for k in expected if k not in weights and not k.startswith("visual_projection."))
    if wrong or missing:
        raise ValueError(
            f"{source} does not fit the model's tower: shape mismatches {wrong[:10]}"
            f"{' ...' if len(wrong) > 10 else ''}, missing {missing[:10]}{' ...' if len(missing) > 10 else ''}"
        )
    loadable = {k: v for k, v in weights.items() if k in expected}
    model.load_state_dict(loadable, strict=False)
    return len(loadable)


def init_from_pretrained(
    model: ClipModel, vision_dir: str | Path | None = None, text_dir: str | Path | None = None
) -> dict[str, int]:
    """Copy pretrained tower weights into `model` in place; returns tensors loaded per tower.

    The vision projection is taken from a CLIPModel checkpoint when present (OpenAI-CLIP's matches
    Chinese-CLIP's projection size); otherwise it keeps its random initialisation.
    """
    loaded = {}
    if vision_dir and not hasattr(model, "vision_model"):
        raise ValueError(
            f"{vision_dir}: Hugging Face CLIP folders hold ViT towers only; start a ResNet model "
            "from a converted Chinese-CLIP checkpoint with --init instead"
        )
    if vision_dir:
        weights = _clip_vision_weights(read_weights(vision_dir))
        loaded["vision"] = _load_tower(model, weights, ("vision_model.", "visual_projection."), Path(vision_dir))
    if text_dir:
        loaded["text"] = _load_tower(
            model, _bert_text_weights(read_weights(text_dir)), ("text_model.",), Path(text_dir)
        )
    return loaded
