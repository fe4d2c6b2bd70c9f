"""A training run's checkpoints: the plain model folder plus what resuming needs (optimizer,
scheduler, RNG state, progress, LoRA adapters and training-only parameters) in training_state.pt.
Free of Ray and MLflow, like the step (step.py) whose state it saves."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zhclip.components.core.lineage import TRAINING_STATE_FILE
from zhclip.components.training.step import TRAINING_ONLY, TrainStep
from zhclip.model import load_model, save_model
from zhclip.model.lora import adapter_state, has_lora, merged_copy
from zhclip.model.presets import ClipModel


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


def save_checkpoint(folder: str | Path, model: ClipModel, processor, step: TrainStep, progress: dict[str, Any]) -> Path:
    """A resumable checkpoint: the plain model folder (safetensors; LoRA adapters merged, training-only
    parameters left out) plus optimizer, scheduler, RNG state, `progress` (global step, history...)
    and those adapters and parameters, in training_state.pt."""
    plain = merged_copy(model) if has_lora(model) else model
    weights = {key: value for key, value in plain.state_dict().items() if key not in TRAINING_ONLY}
    folder = save_model(plain, processor, folder, state_dict=weights)
    torch.save(
        {
            "optimizer": step.optimizer.state_dict(),
            "scheduler": step.scheduler.state_dict() if step.scheduler else None,
            "rng": _rng_state(),
            "progress": progress,
            "training_parameters": training_parameters(model),
        },
        folder / TRAINING_STATE_FILE,
    )
    return folder


def training_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What the plain folder cannot hold: LoRA adapters with their base weights, and TRAINING_ONLY."""
    state = model.state_dict()
    return adapter_state(model) | {key: state[key] for key in TRAINING_ONLY if key in state}


def restore_training_parameters(model: torch.nn.Module, state: dict[str, Any]) -> None:
    """Put a checkpoint's adapters and training-only parameters back into a model that has them
    (the same LoRA and loss settings): the unmerged model of the interrupted run, exactly."""
    saved = state.get("training_parameters", {})
    result = model.load_state_dict(saved, strict=False)
    if result.unexpected_keys:
        raise ValueError(
            f"the checkpoint holds {result.unexpected_keys[:3]}... that this stage's model lacks: "
            "resume with the LoRA and loss settings it was trained with"
        )


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
