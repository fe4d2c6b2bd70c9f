"""Start: the model training starts from, as one Hugging Face folder (evaluated as the baseline).

Three starting points (params.yaml section `start`, key `source`):
- `scratch`: random towers of the preset (only for comparisons: nobody trains a CLIP from nothing);
- `towers`: the paper's start: an OpenAI-CLIP folder for the image tower and a Chinese RoBERTa-wwm
  folder for the text tower (model/pretrained.py names any tensor that does not fit the preset);
- `checkpoint`: a released Chinese-CLIP `.pt` (the reference's format, converted here) or a
  ChineseCLIP / zhclip model folder, to fine-tune.

`stages` says which training stages run and what each starts from: the paper's recipe
`{stage1: start, stage2: stage1}`, or fine-tuning as the reference's finetune scripts do
`{stage2: start}`. dvc.yaml runs one training stage per entry.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zhclip.components.core.architecture import ModelConfig
from zhclip.components.core.errors import ZhclipError
from zhclip.components.core.lineage import dvc_hash
from zhclip.components.core.settings import setting, shared
from zhclip.components.core.storage import arrow_filesystem
from zhclip.components.core.summaries import timed, write_summary

SOURCES = ("scratch", "towers", "checkpoint")
# The recipes a pipeline can run: stage 2's model is what gets registered, so every recipe ends there.
# By name, as the Kubeflow pipeline's branches are named.
RECIPES = {"two-stage": {"stage1": "start", "stage2": "stage1"}, "fine-tune": {"stage2": "start"}}


def recipe_name(stages: dict[str, str]) -> str:
    """`two-stage` or `fine-tune` for a valid `stages`."""
    return next(name for name, recipe in RECIPES.items() if recipe == stages)


@dataclass
class StartConfig:
    """Section `start`: the model training starts from, and which stages run."""

    source: str = setting(
        "scratch",
        "what training starts from: scratch | towers (the paper: OpenAI-CLIP + Chinese "
        "RoBERTa) | checkpoint (a released Chinese-CLIP)",
    )
    vision: str = setting("", "towers: OpenAI-CLIP folder (CLIPModel / CLIPVisionModel, Hugging Face format)")
    text: str = setting("", "towers: Chinese RoBERTa-wwm folder (BertModel / BertForMaskedLM)")
    checkpoint: str = setting("", "checkpoint: a Chinese-CLIP .pt, or a ChineseCLIP / zhclip model folder")
    stages: dict[str, str] = setting(
        dict(RECIPES["two-stage"]),
        "the training stages and the model each starts from: "
        "{stage1: start, stage2: stage1} (the paper), or {stage2: start} to fine-tune",
    )
    preset: str = shared(ModelConfig, "preset")
    context_length: int = shared(ModelConfig, "context_length")
    seed: int = setting(0, "scratch: the seed of the random initialisation")

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        if self.stages not in RECIPES.values():
            raise ValueError(
                f"stages {self.stages} is not a recipe zhclip runs; use {RECIPES['two-stage']} (the paper's "
                f"two stages) or {RECIPES['fine-tune']} (fine-tuning the start)"
            )
        if self.source == "towers" and not (self.vision or self.text):
            raise ValueError("source towers needs start.vision and/or start.text (pretrained folders)")
        if self.source == "checkpoint" and not self.checkpoint:
            raise ValueError("source checkpoint needs start.checkpoint (a Chinese-CLIP .pt or a model folder)")

    def weights(self) -> dict[str, str]:
        """The starting weights this config reads, by role."""
        chosen = {"towers": {"vision": self.vision, "text": self.text}, "checkpoint": {"checkpoint": self.checkpoint}}
        return {role: path for role, path in chosen.get(self.source, {}).items() if path}


def _local(path: str, scratch: Path) -> Path:
    """A local copy of an s3:// file or folder (the Kubeflow pipeline passes MinIO URIs); local paths as they are."""
    if not path.startswith("s3://"):
        if not Path(path).exists():
            raise ZhclipError(
                f"starting weights {path} not found; `dvc add` or `dvc import` them there first "
                "(docs/starting-weights.md)"
            )
        return Path(path)
    from pyarrow import fs

    filesystem, inner = arrow_filesystem(path)
    target = scratch / Path(inner).name  # a file or a whole folder: copy_files takes either
    fs.copy_files(inner, str(target), source_filesystem=filesystem, destination_filesystem=fs.LocalFileSystem())
    return target


def _build(config: StartConfig, out_dir: Path, scratch: Path) -> dict[str, Any]:
    from zhclip.model import build_model, load_model, save_model
    from zhclip.model.convert import convert_checkpoint
    from zhclip.model.pretrained import init_from_pretrained

    if config.source == "checkpoint":
        source = _local(config.checkpoint, scratch)
        try:
            if source.is_file():
                convert_checkpoint(source, out_dir, context_length=config.context_length)
                return {"converted": True}
            save_model(*load_model(source), out_dir)
        except (FileNotFoundError, OSError, ValueError) as err:
            raise ZhclipError(f"start.checkpoint {config.checkpoint}: {err}") from err
        return {"converted": False}
    try:
        model, processor = build_model(config.preset, context_length=config.context_length, seed=config.seed)
    except ValueError as err:
        raise ZhclipError(f"params.yaml section 'model': {err}") from err
    loaded = {}
    if config.source == "towers":
        folders = {role: _local(path, scratch) for role, path in config.weights().items()}
        try:
            loaded = init_from_pretrained(model, folders.get("vision"), folders.get("text"))
        except (FileNotFoundError, ValueError) as err:
            raise ZhclipError(f"start towers: {err}") from err
    save_model(model, processor, out_dir)
    return {"tensors_loaded": loaded}


def prepare_start(out_dir: str | Path, config: StartConfig, summary_path: str | Path | None = None) -> dict:
    """Write the starting model folder to `out_dir`; returns the summary (source, weights and their hashes, recipe)."""
    from transformers import AutoConfig

    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    summary: dict[str, Any] = {
        "source": config.source,
        "model_dir": str(out_dir),
        "stages": config.stages,
        "weights": config.weights(),
    }
    with timed(summary), tempfile.TemporaryDirectory() as scratch:
        summary.update(_build(config, out_dir, Path(scratch)))
        summary["weights_dvc_hash"] = {role: dvc_hash(path) for role, path in config.weights().items()}
    model_config = AutoConfig.from_pretrained(out_dir)
    summary.update(architecture=model_config.model_type, projection_dim=model_config.projection_dim)
    if summary_path:
        write_summary(summary_path, summary)
    return summary
