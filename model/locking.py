"""Tower locking for stage 1 (LiT): the image tower is frozen, the text tower learns."""

from __future__ import annotations

from transformers import ChineseCLIPModel


def lock_image_tower(model: ChineseCLIPModel) -> int:
    """Freeze the vision encoder and its projection; returns the number of frozen parameters.

    The locked tower is also put in eval mode so dropout and the like behave as at inference.
    """
    frozen = 0
    for module in (model.vision_model, model.visual_projection):
        module.eval()
        for param in module.parameters():
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen
