"""Symmetric InfoNCE loss of CLIP, with features gathered across workers as open_clip does."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.distributed.nn
import torch.nn.functional as F

MAX_LOGIT_SCALE = math.log(100)


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_features(features: torch.Tensor, with_grad: bool) -> torch.Tensor:
    """All workers' features, in rank order. Without `with_grad`, other workers' rows are constants
    and only this worker's rows carry gradients (open_clip's default, cheaper)."""
    rank, world_size = _distributed()
    if world_size == 1:
        return features
    if with_grad:
        return torch.cat(torch.distributed.nn.all_gather(features))
    gathered = [torch.empty_like(features) for _ in range(world_size)]
    dist.all_gather(gathered, features.detach())
    gathered[rank] = features
    return torch.cat(gathered)


def contrastive_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    local_loss: bool = False,
    gather_with_grad: bool = False,
) -> torch.Tensor:
    """Mean of image->text and text->image cross-entropy; row i matches column i of the global batch.

    Inputs are this worker's projected embeddings (normalised here); `logit_scale` is the log
    temperature, clamped to ln(100) like CLIP and Chinese-CLIP. Under torch.distributed, negatives
    come from every worker's batch; `local_loss` scores only this worker's rows against the global
    batch (less memory: the mean over workers equals the global loss for equal local batches).
    """
    image_embeds = F.normalize(image_embeds, dim=-1)
    text_embeds = F.normalize(text_embeds, dim=-1)
    scale = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
    rank, _ = _distributed()
    all_images = gather_features(image_embeds, gather_with_grad)
    all_texts = gather_features(text_embeds, gather_with_grad)
    if local_loss:
        logits_per_image = scale * image_embeds @ all_texts.t()
        logits_per_text = scale * text_embeds @ all_images.t()
        labels = torch.arange(len(image_embeds), device=image_embeds.device) + rank * len(image_embeds)
    else:
        logits_per_image = scale * all_images @ all_texts.t()
        logits_per_text = logits_per_image.t()
        labels = torch.arange(len(all_images), device=image_embeds.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
