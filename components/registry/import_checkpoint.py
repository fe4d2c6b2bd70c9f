"""Convert: a released Chinese-CLIP `.pt` checkpoint -> a zhclip / Hugging Face model folder."""

from __future__ import annotations

from pathlib import Path

from zhclip.components.core.errors import ZhclipError
from zhclip.components.core.summaries import timed
from zhclip.model.convert import convert_checkpoint
from zhclip.model.presets import CONTEXT_LENGTH, image_size


def convert(
    checkpoint: str | Path,
    out_dir: str | Path,
    vocab_file: str | Path | None = None,
    context_length: int = CONTEXT_LENGTH,
    preset: str | None = None,
) -> dict:
    """Convert and describe the result (architecture, parameter count, folder)."""
    from transformers import AutoConfig

    summary: dict = {"checkpoint": str(checkpoint), "model_dir": str(out_dir)}
    with timed(summary):
        try:
            convert_checkpoint(checkpoint, out_dir, vocab_file, context_length, preset)
        except (FileNotFoundError, ValueError) as err:
            raise ZhclipError(f"cannot convert {checkpoint}: {err}") from err
    config = AutoConfig.from_pretrained(out_dir)
    summary.update(
        architecture=config.model_type,
        projection_dim=config.projection_dim,
        image_size=image_size(config),
        text_layers=config.text_config.num_hidden_layers,
    )
    return summary
