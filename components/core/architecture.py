"""Section `model`: the architecture that every step building a model shares (training, the start,
the demo's towers). Here, in core, so that steps on any layer can share its settings."""

from __future__ import annotations

from dataclasses import dataclass

from zhclip.components.core.settings import setting
from zhclip.model import CONTEXT_LENGTH


@dataclass
class ModelConfig:
    """Section `model`: the architecture every step that builds a model shares."""

    preset: str = setting("tiny", "the architecture: tiny (CPU demo) or ViT-B-16")
    context_length: int = setting(CONTEXT_LENGTH, "text length the tokenizer pads and truncates to (Chinese-CLIP: 52)")
