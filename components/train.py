"""Train: the two-stage Chinese-CLIP recipe as Ray Train `TorchTrainer` jobs.

`train_worker_loop` is one worker's plain PyTorch loop over components/training.py's step (it runs
without Ray too). Ray Train adds the worker group (in-process, or the cluster at $RAY_ADDRESS),
process groups for DDP, checkpoint storage (a folder or S3/MinIO) and recovery: a failed worker
group is restarted from the latest checkpoint (`max_failures`), and re-running an interrupted stage
with the same settings and data resumes it, because the Ray run is named after both.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from components.cluster import ray_runtime
from components.common import ZhclipError, build_config, section, write_summary
from components.storage import arrow_filesystem, is_file, local_folder, location
from components.lineage import dvc_hash, git_commit
from components.tracking import (
    RUN_FILE,
    StepLogger,
    finish_stage_run,
    parent_run_from,
    resolve_tracking_uri,
    start_stage_run,
)
from components.shards import PreparedSplit
from components.train_data import BatchDecoder, EpochPlan, on_device, pair_digest, training_batches
from components.training import (
    TRAINING_STATE_FILE,
    StepConfig,
    TrainStep,
    build_optimizer,
    enable_activation_checkpointing,
    load_checkpoint,
    restore_state,
    save_checkpoint,
    seed_everything,
    warmup_cosine,
)
from model import PRESETS, build_model, load_model, lock_image_tower
from model.fast import COMPILE_SCOPES, SDPA_BACKENDS, apply_speedups

HISTORY_FILE = "training_history.json"
COMPILE_MODES = ("", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
HISTORY_FIELDS = ["step", "epoch", "loss", "lr", "logit_scale", "samples_per_s", "data_wait_s", "step_s"]
# Settings that change neither the result nor the order of the work: a re-run that differs only in
# these still resumes the interrupted run.
_NOT_IN_RUN_IDENTITY = {"storage_path", "storage_endpoint", "max_failures", "keep_checkpoints",
                        "cpus_per_worker", "use_gpu", "loader_workers", "normalize_on_device", "tracking_uri",
                        "experiment", "log_every", "checkpoint_every", "validate_every"}


def torchvision_installed() -> bool:
    """Whether torchvision (train.decode_on_device's JPEG decoder) can be imported here."""
    return importlib.util.find_spec("torchvision") is not None


@dataclass
class TrainConfig:
    stage: int = 1
    preset: str = "tiny"
    context_length: int = 52
    epochs: int = 10
    max_steps: int = 0  # stop after this many optimizer steps (0: epochs x steps per epoch)
    batch_size: int = 64  # pairs per optimizer step and worker
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 10
    seed: int = 0
    accum_steps: int = 1  # split each batch into this many micro-batches (same loss, less memory)
    precision: str = "fp32"  # fp32 | bf16 (autocast; fp32 master weights)
    mask_ratio: float = 0.0  # FLIP: share of image patches dropped while training (ViT only)
    augment: bool = False  # random resized crops (90-100% of the image), as Chinese-CLIP
    grad_checkpointing: bool = False  # recompute activations in backward (less memory, ~30% slower)
    fused_adamw: bool = False  # single-kernel AdamW update (GPU)
    fused_qkv: bool = False  # one matmul for query/key/value in every attention (saved in the standard layout)
    sdpa_backend: str = ""  # preferred attention kernel (needs fused_qkv): flash, cudnn, efficient, math; "" = PyTorch's choice
    padding_free: bool = False  # text tower computes real tokens only, no padding (needs fused_qkv)
    channels_last: bool = False  # channels-last patch embedding (GPU)
    compile: str = "none"  # torch.compile: none, regional (each encoder layer) or model
    compile_mode: str = ""  # torch.compile mode: "" (its default), reduce-overhead (CUDA graphs), max-autotune, max-autotune-no-cudagraphs
    num_workers: int = 1  # Ray Train workers (one process each; DDP when more than one)
    cpus_per_worker: int = 2
    use_gpu: bool = False  # one GPU per worker
    loader_workers: int = 0  # decoders per worker: Ray Data actors under Ray, else processes (0: the training process)
    shuffle_window: int = 4096  # rows shuffled together (from several shards); memory holds about one window per worker
    normalize_on_device: bool = False  # loaders hand over 8-bit resized images; the device scales and normalises them
    decode_on_device: bool = False  # loaders hand over JPEG bytes; the device decodes (nvJPEG), crops, resizes them (needs torchvision)
    storage_path: str = "ray_results"  # checkpoints: a folder, or s3://bucket/prefix (MinIO)
    storage_endpoint: str = ""  # S3 endpoint for s3:// storage; empty: $AWS_ENDPOINT_URL
    checkpoint_every: int = 0  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2
    max_failures: int = 0  # worker-group restarts from the latest checkpoint before giving up
    validate_every: int = 0  # steps between validation passes on the valid split (0: each epoch's end)
    log_every: int = 10  # steps per batch of MLflow metric writes and progress-bar updates
    unlocked_groups: int = 0  # stage 1: leave this many last image-tower groups trainable
    local_loss: bool = False  # multi-worker: score local rows against the global batch (less memory)
    gather_with_grad: bool = False  # multi-worker: let gradients flow through other workers' features
    tracking_uri: str = ""  # MLflow; empty: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = "zhclip"

    def __post_init__(self):
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage}")
        for name in ("epochs", "batch_size", "num_workers", "cpus_per_worker", "context_length", "accum_steps",
                     "keep_checkpoints", "log_every", "shuffle_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "checkpoint_every", "validate_every", "loader_workers", "warmup_steps", "max_failures"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.batch_size % self.accum_steps:
            raise ValueError(f"batch_size {self.batch_size} must split into accum_steps={self.accum_steps} equal micro-batches")
        self.step_config()  # validates precision
        if self.compile not in COMPILE_SCOPES:
            raise ValueError(f"compile must be one of {COMPILE_SCOPES}, got {self.compile!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")
        if self.compile_mode and self.compile == "none":
            raise ValueError(f"compile_mode {self.compile_mode!r} needs compile: regional or model")
        if self.sdpa_backend and (self.sdpa_backend not in SDPA_BACKENDS or not self.fused_qkv):
            raise ValueError(f"sdpa_backend {self.sdpa_backend!r} needs fused_qkv: true and one of {sorted(SDPA_BACKENDS)}")
        if self.padding_free and not self.fused_qkv:
            raise ValueError("padding_free needs fused_qkv: true (the packed attention is the fused one)")
        if not 0 <= self.mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.decode_on_device and not torchvision_installed():
            raise ValueError("decode_on_device needs torchvision, the build matching your torch (for CUDA 13: "
                             "pip install torchvision --index-url https://download.pytorch.org/whl/cu130), "
                             "or pip install 'zhclip[gpu-decode]'; or set train.decode_on_device: false")
        if self.mask_ratio and "resnet_layers" in PRESETS.get(self.preset, {}).get("vision", {}):
            raise ValueError(f"mask_ratio {self.mask_ratio}: patch masking needs a ViT preset, not {self.preset}")

    def step_config(self) -> StepConfig:
        return StepConfig(precision=self.precision, accum_steps=self.accum_steps, mask_ratio=self.mask_ratio,
                          local_loss=self.local_loss, gather_with_grad=self.gather_with_grad)

    @classmethod
    def from_params(cls, params: dict[str, Any], stage: int, **overrides: Any) -> "TrainConfig":
        """Merge params sections `model`, `mlflow`, `train` and `stage<N>` (later wins), then CLI overrides."""
        names = {f.name for f in fields(cls)} - {"stage"}
        values = {
            **section(params, "model", {"preset", "context_length"}),
            **section(params, "mlflow", {"tracking_uri", "experiment"}),
            **section(params, "train", names),
            **section(params, f"stage{stage}", names),
        }
        values.update({key: value for key, value in overrides.items() if value is not None})
        return build_config(cls, {"stage": stage, **values}, f"training config for stage {stage}")


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


def validation_metrics(model, processor, prepared_dir: str, batch_size: int) -> dict[str, float]:
    """In-batch accuracy (image->text and text->image, batches of `batch_size` pairs) and retrieval
    mean recall on the valid split, the latter exactly as `zhclip evaluate` scores a split."""
    from components.evaluate import embed_split, retrieval_metrics

    model.eval()
    with torch.no_grad():
        split = embed_split(model, processor, prepared_dir, "valid", batch_size)
    data = split.data
    pair_texts, pair_images = data.text_emb[split.pair_texts], data.image_emb[split.pair_images]
    hits = []
    for start in range(0, len(pair_texts), batch_size):
        scores = pair_texts[start:start + batch_size] @ pair_images[start:start + batch_size].T
        diagonal = np.arange(len(scores))
        hits += [(scores.argmax(1) == diagonal).mean(), (scores.argmax(0) == diagonal).mean()]
    recall = retrieval_metrics(data.text_emb, data.image_emb, data.text_to_images)
    return {"valid_inbatch_accuracy": round(100 * float(np.mean(hits)), 4), "valid_mean_recall": recall["mean_recall"]}


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
    if ctx.resume_dir:
        model, processor, state = load_checkpoint(ctx.resume_dir)
    else:
        (model, processor), state = _initial_model(cfg, config["init_dir"]), None
    _set_train_mode(model, cfg)
    if cfg.grad_checkpointing:
        enable_activation_checkpointing(model)
    raw_model = model.to(ctx.device)
    apply_speedups(raw_model, fused_qkv=cfg.fused_qkv, sdpa_backend=cfg.sdpa_backend or None,
                   padding_free=cfg.padding_free, channels_last=cfg.channels_last, compile_scope=cfg.compile,
                   compile_options={"mode": cfg.compile_mode} if cfg.compile_mode else None)
    model = ctx.wrap_model(raw_model)

    plan = EpochPlan(PreparedSplit.open(config["prepared_dir"], "train"), cfg.batch_size, ctx.rank, ctx.world_size,
                     cfg.seed, cfg.shuffle_window)
    per_epoch = plan.steps_per_epoch
    if per_epoch == 0:
        raise ZhclipError(f"{plan.pairs} training pairs give no full batch of {cfg.batch_size} per worker "
                          f"across {ctx.world_size} workers; lower train.batch_size or num_workers")
    total_steps = cfg.max_steps or cfg.epochs * per_epoch
    decoder = BatchDecoder(processor, cfg.context_length, cfg.augment, cfg.seed, eight_bit=cfg.normalize_on_device,
                           on_device=cfg.decode_on_device)
    optimizer = build_optimizer(raw_model, cfg.lr, cfg.weight_decay, fused=cfg.fused_adamw)
    step = TrainStep(model, optimizer, warmup_cosine(optimizer, cfg.warmup_steps, total_steps), cfg.step_config(), raw_model)

    progress = {"step": 0, "history": [], "validation": [], "resumed_at": []}
    if state:
        progress = restore_state(step, state)
        progress["resumed_at"].append(progress["step"])
        if ctx.rank:  # only rank 0's RNG state is saved; other ranks draw from fresh, distinct streams
            seed_everything(cfg.seed + ctx.rank + 7919 * progress["step"])
    valid = config["prepared_dir"] if ctx.rank == 0 and _has_valid_split(config["prepared_dir"]) else None
    if valid is not None and not state:  # the starting point, which the stage must improve on (see training_warnings)
        progress["validation"].append({"step": 0, **validation_metrics(raw_model, processor, valid, cfg.batch_size)})
        _set_train_mode(raw_model, cfg)
    logger = StepLogger(config.get("mlflow") if ctx.rank == 0 else None, every=cfg.log_every)
    bar = ctx.progress_bar(total=total_steps, desc=f"stage {cfg.stage}", unit="step") if ctx.progress_bar and ctx.rank == 0 else None
    if bar:
        bar.update(progress["step"])

    def checkpoint(metrics: dict[str, Any]) -> None:
        logger.flush()
        with tempfile.TemporaryDirectory() as tmp:
            folder = None
            if ctx.rank == 0:
                folder = str(save_checkpoint(tmp, raw_model, processor, step, progress))
                (Path(tmp) / HISTORY_FILE).write_text(json.dumps(progress["history"]), encoding="utf-8")
            if ctx.report:
                ctx.report(metrics, folder)

    samples_per_step = cfg.batch_size * ctx.world_size
    waited_from = time.perf_counter()
    batches = training_batches(plan, decoder, progress["step"], total_steps, cfg.loader_workers, ctx.on_ray)
    for batch, inputs in on_device(batches, decoder, ctx.device):
        epoch = progress["step"] // per_epoch
        data_wait = time.perf_counter() - waited_from
        result = step(inputs)
        elapsed = time.perf_counter() - waited_from
        progress["step"] += 1
        record = {"step": progress["step"], "epoch": epoch + 1, **result,
                  "samples_per_s": samples_per_step / elapsed, "data_wait_s": data_wait, "step_s": elapsed}
        logger.log(progress["step"], {k: v for k, v in record.items() if k not in ("step", "epoch")})
        progress["history"].append({**record, "pairs": pair_digest(batch["text_id"], batch["image_id"])})
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
    print(f"stage {stage} step {history[-1]['step']}/{total_steps}: loss {np.mean([h['loss'] for h in epoch]):.4f}, "
          f"{np.mean([h['samples_per_s'] for h in epoch]):.0f} samples/s, "
          f"ETA {seconds_per_step * (total_steps - history[-1]['step']):.0f} s", flush=True)


def _has_valid_split(prepared_dir: str) -> bool:
    try:
        PreparedSplit.open(prepared_dir, "valid")
    except ZhclipError:
        return False  # no valid split: no validation metrics
    return True


def _ray_worker(config: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker: the plain loop with Ray's DDP, storage and progress bar."""
    import ray.train
    import ray.train.torch
    from ray.experimental.tqdm_ray import tqdm

    train_context = ray.train.get_context()
    resume = ray.train.get_checkpoint()

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    with resume.as_directory() if resume else nullcontext() as resume_dir:
        train_worker_loop(config, WorkerContext(
            rank=train_context.get_world_rank(), world_size=train_context.get_world_size(),
            device=ray.train.torch.get_device(), wrap_model=ray.train.torch.prepare_model,
            resume_dir=resume_dir, report=report, progress_bar=tqdm if config["interactive"] else None, on_ray=True))


def _storage(config: TrainConfig) -> tuple[str, Any]:
    """Ray's (storage_path, storage_filesystem): a local folder, or an S3 bucket (MinIO)."""
    if not config.storage_path.startswith("s3://"):
        return location(config.storage_path), None
    filesystem, path = arrow_filesystem(config.storage_path, config.storage_endpoint or None)
    return path, filesystem


def run_name(config: TrainConfig, data_hash: str, init_hash: str) -> str:
    """Names the Ray run after what determines its result, so a re-run resumes only the same work."""
    identity = {k: v for k, v in asdict(config).items() if k not in _NOT_IN_RUN_IDENTITY}
    digest = hashlib.sha256(json.dumps([identity, data_hash, init_hash], sort_keys=True).encode()).hexdigest()[:12]
    return f"zhclip-stage{config.stage}-{digest}"


def _run_with_ray(config: TrainConfig, loop_config: dict[str, Any], name: str):
    import ray
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Room for the training workers and their Ray Data decoders, even where that oversubscribes the cores.
    wanted = config.num_workers * (config.cpus_per_worker + config.loader_workers)
    storage_path, filesystem = _storage(config)
    with ray_runtime(max(os.cpu_count() or 1, wanted)):
        trainer = TorchTrainer(
            _ray_worker,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(
                num_workers=config.num_workers, use_gpu=config.use_gpu,
                resources_per_worker={"CPU": config.cpus_per_worker, **({"GPU": 1} if config.use_gpu else {})},
            ),
            run_config=RunConfig(
                name=name, storage_path=storage_path, storage_filesystem=filesystem,
                failure_config=FailureConfig(max_failures=config.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
            ),
        )
        try:
            return trainer.fit()
        except ray.train.TrainingFailedError as err:
            raise ZhclipError(f"training stage {config.stage} failed: {err}; the worker's log is above. "
                              f"Re-running the same command resumes from the last checkpoint in {config.storage_path}/{name}") from err


def _check_inputs(prepared_dir: str, config: TrainConfig, init_dir: str | None) -> None:
    PreparedSplit.open(prepared_dir, "train")  # fail here, with a clear message, before starting Ray
    if config.stage == 2 and not init_dir:
        raise ZhclipError("stage 2 starts from stage 1's model: pass --init <stage 1 output folder>")
    if init_dir and not is_file(f"{init_dir}/config.json"):
        raise ZhclipError(f"--init {init_dir} is not a model folder (no config.json); train stage 1 first")


def train(
    prepared_dir: str | Path,
    out_dir: str | Path,
    config: TrainConfig,
    init_dir: str | Path | None = None,
    summary_path: str | Path | None = None,
    history_csv: str | Path | None = None,
) -> dict:
    """Train one stage with Ray Train and write its Hugging Face model folder to `out_dir`.

    `prepared_dir` and `init_dir` are folders, or s3:// URIs that every worker of a Ray cluster can read.

    Stage 2 requires `init_dir` (stage 1's output). Tracks the stage as an MLflow run nested under
    the pipeline's parent run. Returns the summary (steps, losses, speed, validation, checkpoint).
    """
    out_dir, prepared_dir = Path(out_dir), location(prepared_dir)
    init_dir = location(init_dir) if init_dir else None
    _check_inputs(prepared_dir, config, init_dir)
    data_hash = dvc_hash(prepared_dir)
    init_hash = dvc_hash(init_dir) if init_dir else ""
    name = run_name(config, data_hash, init_hash)
    tags = {"git_commit": git_commit(), "data_dvc_hash": data_hash, "data_path": prepared_dir,
            **({"init_model_hash": init_hash} if init_hash else {})}
    ids = start_stage_run(resolve_tracking_uri(config.tracking_uri), config.experiment, config.stage, name,
                          asdict(config), tags, parent_run_from(init_dir))
    loop_config = {**asdict(config), "prepared_dir": prepared_dir, "mlflow": ids, "interactive": sys.stderr.isatty(),
                   "init_dir": init_dir}
    start = time.perf_counter()
    try:
        result = _run_with_ray(config, loop_config, name)
    except BaseException:
        finish_stage_run(ids, {}, status="FAILED")
        raise
    summary = _export(result.checkpoint, out_dir, config, ids, name)
    summary["duration_s"] = round(time.perf_counter() - start, 3)
    finish_stage_run(ids, summary)
    if history_csv:
        _write_history_csv(json.loads((out_dir / HISTORY_FILE).read_text(encoding="utf-8")), history_csv)
    if summary_path:
        write_summary(summary_path, summary)
    _print_summary(summary)
    return summary


def _export(checkpoint, out_dir: Path, config: TrainConfig, ids: dict[str, str], name: str) -> dict:
    """The final checkpoint as a clean model folder (no optimizer state), and the run's summary."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    checkpoint.to_directory(str(out_dir))
    state = torch.load(out_dir / TRAINING_STATE_FILE, map_location="cpu", weights_only=False)
    (out_dir / TRAINING_STATE_FILE).unlink()
    (out_dir / RUN_FILE).write_text(json.dumps(ids), encoding="utf-8")
    progress, history = state["progress"], state["progress"]["history"]
    validation = progress["validation"]
    timed = history[len(history) // 10:] or history  # leave out the first steps' warm-up
    start_recall, final_recall = start_and_final(validation)
    return {
        "stage": config.stage, "model_dir": str(out_dir), "steps": len(history), "epochs": history[-1]["epoch"],
        "first_loss": history[0]["loss"], "final_loss": history[-1]["loss"],
        "samples_per_s": round(float(np.median([h["samples_per_s"] for h in timed])), 2),
        "data_wait_share": round(sum(h["data_wait_s"] for h in timed) / sum(h["step_s"] for h in timed), 4),
        "start_valid_mean_recall": start_recall,
        "best_valid_mean_recall": max((v["valid_mean_recall"] for v in validation if v["step"]), default=None),
        "final_valid_mean_recall": final_recall,
        "final_valid_inbatch_accuracy": validation[-1]["valid_inbatch_accuracy"] if validation else None,
        "resumed_at_steps": progress["resumed_at"],
        "checkpoint": ("s3://" if config.storage_path.startswith("s3://") else "") + checkpoint.path, "ray_run": name, "mlflow": ids,
        "config": asdict(config),
    } | {"warnings": training_warnings(history, validation, config.stage)}


# What usually stops a stage from learning, and how to look for better settings (README: "When a stage does not learn").
TUNING_ADVICE = ("usual causes: a learning rate too high for pretrained weights (the reference fine-tunes at 1e-5 to 5e-5) "
                 "or too low to move, too few warm-up steps, or a batch too small for enough in-batch negatives. "
                 "Sweep them: dvc exp run --queue -S 'stage{stage}.lr=1e-5,5e-5,1e-4' -S 'train.warmup_steps=20,100' "
                 "&& dvc queue start, then dvc exp show")
LOSS_FALL = 0.98  # the last tenth of the steps must average below this share of the first tenth's loss


def start_and_final(validation: list[dict]) -> tuple[float | None, float | None]:
    """Valid mean recall of the start (the pass at step 0) and of the last pass after training (None: no such pass)."""
    start = next((v["valid_mean_recall"] for v in validation if v["step"] == 0), None)
    final = validation[-1]["valid_mean_recall"] if validation and validation[-1]["step"] else None
    return start, final


def training_warnings(history: list[dict], validation: list[dict], stage: int) -> list[str]:
    """Plain-words warnings for the failure users report most: a loss that does not fall, or a model
    that ends below where it started (valid mean recall of the start, step 0, against the last pass)."""
    found = []
    tenth = max(1, len(history) // 10)
    first, last = np.mean([h["loss"] for h in history[:tenth]]), np.mean([h["loss"] for h in history[-tenth:]])
    if last >= LOSS_FALL * first:
        found.append(f"stage {stage}: the loss has not fallen ({first:.4f} over the first {tenth} steps, {last:.4f} over the last)")
    start, final = start_and_final(validation)
    if start is not None and final is not None and final < start:
        found.append(f"stage {stage}: ended below its start (valid mean recall {start:.2f} at step 0, {final:.2f} at the end)")
    return [f"{warning}; {TUNING_ADVICE.format(stage=stage)}" for warning in found]


def _print_summary(summary: dict) -> None:
    best = summary["best_valid_mean_recall"]
    print(f"stage {summary['stage']}: {summary['steps']} steps in {summary['duration_s']:.0f} s, "
          f"{summary['samples_per_s']:.0f} samples/s, loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}"
          + (f", best valid mean recall {best:.2f}" if best is not None else "")
          + (f", resumed at step {summary['resumed_at_steps']}" if summary["resumed_at_steps"] else "")
          + f"\n  model: {summary['model_dir']}\n  checkpoint: {summary['checkpoint']}"
          + "".join(f"\n  WARNING {warning}" for warning in summary["warnings"]), file=sys.stderr)


def _write_history_csv(history: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
