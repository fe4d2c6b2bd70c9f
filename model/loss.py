"""CLIP's losses, with features gathered across workers as open_clip does: symmetric InfoNCE (with
optional multi-positive targets for false negatives), the sigmoid loss of SigLIP, and feature
distillation from a teacher."""

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


def pair_positives(
    row_image_keys: torch.Tensor, row_text_keys: torch.Tensor, image_keys: torch.Tensor, text_keys: torch.Tensor
) -> torch.Tensor:
    """Which (row pair, column pair) match: they share an image or a caption (equal keys, which the
    loader derives from the image's bytes and the caption's text). A boolean matrix, rows x columns."""
    return (row_image_keys[:, None] == image_keys[None, :]) | (row_text_keys[:, None] == text_keys[None, :])


def contrastive_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    local_loss: bool = False,
    gather_with_grad: bool = False,
    image_keys: torch.Tensor | None = None,
    text_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of image->text and text->image cross-entropy; row i matches column i of the global batch.

    Inputs are this worker's projected embeddings (normalised here); `logit_scale` is the log
    temperature, clamped to ln(100) like CLIP and Chinese-CLIP. Under torch.distributed, negatives
    come from every worker's batch; `local_loss` scores only this worker's rows against the global
    batch (less memory: the mean over workers equals the global loss for equal local batches).

    With `image_keys` and `text_keys` (one int64 per pair), pairs that share an image or a caption
    are positives of each other, not negatives: each row's target spreads evenly over all its true
    matches (the multi-positive target of supervised-contrastive and UniCL losses). When every key
    is unique the target is the diagonal, and the loss is plain InfoNCE.
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
    if image_keys is not None and text_keys is not None:
        all_image_keys, all_text_keys = gather_keys(image_keys), gather_keys(text_keys)
        rows = (image_keys, text_keys) if local_loss else (all_image_keys, all_text_keys)
        positives = pair_positives(*rows, all_image_keys, all_text_keys).float()
        labels = positives / positives.sum(dim=1, keepdim=True)  # the relation is symmetric: one target for both
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def gather_keys(keys: torch.Tensor) -> torch.Tensor:
    """All workers' pair keys, in rank order (no gradient)."""
    _, world_size = _distributed()
    if world_size == 1:
        return keys
    gathered = [torch.empty_like(keys) for _ in range(world_size)]
    dist.all_gather(gathered, keys)
    return torch.cat(gathered)


def sigmoid_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    image_keys: torch.Tensor | None = None,
    text_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss: -sum of log sigmoid(label x (scale x cosine + bias)) over this
    worker's images against every worker's texts, divided by the local batch size (open_clip's
    `SigLipLoss`). Labels are +1 for matching pairs (the diagonal, or with keys every pair sharing
    an image or caption) and -1 otherwise.

    Chunked over workers as open_clip: this worker's images meet one worker's texts at a time, so no
    global N x N matrix is formed (open_clip passes text blocks around a ring; here they come from one
    all-gather with gradients, which costs N x dim memory and lets each worker's texts take the
    gradients of every worker's images). The mean over workers equals the loss of one process on
    the concatenated batch.
    """
    image_embeds = F.normalize(image_embeds, dim=-1)
    text_embeds = F.normalize(text_embeds, dim=-1)
    scale = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
    rank, world_size = _distributed()
    text_blocks = [text_embeds] if world_size == 1 else list(torch.distributed.nn.all_gather(text_embeds))
    row_keys = key_blocks = None
    if image_keys is not None and text_keys is not None:
        row_keys = (image_keys, text_keys)
        key_blocks = list(zip(gather_keys(image_keys).chunk(world_size), gather_keys(text_keys).chunk(world_size)))
    loss = image_embeds.new_zeros(())
    for block, texts in enumerate(text_blocks):
        logits = scale * image_embeds @ texts.t() + logit_bias
        if row_keys is not None and key_blocks is not None:
            positives = pair_positives(*row_keys, *key_blocks[block])
        elif block == rank:
            positives = torch.eye(len(image_embeds), len(texts), dtype=torch.bool, device=logits.device)
        else:
            positives = torch.zeros_like(logits, dtype=torch.bool)
        labels = 2 * positives.to(logits.dtype) - 1
        loss = loss - F.logsigmoid(labels * logits).sum()
    return loss / len(image_embeds)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cosine between each row's student and teacher embeddings (the reference's feature
    distillation; here the gradient reaches the student, whose features the reference detaches).
    Row-wise, so the mean over workers equals the global mean without gathering anything."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"distillation needs the teacher's embeddings to have the student's size: student "
            f"{tuple(student.shape[1:])}, teacher {tuple(teacher.shape[1:])} (choose a teacher with the "
            "same projection_dim)"
        )
    return (1 - F.cosine_similarity(student.float(), teacher.detach().float(), dim=-1)).mean()
