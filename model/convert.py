"""Import released Chinese-CLIP checkpoints (the reference's `.pt` files) as Hugging Face models.

The reference stores an OpenAI-CLIP-style image tower under `visual.*` (a vision transformer, or
for RN50 a modified ResNet whose names model/resnet.py keeps), a BERT text encoder
under `bert.*`, and `text_projection` / `logit_scale`, usually inside {"state_dict": ...} with a
`module.` prefix from DistributedDataParallel. The architecture is read off the tensor shapes.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import AutoModel

from .presets import (
    CONTEXT_LENGTH,
    PRESETS,
    ClipModel,
    build_processor,
    default_vocab_path,
    image_size,
    make_config,
    save_model,
)

_VISION_LAYER = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}


def load_reference_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The reference state dict from a `.pt` file, read with `weights_only=True` (no pickle code runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for non-checkpoints and unsafe pickles
        raise ValueError(f"{path} is not a loadable PyTorch checkpoint with plain tensors ({err})") from err
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path}: expected a dict of tensors, or one under the key 'state_dict'")
    return {key.removeprefix("module."): value for key, value in state.items()}


def _count(state: dict, pattern: str) -> int:
    indices = {int(m.group(1)) for key in state if (m := re.match(pattern, key))}
    return max(indices) + 1 if indices else 0


def _is_resnet(state: dict[str, torch.Tensor]) -> bool:
    return "visual.layer1.0.conv1.weight" in state


def _text_spec(state: dict[str, torch.Tensor]) -> dict:
    width = state["bert.embeddings.word_embeddings.weight"].shape[1]
    return {
        "hidden_size": width,
        "num_hidden_layers": _count(state, r"bert\.encoder\.layer\.(\d+)\."),
        "num_attention_heads": width // 64,
        "intermediate_size": state["bert.encoder.layer.0.intermediate.dense.weight"].shape[0],
        "type_vocab_size": state["bert.embeddings.token_type_embeddings.weight"].shape[0],
    }


def _resnet_spec(state: dict[str, torch.Tensor]) -> dict:
    width = state["visual.conv3.weight"].shape[0]
    grid = round((state["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
    layers = [_count(state, rf"visual\.layer{stage}\.(\d+)\.") for stage in range(1, 5)]
    # The reference sizes the attention pool's heads as width * 32 / 64.
    return {
        "projection_dim": state["visual.attnpool.c_proj.weight"].shape[0],
        "text": _text_spec(state),
        "vision": {"resnet_layers": layers, "width": width, "heads": width * 32 // 64, "image_size": grid * 32},
    }


def reference_spec(state: dict[str, torch.Tensor]) -> dict:
    """The preset-shaped spec (text, vision, projection_dim) of a reference state dict."""
    if "bert.embeddings.word_embeddings.weight" not in state:
        raise ValueError("no bert.* text tower: not a Chinese-CLIP checkpoint")
    if _is_resnet(state):
        return _resnet_spec(state)
    if "visual.conv1.weight" not in state or "visual.proj" not in state:
        raise ValueError("no visual.* image tower (ViT or ResNet): not a Chinese-CLIP checkpoint")
    width, _, patch, _ = state["visual.conv1.weight"].shape
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    vision_layers = _count(state, r"visual\.transformer\.resblocks\.(\d+)\.")
    # Head counts are not in the shapes: take them from the released preset of the same size,
    # else the 64-wide heads both towers use by default.
    vision_heads = next(
        (
            p["vision"]["num_attention_heads"]
            for p in PRESETS.values()
            if p["vision"].get("hidden_size") == width and p["vision"].get("num_hidden_layers") == vision_layers
        ),
        width // 64,
    )
    return {
        "projection_dim": state["visual.proj"].shape[1],
        "text": _text_spec(state),
        "vision": {
            "hidden_size": width,
            "num_hidden_layers": vision_layers,
            "num_attention_heads": vision_heads,
            "intermediate_size": state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            "patch_size": patch,
            "image_size": grid * patch,
        },
    }


def _vision_key(key: str) -> list[str]:
    """Target names for one `visual.*` key (in_proj splits into q, k, v)."""
    fixed = {
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.proj": "visual_projection.weight",
    }
    if key in fixed:
        return [fixed[key]]
    if key.startswith(("visual.ln_pre.", "visual.ln_post.")):
        norm = "pre_layrnorm" if key.startswith("visual.ln_pre.") else "post_layernorm"
        return [f"vision_model.{norm}.{key.rsplit('.', 1)[1]}"]
    match = re.match(r"visual\.transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$", key)
    if not match:
        raise ValueError(f"unexpected vision tensor {key!r} in the checkpoint")
    layer, module, kind = match.groups()
    prefix = f"vision_model.encoder.layers.{layer}"
    if module == "attn.in_proj":
        return [f"{prefix}.self_attn.{name}_proj.{kind}" for name in ("q", "k", "v")]
    if module not in _VISION_LAYER:
        raise ValueError(f"unexpected vision tensor {key!r} in the checkpoint")
    return [f"{prefix}.{_VISION_LAYER[module]}.{kind}"]


def convert_reference_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (and split or transpose where layouts differ) reference tensors to zhclip's model's.

    ResNet tower tensors keep their names; ViT ones move to ChineseCLIPModel's layout.
    """
    resnet = _is_resnet(state)
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        tensor = tensor if key.endswith("num_batches_tracked") else tensor.float()
        if key.startswith("bert.pooler."):
            continue  # the reference never uses the pooler; ChineseCLIPModel has none
        if key.startswith("bert."):
            converted["text_model." + key.removeprefix("bert.")] = tensor
        elif key == "text_projection":
            converted["text_projection.weight"] = tensor.t().contiguous()
        elif key == "logit_scale":
            converted["logit_scale"] = tensor
        elif key.startswith("visual.") and resnet:
            converted[key] = tensor
        elif key.startswith("visual."):
            key = key.replace(".in_proj_weight", ".in_proj.weight").replace(".in_proj_bias", ".in_proj.bias")
            targets = _vision_key(key)
            parts = (
                tensor.chunk(3) if len(targets) == 3 else [tensor.t().contiguous() if key == "visual.proj" else tensor]
            )
            converted.update(zip(targets, parts))
        else:
            raise ValueError(f"unexpected tensor {key!r}: not part of a Chinese-CLIP checkpoint")
    return converted


def model_from_reference_state(state: dict[str, torch.Tensor], preset: str | None = None) -> ClipModel:
    """A zhclip model holding exactly the reference weights; names any tensor that does not fit.

    The architecture is `preset` when given (a mismatching checkpoint is then reported tensor by
    tensor), else inferred from the shapes.
    """
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    config = make_config(
        PRESETS[preset] if preset else reference_spec(state),
        vocab_size=state["bert.embeddings.word_embeddings.weight"].shape[0],
        max_position_embeddings=state["bert.embeddings.position_embeddings.weight"].shape[0],
    )
    model = AutoModel.from_config(config)
    converted = convert_reference_state_dict(state)
    expected = model.state_dict()
    wrong = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in converted.items()
        if k in expected and v.shape != expected[k].shape
    ]
    # position_ids is a buffer, not a weight, so checkpoints never carry it
    missing = sorted(set(expected) - set(converted) - {"text_model.embeddings.position_ids"})
    unexpected = sorted(set(converted) - set(expected))
    if wrong or missing or unexpected:
        raise ValueError(
            "checkpoint does not fit the inferred architecture: "
            f"shape mismatches {wrong}, missing {missing}, unexpected {unexpected}"
        )
    model.load_state_dict(converted, strict=False)
    return model.eval()


def convert_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    vocab_file: str | Path | None = None,
    context_length: int = CONTEXT_LENGTH,
    preset: str | None = None,
) -> Path:
    """Write the Hugging Face directory (safetensors, tokenizer, processor) for a reference `.pt`."""
    model = model_from_reference_state(load_reference_checkpoint(checkpoint), preset)
    processor = build_processor(vocab_file or default_vocab_path(), image_size(model.config), context_length)
    return save_model(model, processor, out_dir)
