"""The training step of zhclip, free of Ray and MLflow: optimizer, schedule, accumulation, precision.

Ray Train workers (components/train.py) and the GPU benchmark (bench/) both drive this module, so
what is benchmarked is what trains. It imports only torch, numpy, the standard library and `model/`.
"""

from __future__ import annotations

import math
import random
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from zhclip.model import contrastive_loss, load_model, save_model
from zhclip.model.embedding import projected_features
from zhclip.model.locking import image_tower_groups
from zhclip.model.loss import MAX_LOGIT_SCALE
from zhclip.model.masking import enable_patch_masking

TRAINING_STATE_FILE = "training_state.pt"
PRECISIONS = ("fp32", "bf16")


@dataclass
class StepConfig:
    precision: str = "fp32"  # bf16: autocast forward in bfloat16, fp32 master weights and optimizer state
    accum_steps: int = 1  # micro-batches per optimizer step (feature cache: same loss and gradient)
    mask_ratio: float = 0.0  # FLIP: share of image patches dropped in training steps
    local_loss: bool = False
    gather_with_grad: bool = False

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.accum_steps < 1:
            raise ValueError(f"accum_steps must be at least 1, got {self.accum_steps}")


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


def image_tower_locked(model: PreTrainedModel) -> bool:
    """True when no image-tower parameter learns (stage 1 with unlocked_groups 0)."""
    return not any(
        p.requires_grad for group in image_tower_groups(model) for module in group for p in module.parameters()
    )


class TrainStep:
    """One optimizer step on one worker's batch: forward, symmetric InfoNCE, backward, update.

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
        raw_model: PreTrainedModel | None = None,
    ):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.config = config or StepConfig()
        self.raw_model = raw_model or model
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

    def _loss(self, images: torch.Tensor, texts: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        return contrastive_loss(
            images, texts, logit_scale, local_loss=self.config.local_loss, gather_with_grad=self.config.gather_with_grad
        )

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        scale = self.raw_model.logit_scale
        if self.config.accum_steps == 1:
            loss = self._loss(*self._encode(batch), scale)
            loss.backward()
        else:
            loss = self._accumulate(batch, scale)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        with torch.no_grad():  # as the reference: the temperature stays within [1, 100]
            scale.clamp_(0, MAX_LOGIT_SCALE)
        return {"loss": loss.item(), "lr": self.optimizer.param_groups[0]["lr"], "logit_scale": scale.exp().item()}

    def _accumulate(self, batch: dict[str, torch.Tensor], scale: torch.Tensor) -> torch.Tensor:
        size = len(batch["input_ids"])
        if size % self.config.accum_steps:
            raise ValueError(
                f"batch of {size} does not split into accum_steps={self.config.accum_steps} equal micro-batches"
            )
        part_size = size // self.config.accum_steps
        micro = [
            {key: value[i * part_size : (i + 1) * part_size] for key, value in batch.items()}
            for i in range(self.config.accum_steps)
        ]
        with torch.no_grad():
            cached = [self._encode(part) for part in micro]
        for index, part in enumerate(micro):
            images, texts = self._encode(part)
            all_images = torch.cat([c[0] for c in cached[:index]] + [images] + [c[0] for c in cached[index + 1 :]])
            all_texts = torch.cat([c[1] for c in cached[:index]] + [texts] + [c[1] for c in cached[index + 1 :]])
            loss = self._loss(all_images, all_texts, scale if index == 0 else scale.detach())
            loss.backward()
        return loss.detach()


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    folder: str | Path, model: PreTrainedModel, processor, step: TrainStep, progress: dict[str, Any]
) -> Path:
    """A resumable checkpoint: the model folder (safetensors) plus optimizer, scheduler, RNG state and
    `progress` (global step, history...) in training_state.pt."""
    folder = save_model(model, processor, folder)
    torch.save(
        {
            "optimizer": step.optimizer.state_dict(),
            "scheduler": step.scheduler.state_dict() if step.scheduler else None,
            "rng": _rng_state(),
            "progress": progress,
        },
        folder / TRAINING_STATE_FILE,
    )
    return folder


def load_checkpoint(folder: str | Path):
    """The model (on the CPU), processor and saved state of a checkpoint folder (RNG state not yet applied)."""
    model, processor = load_model(folder)
    # Not weights-only: the RNG states are Python/NumPy objects. These files are zhclip's own
    # checkpoints from the run's storage, never downloaded ones.
    state = torch.load(Path(folder) / TRAINING_STATE_FILE, map_location="cpu", weights_only=False)
    return model, processor, state


def restore_state(step: TrainStep, state: dict[str, Any]) -> dict[str, Any]:
    """Put the optimizer, scheduler and RNG back as saved; returns the saved progress."""
    step.optimizer.load_state_dict(state["optimizer"])
    if step.scheduler is not None and state["scheduler"] is not None:
        step.scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return state["progress"]
