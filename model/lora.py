"""LoRA adapters (the `peft` library) on either tower of a ChineseCLIPModel, and the plain model they merge into.

Adapters are injected in place (`peft.inject_adapter_in_model`), so the model keeps its class, its
forward and its `get_text_features`: DDP, the training step and validation take it unchanged. At a
checkpoint, a merged copy is saved as the plain ChineseCLIP folder every other step reads; the
adapters and their frozen base weights travel in the training state, so a resumed stage continues
from exactly the same weights.
"""

from __future__ import annotations

import copy
import re
from typing import TypeVar

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer

Module = TypeVar("Module", bound=torch.nn.Module)

TOWER_MODULES = {"text": "text_model", "image": "vision_model"}
LORA_TOWERS = {"text": ("text",), "image": ("image",), "both": ("text", "image")}


def add_lora(
    model: torch.nn.Module,
    towers: str,
    rank: int,
    alpha: float,
    dropout: float,
    target_modules: dict[str, list[str]],
) -> int:
    """Inject LoRA adapters of `rank` into the `target_modules` (names of linear layers, per tower) of
    `towers` ("text", "image" or "both"), in place. The adapted towers' own weights are frozen;
    whatever else was trainable (projections, logit scale, a tower without adapters) stays trainable.
    Returns the number of trainable parameters."""
    adapted = [TOWER_MODULES[tower] for tower in LORA_TOWERS[towers]]
    keep = {
        name
        for name, param in model.named_parameters()
        if param.requires_grad and not any(name.startswith(f"{prefix}.") for prefix in adapted)
    }
    pattern = "|".join(
        rf"{TOWER_MODULES[tower]}\..*\.({'|'.join(map(re.escape, target_modules[tower]))})"
        for tower in LORA_TOWERS[towers]
    )
    # peft annotates lora_alpha as int; it only divides by it (scaling = alpha / r), so a float is as good
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern)  # pyright: ignore[reportArgumentType]
    try:
        inject_adapter_in_model(config, model)
    except ValueError as err:
        raise ValueError(
            f"LoRA on {towers}: no layer named {target_modules} in that tower ({err}); "
            "name linear layers of it (text: query, key, value; ViT image: q_proj, k_proj, v_proj, out_proj)"
        ) from err
    for name, param in model.named_parameters():
        if name in keep:  # peft froze everything but the adapters
            param.requires_grad_(True)
    return sum(param.numel() for param in model.parameters() if param.requires_grad)


def has_lora(model: torch.nn.Module) -> bool:
    return any(isinstance(module, BaseTunerLayer) for module in model.modules())


def merged_copy(model: Module) -> Module:
    """A copy of `model` with every adapter merged into its base layer (peft's own merge) and the
    adapter layers replaced by those base layers: the plain model, with the same outputs."""
    plain = copy.deepcopy(model)
    for name, module in list(plain.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent), child, module.get_base_layer())
    return plain


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapters and the frozen base weights of the layers they adapt: what, with the merged
    folder, restores the unmerged model exactly (`load_state_dict(..., strict=False)`)."""
    return {key: value for key, value in model.state_dict().items() if "lora_" in key or ".base_layer." in key}
