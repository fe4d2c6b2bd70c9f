"""FLIP-style random patch masking (Li et al., 2023): train on a random subset of image patches.

Dropping patch tokens after the position embeddings makes each step cheaper in proportion to the
ratio; the class token is always kept. It acts only while the whole model is in training mode, so
evaluation and embedding see every patch. transformers has no such switch for its CLIP vision
towers, hence a forward hook on the patch embeddings.
"""

from __future__ import annotations

import torch
from torch.utils.hooks import RemovableHandle
from transformers import ChineseCLIPModel

from .presets import ClipModel


def keep_random_patches(tokens: torch.Tensor, ratio: float) -> torch.Tensor:
    """`tokens` is (batch, 1 + patches, width) with the class token first; keeps the class token and
    a random `1 - ratio` share (at least one) of the patches of each image, in their original order."""
    batch, length, width = tokens.shape
    patches = length - 1
    keep = max(1, int(round(patches * (1 - ratio))))
    order = torch.rand(batch, patches, device=tokens.device).argsort(dim=1)[:, :keep].sort(dim=1).values
    kept = torch.gather(tokens[:, 1:], 1, order.unsqueeze(-1).expand(-1, -1, width))
    return torch.cat([tokens[:, :1], kept], dim=1)


def enable_patch_masking(model: ClipModel, ratio: float) -> RemovableHandle | None:
    """Mask `ratio` of the image patches in training steps; returns the hook handle (None for 0).

    Only ViT image towers have patches; a ResNet tower raises ValueError.
    """
    if not 0 <= ratio < 1:
        raise ValueError(f"mask_ratio must be in [0, 1), got {ratio}")
    if ratio == 0:
        return None
    if not isinstance(model, ChineseCLIPModel):  # the ViT kind, the only one with `vision_model`
        raise ValueError("patch masking (mask_ratio > 0) needs a ViT image tower; this model has a ResNet one")

    def hook(_module, _inputs, tokens: torch.Tensor) -> torch.Tensor:
        return keep_random_patches(tokens, ratio) if model.training else tokens

    return model.vision_model.embeddings.register_forward_hook(hook)
