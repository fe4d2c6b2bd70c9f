"""Symmetric InfoNCE loss of CLIP."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def contrastive_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Mean of image->text and text->image cross-entropy over the batch; row i matches column i.

    Inputs are projected (not yet normalised) embeddings; `logit_scale` is the log temperature as
    stored in the model, clamped to ln(100) like CLIP and Chinese-CLIP.
    """
    image_embeds = F.normalize(image_embeds, dim=-1)
    text_embeds = F.normalize(text_embeds, dim=-1)
    scale = logit_scale.clamp(max=4.6052).exp()
    logits_per_image = scale * image_embeds @ text_embeds.t()
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.t(), labels)) / 2
