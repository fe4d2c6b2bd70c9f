"""Tower locking for stage 1 (LiT): the image tower is frozen, the text tower learns."""

from __future__ import annotations

from torch import nn

from .presets import ClipModel
from .resnet import ChineseCLIPResNetModel


def image_tower_groups(model: ClipModel) -> list[list[nn.Module]]:
    """The image tower as ordered groups, as open_clip counts them. ViT: embeddings with the
    pre-norm, one group per transformer layer, then the post-norm with the projection. ResNet: the
    stem, each stage, then the attention pool."""
    if isinstance(model, ChineseCLIPResNetModel):  # the only tower kind with `visual`
        resnet = model.visual
        return [resnet.stem(), [resnet.layer1], [resnet.layer2], [resnet.layer3], [resnet.layer4], [resnet.attnpool]]
    vision = model.vision_model
    return [
        [vision.embeddings, vision.pre_layrnorm],
        *[[layer] for layer in vision.encoder.layers],
        [vision.post_layernorm, model.visual_projection],
    ]


def lock_image_tower(model: ClipModel, unlocked_groups: int = 0) -> int:
    """Freeze the image tower except its last `unlocked_groups` groups; returns the frozen parameter count.

    Frozen modules get no gradients (so the optimizer keeps no state for them) and are put in eval
    mode, so dropout and batch-norm statistics stay as they are.
    """
    groups = image_tower_groups(model)
    if not 0 <= unlocked_groups <= len(groups):
        raise ValueError(f"unlocked_groups must be 0..{len(groups)} for this image tower, got {unlocked_groups}")
    frozen = 0
    for group in groups[: len(groups) - unlocked_groups]:
        for module in group:
            module.eval()
            for param in module.parameters():
                param.requires_grad_(False)
                frozen += param.numel()
    return frozen
