"""One worker's training loop: plain PyTorch over the training step, with checkpoints, validation and
progress; it runs under Ray Train (components/training/runner.py) or alone."""

from __future__ import annotations

import json
import resource
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zhclip.components.core.errors import ZhclipError
from zhclip.components.core.lineage import HISTORY_FILE
from zhclip.components.core.storage import local_folder
from zhclip.components.core.tracking import (
    StepLogger,
)
from zhclip.components.data.shards import PreparedSplit
from zhclip.components.training.batch_decoder import BatchDecoder
from zhclip.components.training.checkpoint import (
    load_checkpoint,
    restore_state,
    restore_training_parameters,
    save_checkpoint,
)
from zhclip.components.training.config import TrainConfig
from zhclip.components.training.epoch_plan import EpochPlan, pair_digest
from zhclip.components.training.loader import on_device, training_batches
from zhclip.components.training.step import (
    TrainStep,
    add_logit_bias,
    build_optimizer,
    enable_activation_checkpointing,
    seed_everything,
    warmup_cosine,
)
from zhclip.components.training.teacher import load_teacher
from zhclip.model import build_model, load_model, lock_image_tower
from zhclip.model.fast import apply_speedups
from zhclip.model.lora import add_lora


@dataclass
class WorkerContext:
    """What the loop needs from its runner (Ray Train, or nothing for a plain local run)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    wrap_model: Callable[[torch.nn.Module], torch.nn.Module] = lambda model: model
    resume_dir: str | None = None  # a checkpoint folder to continue from
    report: Callable[[dict, str | None], None] | None = None  # (metrics, checkpoint folder or None)
    progress_bar: Callable[..., Any] | None = None  # tqdm-like factory, rank 0
    on_ray: bool = False  # decoders are Ray Data actors (else local processes)


def _initial_model(cfg: TrainConfig, init_dir: str | None):
    if init_dir:
        with tempfile.TemporaryDirectory() as scratch:
            return load_model(local_folder(init_dir, scratch))
    return build_model(cfg.preset, context_length=cfg.context_length, seed=cfg.seed)


def _set_train_mode(model, cfg: TrainConfig) -> None:
    model.train()
    if cfg.stage == 1:  # also puts the locked tower back in eval mode after validation
        lock_image_tower(model, cfg.unlocked_groups)


def _fit_context_length(model, processor, cfg: TrainConfig) -> None:
    """Train at `context_length` tokens, and save a processor that embeds at it too."""
    positions = model.config.text_config.max_position_embeddings
    if cfg.context_length > positions:
        raise ZhclipError(
            f"context_length {cfg.context_length} is more than the text tower's {positions} position "
            f"embeddings: set model.context_length to {positions} or less"
        )
    processor.tokenizer.model_max_length = cfg.context_length


def _fine_tuning_parts(model, cfg: TrainConfig, state: dict | None) -> int:
    """LoRA adapters and the sigmoid loss's bias, as the settings ask, then a checkpoint's values of
    them (a resumed run); returns the number of trainable parameters."""
    if cfg.lora:
        add_lora(model, cfg.lora, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_modules())
    if cfg.loss == "siglip":
        add_logit_bias(model, cfg.siglip_bias)
    if state:
        restore_training_parameters(model, state)
    return sum(param.numel() for param in model.parameters() if param.requires_grad)


def _summed_over_workers(counts: np.ndarray, device: torch.device) -> list[int]:
    """`counts` summed over the workers of a DDP group (this worker's alone without one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return counts.tolist()
    summed = torch.tensor(counts, device=device)
    dist.all_reduce(summed)
    return summed.tolist()


def peak_memory_mb(device: torch.device) -> float:
    """This training process's peak (rank 0's in the summary): the allocator's on a GPU, resident
    memory (ru_maxrss) on a CPU."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def validation_metrics(model, processor, prepared_dir: str, batch_size: int) -> dict[str, float]:
    """In-batch accuracy (image->text and text->image, batches of `batch_size` pairs) and retrieval
    mean recall on the valid split, the latter exactly as `zhclip evaluate` scores a split."""
    from zhclip.components.evaluation.retrieval import retrieval_metrics
    from zhclip.components.evaluation.split_embedding import embed_split

    model.eval()
    with torch.no_grad():
        split = embed_split(model, processor, prepared_dir, "valid", batch_size)
    data = split.data
    pair_texts, pair_images = data.text_emb[split.pair_texts], data.image_emb[split.pair_images]
    hits = []
    for start in range(0, len(pair_texts), batch_size):
        scores = pair_texts[start : start + batch_size] @ pair_images[start : start + batch_size].T
        diagonal = np.arange(len(scores))
        hits += [(scores.argmax(1) == diagonal).mean(), (scores.argmax(0) == diagonal).mean()]
    recall = retrieval_metrics(data.text_emb, data.image_emb, data.text_to_images)
    return {"valid_inbatch_accuracy": round(100 * float(np.mean(hits)), 4), "valid_mean_recall": recall["mean_recall"]}


def _model_to_train(cfg: TrainConfig, config: dict[str, Any], ctx: WorkerContext):
    """(the model as the step drives it, the model itself, its processor, the checkpoint's training
    state or None, the trainable parameter count): from the checkpoint to resume, else the start."""
    if ctx.resume_dir:
        model, processor, state = load_checkpoint(ctx.resume_dir)
    else:
        (model, processor), state = _initial_model(cfg, config["init_dir"]), None
    _fit_context_length(model, processor, cfg)
    _set_train_mode(model, cfg)
    trainable = _fine_tuning_parts(model, cfg, state)
    if cfg.grad_checkpointing:
        enable_activation_checkpointing(model)
    # transformers types PreTrainedModel.to as the unbound nn.Module.to (functools.wraps)
    raw_model = model.to(ctx.device)  # pyright: ignore[reportArgumentType]
    apply_speedups(
        raw_model,
        fused_qkv=cfg.fused_qkv,
        sdpa_backend=cfg.sdpa_backend or None,
        padding_free=cfg.padding_free,
        channels_last=cfg.channels_last,
        compile_scope=cfg.compile,
        compile_options={"mode": cfg.compile_mode} if cfg.compile_mode else None,
    )
    return ctx.wrap_model(raw_model), raw_model, processor, state, trainable


def _epoch_plan(cfg: TrainConfig, prepared_dir: str, ctx: WorkerContext) -> tuple[EpochPlan, int]:
    """This worker's share of each epoch, and the run's number of steps."""
    plan = EpochPlan(
        PreparedSplit.open(prepared_dir, "train"),
        cfg.batch_size,
        ctx.rank,
        ctx.world_size,
        cfg.seed,
        cfg.shuffle_window,
    )
    if plan.steps_per_epoch == 0:
        raise ZhclipError(
            f"{plan.pairs} training pairs give no full batch of {cfg.batch_size} per worker "
            f"across {ctx.world_size} workers; lower train.batch_size or num_workers"
        )
    return plan, cfg.max_steps or cfg.epochs * plan.steps_per_epoch


def _training_step(cfg: TrainConfig, model, raw_model, total_steps: int, ctx: WorkerContext) -> TrainStep:
    optimizer = build_optimizer(raw_model, cfg.lr, cfg.weight_decay, fused=cfg.fused_adamw)
    teacher = (
        load_teacher(cfg.teacher, cfg.tracking_uri, raw_model, cfg.context_length, ctx.device) if cfg.teacher else None
    )
    schedule = warmup_cosine(optimizer, cfg.warmup_steps, total_steps)
    return TrainStep(model, optimizer, schedule, cfg.step_config(), raw_model, teacher)


def _progress(step: TrainStep, state: dict | None, cfg: TrainConfig, ctx: WorkerContext) -> dict[str, Any]:
    """What the run has done: nothing yet, or what the checkpoint's training state says."""
    progress: dict[str, Any] = {
        "step": 0,
        "history": [],
        "validation": [],
        "resumed_at": [],
        "captions": 0,
        "truncated_captions": 0,
    }
    if state:
        progress = {"captions": 0, "truncated_captions": 0} | restore_state(step, state)
        progress["resumed_at"].append(progress["step"])
        if ctx.rank:  # only rank 0's RNG state is saved; other ranks draw from fresh, distinct streams
            seed_everything(cfg.seed + ctx.rank + 7919 * progress["step"])
    return progress


@dataclass
class _Checkpointer:
    """Reports a checkpoint to Ray Train from every rank; rank 0's carries the model, the training
    state and the history. Counts each worker's captions (and cut ones) between checkpoints."""

    ctx: WorkerContext
    raw_model: Any
    processor: Any
    step: TrainStep
    progress: dict[str, Any]
    logger: StepLogger
    trainable: Any
    counted: np.ndarray = field(default_factory=lambda: np.zeros(2, dtype=np.int64))

    def count(self, batch: dict) -> None:
        self.counted += (len(batch["text_truncated"]), int(batch["text_truncated"].sum()))  # numpy, or torch

    def __call__(self, metrics: dict[str, Any]) -> None:
        self.logger.flush()
        # every worker's counts since the last checkpoint, added to the totals all ranks hold; after
        # a restart the steps since the checkpoint run again and are counted again
        captions, cut = _summed_over_workers(self.counted, self.ctx.device)
        self.progress["captions"] += captions
        self.progress["truncated_captions"] += cut
        self.counted[:] = 0
        self.progress["trainable_params"] = self.trainable
        self.progress["peak_memory_mb"] = max(self.progress.get("peak_memory_mb", 0.0), peak_memory_mb(self.ctx.device))
        with tempfile.TemporaryDirectory() as tmp:
            folder = None
            if self.ctx.rank == 0:
                folder = str(save_checkpoint(tmp, self.raw_model, self.processor, self.step, self.progress))
                (Path(tmp) / HISTORY_FILE).write_text(json.dumps(self.progress["history"]), encoding="utf-8")
            if self.ctx.report:
                self.ctx.report(metrics, folder)


def train_worker_loop(config: dict[str, Any], context: WorkerContext | None = None) -> list[dict]:
    """One worker's training; returns the per-step history (the whole run's, after a resume).

    `config` holds TrainConfig fields plus `prepared_dir`, `init_dir` and `mlflow` (run ids or None).
    Every `checkpoint_every` steps and at the end all ranks call `context.report`; rank 0 passes a
    checkpoint folder (model + training state + history).
    """
    ctx = context or WorkerContext()
    cfg = TrainConfig(**{f.name: config[f.name] for f in fields(TrainConfig)})
    seed_everything(cfg.seed + ctx.rank)
    if ctx.device.type == "cpu":
        torch.set_num_threads(cfg.cpus_per_worker)
    model, raw_model, processor, state, trainable = _model_to_train(cfg, config, ctx)
    plan, total_steps = _epoch_plan(cfg, config["prepared_dir"], ctx)
    per_epoch = plan.steps_per_epoch
    decoder = BatchDecoder(
        processor,
        cfg.context_length,
        cfg.augment,
        cfg.seed,
        eight_bit=cfg.normalize_on_device,
        on_device=cfg.decode_on_device,
    )
    step = _training_step(cfg, model, raw_model, total_steps, ctx)
    progress = _progress(step, state, cfg, ctx)
    valid = config["prepared_dir"] if ctx.rank == 0 and _has_valid_split(config["prepared_dir"]) else None
    if valid is not None and not state:  # the starting point, which the stage must improve on (see training_warnings)
        progress["validation"].append({"step": 0, **validation_metrics(raw_model, processor, valid, cfg.batch_size)})
        _set_train_mode(raw_model, cfg)
    logger = StepLogger(config.get("mlflow") if ctx.rank == 0 else None, every=cfg.log_every)
    checkpoint = _Checkpointer(ctx, raw_model, processor, step, progress, logger, trainable)
    bar = (
        ctx.progress_bar(total=total_steps, desc=f"stage {cfg.stage}", unit="step")
        if ctx.progress_bar and ctx.rank == 0
        else None
    )
    if bar:
        bar.update(progress["step"])

    samples_per_step = cfg.batch_size * ctx.world_size
    waited_from = time.perf_counter()
    batches = training_batches(plan, decoder, progress["step"], total_steps, cfg.loader_workers, ctx.on_ray)
    for batch, inputs in on_device(batches, decoder, ctx.device):
        epoch = progress["step"] // per_epoch
        data_wait = time.perf_counter() - waited_from
        result = step(inputs)
        elapsed = time.perf_counter() - waited_from
        progress["step"] += 1
        record = {
            "step": progress["step"],
            "epoch": epoch + 1,
            **result,
            "samples_per_s": samples_per_step / elapsed,
            "data_wait_s": data_wait,
            "step_s": elapsed,
        }
        logger.log(progress["step"], {k: v for k, v in record.items() if k not in ("step", "epoch")})
        progress["history"].append({**record, "pairs": pair_digest(batch["text_id"], batch["image_id"])})
        checkpoint.count(batch)
        if bar:
            bar.update(1)
            bar.set_description(f"stage {cfg.stage} loss {result['loss']:.4f}")
        end_of_epoch = progress["step"] % per_epoch == 0
        if end_of_epoch and ctx.rank == 0 and not bar:
            _log_epoch(cfg.stage, progress["history"], total_steps, per_epoch)
        due = cfg.validate_every and progress["step"] % cfg.validate_every == 0
        if valid is not None and (due or (end_of_epoch and not cfg.validate_every) or progress["step"] == total_steps):
            scores = {"step": progress["step"], **validation_metrics(raw_model, processor, valid, cfg.batch_size)}
            progress["validation"].append(scores)
            logger.log(progress["step"], {k: v for k, v in scores.items() if k != "step"})
            _set_train_mode(raw_model, cfg)
        if progress["step"] == total_steps or (cfg.checkpoint_every and progress["step"] % cfg.checkpoint_every == 0):
            checkpoint({"step": progress["step"], "loss": result["loss"], "epoch": epoch + 1})
        waited_from = time.perf_counter()
    if bar:
        bar.close()
    return progress["history"]


def _log_epoch(stage: int, history: list[dict], total_steps: int, per_epoch: int) -> None:
    """One line per epoch where no progress bar can redraw (logs, CI, `dvc repro` output)."""
    epoch = history[-per_epoch:]
    seconds_per_step = sum(h["step_s"] for h in epoch) / len(epoch)
    print(
        f"stage {stage} step {history[-1]['step']}/{total_steps}: loss {np.mean([h['loss'] for h in epoch]):.4f}, "
        f"{np.mean([h['samples_per_s'] for h in epoch]):.0f} samples/s, "
        f"ETA {seconds_per_step * (total_steps - history[-1]['step']):.0f} s",
        flush=True,
    )


def _has_valid_split(prepared_dir: str) -> bool:
    try:
        PreparedSplit.open(prepared_dir, "valid")
    except ZhclipError:
        return False  # no valid split: no validation metrics
    return True
