"""The training step's own settings (precision, accumulation, loss, masking), validated.

Apart from step.py, which imports torch, transformers and the model library: a stage's settings
are checked where it is launched (the command, the pipeline) before any of that is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

PRECISIONS = ("fp32", "bf16")
LOSSES = ("infonce", "siglip")


@dataclass
class StepConfig:
    precision: str = "fp32"  # bf16: autocast forward in bfloat16, fp32 master weights and optimizer state
    accum_steps: int = 1  # micro-batches per optimizer step (feature cache: same loss and gradient)
    mask_ratio: float = 0.0  # FLIP: share of image patches dropped in training steps
    local_loss: bool = False
    gather_with_grad: bool = False
    loss: str = "infonce"  # or "siglip"
    false_negatives: bool = False  # pairs sharing an image or caption are positives (batch keys image_key, text_key)
    distill_image_weight: float = 0.0  # with a teacher: weight of 1 - cosine to its image embeddings
    distill_text_weight: float = 0.0

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.accum_steps < 1:
            raise ValueError(f"accum_steps must be at least 1, got {self.accum_steps}")
