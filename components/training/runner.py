"""Train: the two-stage Chinese-CLIP recipe as Ray Train `TorchTrainer` jobs.

`train_worker_loop` (components/training/loop.py) is one worker's plain PyTorch loop over the training
step (it runs without Ray too). Ray Train adds the worker group (in-process, or the cluster at $RAY_ADDRESS),
process groups for DDP, checkpoint storage (a folder or S3/MinIO) and recovery: a failed worker
group is restarted from the latest checkpoint (`max_failures`), and re-running an interrupted stage
with the same settings and data resumes it, because the Ray run is named after both. A run that
finished is marked so: running the stage again (`dvc repro -f`, or after a code change) trains again,
in the next run folder.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zhclip.components.core.cluster import ray_runtime
from zhclip.components.core.errors import ZhclipError
from zhclip.components.core.lineage import HISTORY_FILE, RUN_FILE, TRAINING_STATE_FILE, dvc_hash, git_commit
from zhclip.components.core.storage import arrow_filesystem, is_file, location
from zhclip.components.core.summaries import write_summary
from zhclip.components.core.tracking import (
    finish_stage_run,
    parent_run_from,
    resolve_tracking_uri,
    start_stage_run,
)
from zhclip.components.data.shards import PreparedSplit
from zhclip.components.training.config import TrainConfig

HISTORY_FIELDS = ["step", "epoch", "loss", "lr", "logit_scale", "samples_per_s", "data_wait_s", "step_s"]
# Settings that change neither the result nor the order of the work: a re-run that differs only in
# these still resumes the interrupted run.
_NOT_IN_RUN_IDENTITY = {
    "storage_path",
    "storage_endpoint",
    "max_failures",
    "keep_checkpoints",
    "cpus_per_worker",
    "use_gpu",
    "loader_workers",
    "normalize_on_device",
    "tracking_uri",
    "experiment",
    "log_every",
    "checkpoint_every",
    "validate_every",
}


def _ray_worker(config: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker: the plain loop with Ray's DDP, storage and progress bar."""
    import ray.train
    import ray.train.torch
    from ray.experimental.tqdm_ray import tqdm

    # Here, not at the top: the loop imports transformers and the model library (about 4 s), which
    # the workers need and the driver, which only launches them and reads their summary, does not.
    from zhclip.components.training.loop import WorkerContext, train_worker_loop

    train_context = ray.train.get_context()
    resume = ray.train.get_checkpoint()

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    with resume.as_directory() if resume else nullcontext() as resume_dir:
        train_worker_loop(
            config,
            WorkerContext(
                rank=train_context.get_world_rank(),
                world_size=train_context.get_world_size(),
                device=ray.train.torch.get_device(),
                wrap_model=ray.train.torch.prepare_model,
                resume_dir=resume_dir,
                report=report,
                progress_bar=tqdm if config["interactive"] else None,
                on_ray=True,
            ),
        )


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


# Written into a Ray run's folder once its model is exported: that run is not resumed again.
FINISHED_FILE = "zhclip_finished.json"


def _run_folders(config: TrainConfig):
    """(the pyarrow filesystem of the Ray storage, the storage path on it)."""
    from pyarrow import fs

    storage_path, filesystem = _storage(config)
    return filesystem or fs.LocalFileSystem(), storage_path


def unfinished_run(config: TrainConfig, name: str) -> str:
    """The Ray run to use for the run named `name`: itself while it has not finished (a new run, or an
    interrupted one to resume), else the first of `name-2`, `name-3`, ... that has not: a stage run
    again with the same settings and data trains again, keeping the earlier runs' checkpoints."""
    from pyarrow import fs

    filesystem, storage_path = _run_folders(config)
    attempt, candidate = 1, name
    while filesystem.get_file_info(f"{storage_path}/{candidate}/{FINISHED_FILE}").type == fs.FileType.File:
        attempt += 1
        candidate = f"{name}-{attempt}"
    return candidate


def _mark_finished(config: TrainConfig, name: str, out_dir: Path) -> None:
    filesystem, storage_path = _run_folders(config)
    with filesystem.open_output_stream(f"{storage_path}/{name}/{FINISHED_FILE}") as marker:
        marker.write(json.dumps({"model_dir": str(out_dir), "finished_at": time.time()}).encode())


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
                num_workers=config.num_workers,
                use_gpu=config.use_gpu,
                resources_per_worker={"CPU": config.cpus_per_worker, **({"GPU": 1} if config.use_gpu else {})},
            ),
            run_config=RunConfig(
                name=name,
                storage_path=storage_path,
                storage_filesystem=filesystem,
                failure_config=FailureConfig(max_failures=config.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
            ),
        )
        try:
            return trainer.fit()
        except ray.train.TrainingFailedError as err:
            raise ZhclipError(
                f"training stage {config.stage} failed: {err}; the worker's log is above. "
                f"Re-running the same command resumes from the last checkpoint in {config.storage_path}/{name}"
            ) from err


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
    name = unfinished_run(config, run_name(config, data_hash, init_hash))
    tags = {
        "git_commit": git_commit(),
        "data_dvc_hash": data_hash,
        "data_path": prepared_dir,
        **({"init_model_hash": init_hash} if init_hash else {}),
    }
    ids = start_stage_run(
        resolve_tracking_uri(config.tracking_uri),
        config.experiment,
        config.stage,
        name,
        asdict(config),
        tags,
        parent_run_from(init_dir),
    )
    loop_config = {
        **asdict(config),
        "prepared_dir": prepared_dir,
        "mlflow": ids,
        "interactive": sys.stderr.isatty(),
        "init_dir": init_dir,
    }
    start = time.perf_counter()
    try:
        result = _run_with_ray(config, loop_config, name)
    except BaseException:
        finish_stage_run(ids, {}, status="FAILED")
        raise
    summary = _export(result.checkpoint, out_dir, config, ids, name)
    _mark_finished(config, name, out_dir)
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
    timed = history[len(history) // 10 :] or history  # leave out the first steps' warm-up
    start_recall, final_recall = start_and_final(validation)
    return {
        "stage": config.stage,
        "model_dir": str(out_dir),
        "steps": len(history),
        "epochs": history[-1]["epoch"],
        "first_loss": history[0]["loss"],
        "final_loss": history[-1]["loss"],
        "samples_per_s": round(float(np.median([h["samples_per_s"] for h in timed])), 2),
        "data_wait_share": round(sum(h["data_wait_s"] for h in timed) / sum(h["step_s"] for h in timed), 4),
        "start_valid_mean_recall": start_recall,
        "best_valid_mean_recall": max((v["valid_mean_recall"] for v in validation if v["step"]), default=None),
        "final_valid_mean_recall": final_recall,
        "final_valid_inbatch_accuracy": validation[-1]["valid_inbatch_accuracy"] if validation else None,
        "resumed_at_steps": progress["resumed_at"],
        "trainable_params": progress.get("trainable_params"),
        "peak_memory_mb": progress.get("peak_memory_mb"),
        "captions_seen": progress.get("captions", 0),
        "truncated_captions": progress.get("truncated_captions", 0),
        "checkpoint": ("s3://" if config.storage_path.startswith("s3://") else "") + checkpoint.path,
        "ray_run": name,
        "mlflow": ids,
        "config": asdict(config),
    } | {"warnings": training_warnings(history, validation, config.stage) + truncation_warnings(progress, config)}


# What usually stops a stage from learning, and how to look for better settings
# (docs/training.md: "When a stage does not learn").
TUNING_ADVICE = (
    "usual causes: a learning rate too high for pretrained weights (the reference fine-tunes at 1e-5 to 5e-5) "
    "or too low to move, too few warm-up steps, or a batch too small for enough in-batch negatives. "
    "Sweep them: dvc exp run --queue -S 'stage{stage}.lr=1e-5,5e-5,1e-4' -S 'train.warmup_steps=20,100' "
    "&& dvc queue start, then dvc exp show"
)
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
        found.append(
            f"stage {stage}: the loss has not fallen ({first:.4f} over the first {tenth} steps, "
            f"{last:.4f} over the last)"
        )
    start, final = start_and_final(validation)
    if start is not None and final is not None and final < start:
        found.append(
            f"stage {stage}: ended below its start (valid mean recall {start:.2f} at step 0, {final:.2f} at the end)"
        )
    return [f"{warning}; {TUNING_ADVICE.format(stage=stage)}" for warning in found]


def truncation_warnings(progress: dict, config: TrainConfig) -> list[str]:
    """Captions longer than the context are cut, never silently: how many, and what to change."""
    cut, seen = progress.get("truncated_captions", 0), progress.get("captions", 0)
    if not cut:
        return []
    return [
        f"stage {config.stage}: {cut} of {seen} captions seen ({100 * cut / seen:.1f} %) had more than "
        f"context_length {config.context_length} tokens and were cut to it; raise model.context_length "
        "(up to the text tower's position embeddings, 512 for RoBERTa-wwm) or shorten them"
    ]


def _print_summary(summary: dict) -> None:
    best = summary["best_valid_mean_recall"]
    print(
        f"stage {summary['stage']}: {summary['steps']} steps in {summary['duration_s']:.0f} s, "
        f"{summary['samples_per_s']:.0f} samples/s, loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}"
        + (f", best valid mean recall {best:.2f}" if best is not None else "")
        + f"\n  trainable parameters: {summary['trainable_params'] or 0:,}, "
        + f"peak memory {summary['peak_memory_mb'] or 0:.0f} MB (rank 0)"
        + f", captions cut to the context: {summary['truncated_captions']} of {summary['captions_seen']}"
        + (f", resumed at step {summary['resumed_at_steps']}" if summary["resumed_at_steps"] else "")
        + f"\n  model: {summary['model_dir']}\n  checkpoint: {summary['checkpoint']}"
        + "".join(f"\n  WARNING {warning}" for warning in summary["warnings"]),
        file=sys.stderr,
    )


def _write_history_csv(history: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
