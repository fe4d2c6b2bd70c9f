"""Train: the two-stage Chinese-CLIP recipe as Ray Train `TorchTrainer` jobs.

`train_worker_loop` is plain PyTorch (it runs without Ray too: benchmarks call it directly); Ray
Train adds scheduling, process groups and checkpoint storage around it. Stage 1 locks the image
tower (LiT); stage 2 starts from stage 1's model with both towers learning.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from components.common import ZhclipError, build_config, section, write_summary
from components.ingest import read_pairs
from model import build_model, contrastive_loss, decode_image, load_model, lock_image_tower, save_model
from model.pretrained import init_from_pretrained

HISTORY_FILE = "training_history.json"


@dataclass
class TrainConfig:
    stage: int = 1
    preset: str = "tiny"
    context_length: int = 52
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 10
    seed: int = 0
    num_workers: int = 1
    cpus_per_worker: int = 2
    use_gpu: bool = False
    storage_path: str = "ray_results"
    pretrained_vision: str = ""  # stage 1 from scratch: an OpenAI-CLIP folder (HF format) for the image tower
    pretrained_text: str = ""  # ... and a Chinese RoBERTa-wwm folder (BertModel format) for the text tower
    unlocked_groups: int = 0  # stage 1: leave this many last image-tower groups trainable
    local_loss: bool = False  # multi-worker: score local rows against the global batch (less memory)
    gather_with_grad: bool = False  # multi-worker: let gradients flow through other workers' features

    def __post_init__(self):
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage}")
        for name in ("epochs", "batch_size", "num_workers", "cpus_per_worker", "context_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")

    @classmethod
    def from_params(cls, params: dict[str, Any], stage: int, **overrides: Any) -> "TrainConfig":
        """Merge params sections `model`, `train` and `stage<N>` (later wins), then CLI overrides."""
        names = {f.name for f in fields(cls)} - {"stage"}
        values = {
            **section(params, "model", {"preset", "context_length"}),
            **section(params, "train", names),
            **section(params, f"stage{stage}", names),
        }
        values.update({key: value for key, value in overrides.items() if value is not None})
        return build_config(cls, {"stage": stage, **values}, f"training config for stage {stage}")


class PairDataset(Dataset):
    """(token ids, pixel values) per (text, image) pair; images are decoded as they are read."""

    def __init__(self, pairs, processor, context_length: int):
        tokens = processor.tokenizer(
            list(pairs["text"]), padding="max_length", truncation=True, max_length=context_length, return_tensors="pt"
        )
        self.input_ids, self.attention_mask = tokens["input_ids"], tokens["attention_mask"]
        self.images = list(pairs["image"])
        self.image_processor = processor.image_processor

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        pixels = self.image_processor(images=decode_image(self.images[index]), return_tensors="pt")["pixel_values"][0]
        return {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index], "pixel_values": pixels}


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups as in Chinese-CLIP: no decay for biases, norms, embeddings and logit scale."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim < 2 or "embeddings" in name or "logit_scale" in name or "norm" in name.lower()
        (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Linear warmup to the base learning rate, then cosine decay to zero."""

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


def train_worker_loop(
    config: dict[str, Any],
    rank: int = 0,
    world_size: int = 1,
    wrap_model: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m,
    report: Callable[[dict, str | None], None] | None = None,
) -> list[dict]:
    """One worker's training; returns the per-step history. `config` holds TrainConfig fields plus
    `prepared_dir` and `init_dir`. `report(metrics, checkpoint_dir)` is called after every epoch,
    with a saved model directory at the end (rank 0 only)."""
    cfg = TrainConfig(**{f.name: config[f.name] for f in fields(TrainConfig)})
    seed_everything(cfg.seed + rank)
    torch.set_num_threads(cfg.cpus_per_worker)
    if config["init_dir"]:
        model, processor = load_model(config["init_dir"])
    else:
        model, processor = build_model(cfg.preset, context_length=cfg.context_length, seed=cfg.seed)
        init_from_pretrained(model, cfg.pretrained_vision or None, cfg.pretrained_text or None)
    pairs = read_pairs(config["prepared_dir"], "train").iloc[rank::world_size]
    loader = DataLoader(
        PairDataset(pairs, processor, cfg.context_length),
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=len(pairs) > cfg.batch_size,
        generator=torch.Generator().manual_seed(cfg.seed + rank),
    )
    model.train()
    if cfg.stage == 1:
        lock_image_tower(model, cfg.unlocked_groups)
    raw_model = model
    model = wrap_model(model)
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(parameter_groups(raw_model, cfg.weight_decay), lr=cfg.lr)
    scheduler = warmup_cosine(optimizer, cfg.warmup_steps, cfg.epochs * len(loader))
    history: list[dict] = []
    for epoch in range(cfg.epochs):
        epoch_start, epoch_losses = time.perf_counter(), []
        for batch in loader:
            batch = {key: value.to(device) for key, value in batch.items()}
            outputs = model(**batch)
            loss = contrastive_loss(outputs.image_embeds, outputs.text_embeds, raw_model.logit_scale,
                                    local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():  # as the reference: the temperature stays within [1, 100]
                raw_model.logit_scale.clamp_(0, math.log(100))
            epoch_losses.append(loss.item())
            history.append({"step": len(history) + 1, "epoch": epoch + 1, "loss": loss.item(), "lr": scheduler.get_last_lr()[0]})
        metrics = {"epoch": epoch + 1, "loss": float(np.mean(epoch_losses)),
                   "samples_per_s": len(epoch_losses) * cfg.batch_size / (time.perf_counter() - epoch_start)}
        last = epoch == cfg.epochs - 1
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint_dir = None
            if last and rank == 0:
                checkpoint_dir = str(save_model(raw_model, processor, tmp))
                (Path(tmp) / HISTORY_FILE).write_text(json.dumps(history), encoding="utf-8")
            if report:
                report(metrics, checkpoint_dir)
    return history


def _ray_worker(config: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker: plain loop, Ray's DDP wrapper and reporting."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        if context.get_world_rank() == 0:
            print(f"stage {config['stage']} epoch {metrics['epoch']}/{config['epochs']}: "
                  f"loss {metrics['loss']:.4f}, {metrics['samples_per_s']:.0f} samples/s", flush=True)
        ray.train.report(metrics, checkpoint=checkpoint)

    train_worker_loop(config, context.get_world_rank(), context.get_world_size(), ray.train.torch.prepare_model, report)


def _run_with_ray(config: TrainConfig, loop_config: dict[str, Any]):
    import ray
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    started_here = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    if started_here:
        ray.init(num_cpus=max(os.cpu_count() or 1, config.num_workers * config.cpus_per_worker),
                 include_dashboard=False, log_to_driver=True, configure_logging=False)
    try:
        trainer = TorchTrainer(
            _ray_worker,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(
                num_workers=config.num_workers, use_gpu=config.use_gpu,
                resources_per_worker={"CPU": config.cpus_per_worker, **({"GPU": 1} if config.use_gpu else {})},
            ),
            run_config=RunConfig(
                name=f"zhclip-stage{config.stage}-{time.strftime('%Y%m%d-%H%M%S')}",
                storage_path=str(Path(config.storage_path).resolve()),
            ),
        )
        try:
            return trainer.fit()
        except ray.train.TrainingFailedError as err:
            raise ZhclipError(f"training stage {config.stage} failed: {err}; the worker's log is above") from err
    finally:
        if started_here:
            ray.shutdown()


def train(
    prepared_dir: str | Path,
    out_dir: str | Path,
    config: TrainConfig,
    init_dir: str | Path | None = None,
    summary_path: str | Path | None = None,
    history_csv: str | Path | None = None,
) -> dict:
    """Train one stage with Ray Train and write its Hugging Face model directory to `out_dir`.

    Stage 2 requires `init_dir` (stage 1's output). Returns the summary (losses, steps, duration).
    """
    prepared_dir, out_dir = Path(prepared_dir).resolve(), Path(out_dir)
    read_pairs(prepared_dir, "train")  # fail here, with a clear message, before starting Ray
    if config.stage == 2 and not init_dir:
        raise ZhclipError("stage 2 starts from stage 1's model: pass --init <stage 1 output folder>")
    if init_dir and not (Path(init_dir) / "config.json").is_file():
        raise ZhclipError(f"--init {init_dir} is not a model folder (no config.json); train stage 1 first")
    for name in ("pretrained_vision", "pretrained_text"):
        folder = getattr(config, name)
        if folder and not Path(folder).is_dir():
            raise ZhclipError(f"{name}: pretrained checkpoint folder {folder} not found (local folders only)")
        if folder and init_dir:
            raise ZhclipError(f"{name} initialises a fresh model; it cannot be combined with --init {init_dir}")
    loop_config = {**asdict(config), "prepared_dir": str(prepared_dir), "init_dir": str(Path(init_dir).resolve()) if init_dir else None,
                   **{name: str(Path(getattr(config, name)).resolve()) if getattr(config, name) else ""
                      for name in ("pretrained_vision", "pretrained_text")}}
    start = time.perf_counter()
    result = _run_with_ray(config, loop_config)
    result.checkpoint.to_directory(str(out_dir))
    history = json.loads((out_dir / HISTORY_FILE).read_text(encoding="utf-8"))
    summary = {
        "stage": config.stage, "model_dir": str(out_dir), "steps": len(history), "epochs": config.epochs,
        "first_loss": history[0]["loss"], "final_loss": result.metrics["loss"],
        "samples_per_s": result.metrics["samples_per_s"], "duration_s": round(time.perf_counter() - start, 3),
        "config": asdict(config),
    }
    if history_csv:
        _write_history_csv(history, history_csv)
    if summary_path:
        write_summary(summary_path, summary)
    return summary


def _write_history_csv(history: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=["step", "epoch", "loss", "lr"])
        writer.writeheader()
        writer.writerows(history)
