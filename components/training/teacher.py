"""The teacher of feature distillation: a model folder, s3:// folder or registry URI, loaded frozen on the
training device and checked against the student it teaches."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import PreTrainedModel

from zhclip.components.core.errors import ZhclipError
from zhclip.components.core.storage import local_folder
from zhclip.components.core.tracking import registered_model_folder
from zhclip.model import load_model
from zhclip.model.presets import ClipModel


def load_teacher(
    teacher: str, tracking_uri: str, student: PreTrainedModel, context_length: int, device: torch.device
) -> ClipModel:
    """The frozen teacher on `device`, in eval mode. It must read the student's token ids (same
    vocabulary, at least `context_length` positions) and give embeddings of the student's size."""
    with tempfile.TemporaryDirectory() as scratch:
        if teacher.startswith("models:/"):
            folder = str(registered_model_folder(teacher, tracking_uri, scratch, "teacher"))
        else:
            folder = local_folder(teacher, scratch)
        if not Path(folder, "config.json").is_file():
            raise ZhclipError(
                f"teacher {teacher!r} is not a model folder (no config.json): give a zhclip or "
                "ChineseCLIP model folder, an s3:// folder or models:/<name>@<alias>"
            )
        model, _ = load_model(folder)
    _check_fits(teacher, model, student, context_length)
    model.requires_grad_(False)
    # transformers types PreTrainedModel.to as the unbound nn.Module.to (functools.wraps)
    return model.to(device).eval()  # pyright: ignore[reportArgumentType]


def _check_fits(name: str, teacher: PreTrainedModel, student: PreTrainedModel, context_length: int) -> None:
    mine, theirs = student.config, teacher.config
    problems = []
    if theirs.text_config.vocab_size != mine.text_config.vocab_size:
        problems.append(
            f"vocabulary {theirs.text_config.vocab_size} tokens, the student's {mine.text_config.vocab_size}"
        )
    if theirs.text_config.max_position_embeddings < context_length:
        problems.append(
            f"{theirs.text_config.max_position_embeddings} text positions, fewer than context_length {context_length}"
        )
    if theirs.projection_dim != mine.projection_dim:
        problems.append(f"embeddings of {theirs.projection_dim} dimensions, the student's {mine.projection_dim}")
    if problems:
        raise ZhclipError(f"teacher {name!r} cannot teach this student: " + "; ".join(problems))
