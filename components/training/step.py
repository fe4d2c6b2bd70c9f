"""The training step of zhclip, free of Ray and MLflow: optimizer, schedule, accumulation, precision
(its checkpoints: checkpoint.py).

Ray Train workers (components/training/loop.py) and the GPU benchmark (bench/) both drive this module, so
what is benchmarked is what trains. It imports only torch, transformers, numpy, the standard library,
`model/` and its settings (step_config.py).
"""

from __future__ import annotations

import math
import random
from contextlib import nullcontext

import numpy as np
import torch
from transformers import PreTrainedModel

from zhclip.components.training.step_config import StepConfig
from zhclip.model import contrastive_loss
from zhclip.model.embedding import projected_features
from zhclip.model.locking import image_tower_groups
from zhclip.model.loss import MAX_LOGIT_SCALE, distillation_loss, sigmoid_loss
from zhclip.model.masking import enable_patch_masking
from zhclip.model.presets import ClipModel, image_size

# Parameters that exist only while training (the sigmoid loss's bias): kept in the training state,
# never in the model folder, which stays a plain ChineseCLIP checkpoint.
TRAINING_ONLY = ("logit_bias",)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups as in Chinese-CLIP: no decay for biases, norms, embeddings and logit scale."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim < 2 or "embeddings" in name or "logit_scale" in name or "norm" in name.lower()
        (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, fused: bool = False) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only (a locked tower gets no optimizer state), with
    Chinese-CLIP's betas (0.9, 0.98) and eps 1e-6. `fused` uses the single-kernel CUDA update."""
    return torch.optim.AdamW(
        parameter_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=fused or None
    )


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the base learning rate, then cosine decay to zero at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each layer's activations in backward (less memory, more work)."""
    # renamed activation_checkpointing_enable in newer transformers; the GPU hosts' 5.17 has the old name
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()


def add_logit_bias(model: torch.nn.Module, value: float) -> None:
    """The sigmoid loss's learnable bias, as a parameter of the model (so DDP averages its gradient
    like every other); it is left out of the saved model folder (TRAINING_ONLY)."""
    if not hasattr(model, "logit_bias"):
        model.logit_bias = torch.nn.Parameter(torch.tensor(float(value)))


def image_tower_locked(model: ClipModel) -> bool:
    """True when no image-tower parameter learns (stage 1 with unlocked_groups 0)."""
    return not any(
        p.requires_grad for group in image_tower_groups(model) for module in group for p in module.parameters()
    )


class TrainStep:
    """One optimizer step on one worker's batch: forward, loss, backward, update.

    The loss is symmetric InfoNCE or SigLIP's sigmoid loss (`config.loss`); with
    `config.false_negatives` the batch's `image_key` and `text_key` mark pairs that share an image or a
    caption as positives of each other. With a `teacher` (a frozen model), the weighted 1 - cosine
    between this model's embeddings and the teacher's, computed under no_grad on the same batch, is
    added (feature distillation).

    `model` may be wrapped (DDP); `raw_model` is the unwrapped one. A batch holds `input_ids`,
    `attention_mask` and `pixel_values`, or `image_embeds` instead of pixels when the image tower is
    locked and its embeddings were computed once (single process only: the text tower is called
    directly, outside any DDP wrapper).

    With `accum_steps` K the batch is split into K micro-batches. As in open_clip and Chinese-CLIP,
    every micro-batch is first encoded without gradients (the feature cache); then each one is
    encoded again with gradients and the loss over the whole batch (the others' cached features as
    constants) is back-propagated. The gradients add up to the full-batch gradient, so the loss and
    the update equal those without accumulation, with one micro-batch of activations in memory. The
    logit scale takes its gradient from one micro-batch only, so it is not counted K times.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        config: StepConfig | None = None,
        raw_model: ClipModel | None = None,
        teacher: ClipModel | None = None,
    ):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.config = config or StepConfig()
        if raw_model is None:
            assert isinstance(model, ClipModel)  # not wrapped: the model itself
            raw_model = model
        self.raw_model = raw_model
        self.teacher = teacher
        self.mask_hook = enable_patch_masking(self.raw_model, self.config.mask_ratio)

    def _autocast(self, device: torch.device):
        if self.config.precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _encode(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        with self._autocast(batch["input_ids"].device):
            if "image_embeds" in batch:
                text = projected_features(
                    self.raw_model.get_text_features(
                        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                    )
                )
                return batch["image_embeds"].float(), text.float()
            out = self.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]
            )
        return out.image_embeds.float(), out.text_embeds.float()

    def _teacher_features(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The teacher's (image, text) embeddings of the batch; None for a term whose weight is 0."""
        if self.teacher is None:
            return None, None
        image = text = None
        with torch.no_grad(), self._autocast(batch["input_ids"].device):
            if self.config.distill_image_weight:
                if "pixel_values" not in batch:
                    raise ValueError("image distillation needs the batch's pixel_values, not cached image_embeds")
                image = projected_features(self.teacher.get_image_features(pixel_values=self._teacher_pixels(batch)))
            if self.config.distill_text_weight:
                text = projected_features(
                    self.teacher.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                )
        return image, text

    def _teacher_pixels(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The batch's pixels at the teacher's input size (both use CLIP's normalisation)."""
        pixels = batch["pixel_values"]
        assert self.teacher is not None  # asked for by _teacher_features only with a teacher
        size = image_size(self.teacher.config)
        if pixels.shape[-1] == size:
            return pixels
        return torch.nn.functional.interpolate(pixels, size=(size, size), mode="bicubic", antialias=True)

    def _distillation(self, images: torch.Tensor, texts: torch.Tensor, teacher: tuple) -> torch.Tensor:
        teacher_images, teacher_texts = teacher
        loss = images.new_zeros(())
        if teacher_images is not None:
            loss = loss + self.config.distill_image_weight * distillation_loss(images, teacher_images)
        if teacher_texts is not None:
            loss = loss + self.config.distill_text_weight * distillation_loss(texts, teacher_texts)
        return loss

    def _loss(
        self, images: torch.Tensor, texts: torch.Tensor, batch: dict[str, torch.Tensor], learnables: tuple
    ) -> torch.Tensor:
        """The contrastive term over the (whole) batch; `learnables` = (logit scale, logit bias or None)."""
        scale, bias = learnables
        keys = (batch["image_key"], batch["text_key"]) if self.config.false_negatives else (None, None)
        if self.config.loss == "siglip":
            return sigmoid_loss(images, texts, scale, bias, *keys)
        return contrastive_loss(
            images,
            texts,
            scale,
            local_loss=self.config.local_loss,
            gather_with_grad=self.config.gather_with_grad,
            image_keys=keys[0],
            text_keys=keys[1],
        )

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        scale, bias = self.raw_model.logit_scale, getattr(self.raw_model, "logit_bias", None)
        if self.config.accum_steps == 1:
            images, texts = self._encode(batch)
            loss = self._loss(images, texts, batch, (scale, bias))
            loss = loss + self._distillation(images, texts, self._teacher_features(batch))
            loss.backward()
        else:
            loss = self._accumulate(batch, scale, bias)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        with torch.no_grad():  # as the reference: the temperature stays within [1, 100]
            scale.clamp_(0, MAX_LOGIT_SCALE)
        result = {"loss": loss.item(), "lr": self.optimizer.param_groups[0]["lr"], "logit_scale": scale.exp().item()}
        return result | ({"logit_bias": bias.item()} if bias is not None else {})

    def _accumulate(
        self, batch: dict[str, torch.Tensor], scale: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        size = len(batch["input_ids"])
        steps = self.config.accum_steps
        if size % steps:
            raise ValueError(f"batch of {size} does not split into accum_steps={steps} equal micro-batches")
        part_size = size // steps
        micro = [
            {key: value[i * part_size : (i + 1) * part_size] for key, value in batch.items()} for i in range(steps)
        ]
        with torch.no_grad():
            cached = [self._encode(part) for part in micro]
        teacher = [self._teacher_features(part) for part in micro]
        distilled = torch.zeros(())
        loss = distilled  # each of the (two or more) passes replaces it
        for index, part in enumerate(micro):
            images, texts = self._encode(part)
            all_images = torch.cat([c[0] for c in cached[:index]] + [images] + [c[0] for c in cached[index + 1 :]])
            all_texts = torch.cat([c[1] for c in cached[:index]] + [texts] + [c[1] for c in cached[index + 1 :]])
            # the scale and bias take their gradient from one pass only: each pass's loss is the whole
            # batch's. Later passes keep them in the graph with a zero gradient, as DDP (no unused
            # parameters) expects a gradient for every parameter from every backward.
            learnables = (scale, bias) if index == 0 else (_without_gradient(scale), _without_gradient(bias))
            loss = self._loss(all_images, all_texts, batch, learnables)
            # the distillation terms are row means: each micro-batch's rows weigh 1/accum_steps of the batch's
            distillation = self._distillation(images, texts, teacher[index]) / steps
            (loss + distillation).backward()
            distilled = distilled + distillation.detach().cpu()
        return loss.detach() + distilled.to(loss.device)


def _without_gradient(param: torch.Tensor | None) -> torch.Tensor | None:
    """`param`'s value, in the graph with a zero gradient."""
    return None if param is None else param.detach() + 0 * param
