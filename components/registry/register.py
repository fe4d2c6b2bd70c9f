"""Register: log the model as an MLflow pyfunc, register a version, and gate the `champion` alias.

The new version always gets alias `challenger`; `champion` moves to it only if its metric is at
least its own starting model's (plus `min_gain_over_start`: fine-tuning must never make a model
worse than what it started from) and at least the current champion's (minus a tolerance). Versions
are never deleted or overwritten, and a model is registered once: the hash of its folder without
the training run's own records (tag `model_weights_hash`) finds an earlier version, also one that an
earlier run trained to the same weights. Lineage travels as version tags: git commit, DVC hashes
of model and data, params, metrics and the training run (when the training summary records one).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pandas as pd

import zhclip.model as model_package
from zhclip.components.core.errors import ZhclipError
from zhclip.components.core.lineage import dvc_hash, git_commit, weights_hash
from zhclip.components.core.settings import setting, shared
from zhclip.components.core.summaries import read_summary, timed, write_summary
from zhclip.components.core.tracking import MlflowConfig, flatten_params, resolve_tracking_uri, using_tracking_uri
from zhclip.components.registry import suite_gate
from zhclip.components.registry.gate_lock import gate_lock
from zhclip.model.pyfunc import DEFAULT_CONFIG, DEFAULT_TEMPLATE

SERVED_MODEL = Path(__file__).with_name("served_model.py")  # logged as MLflow "models from code"
# What a pulled model needs at inference, pinned to the versions it was trained with.
# What a pulled model needs; the ONNX packages for its onnx backend (model_config backend "onnx"),
# which exports the encoders on first load.
INFERENCE_PACKAGES = (
    "torch",
    "transformers",
    "safetensors",
    "numpy",
    "pillow",
    "pandas",
    "onnxruntime",
    "onnx",
    "onnxscript",
)


@dataclass
class RegisterConfig:
    """Section `register`: the registered model and when `champion` moves to a new version."""

    model_name: str = setting("zhclip-demo", "registered model name in the MLflow registry")
    experiment: str = shared(MlflowConfig, "experiment")
    tracking_uri: str = shared(MlflowConfig, "tracking_uri")
    metric: str = setting("mean_recall", "evaluation metric that decides promotion (higher is better)")
    tolerance: float = setting(0.0, "promote when at least the champion's metric minus this")
    min_gain_over_start: float = setting(0.0, "... and at least the starting model's metric plus this")
    suite_margin: float = setting(
        1.0,
        "... and, given the benchmark suite (--suite), no dataset's score more than this many points below the "
        "champion's, or below its start's",
    )
    lock_lease_s: float = setting(
        120.0, "the promotion gate's lock lease: a registration killed while holding it blocks others this long"
    )
    lock_wait_s: float = setting(600.0, "how long a registration waits for another one's gate before failing")


def tracking_uri(config: RegisterConfig) -> str:
    return resolve_tracking_uri(config.tracking_uri)


def _signature(projection_dim: int):
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    # `image` is declared a string column: MLflow's serving layer base64-decodes `binary` columns
    # itself, failing on the empty cells of text rows with an error that names no row. As a string
    # column it reaches the model untouched (raw bytes pass too), which decodes and checks each row.
    inputs = Schema([ColSpec("string", "text", required=False), ColSpec("string", "image", required=False)])
    params = ParamSchema(
        [
            ParamSpec("output", "string", "embedding"),
            ParamSpec("labels", "string", [], shape=(-1,)),
            ParamSpec("template", "string", DEFAULT_TEMPLATE),
        ]
    )
    outputs = Schema([TensorSpec(np.dtype("float32"), (-1, projection_dim))])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def _pinned_requirements() -> list[str]:
    # A local version label (torch's "+cpu") names a build only its own index serves; the public
    # version resolves anywhere, and pip picks the build that suits the puller's machine.
    return [f"{package}=={version(package).split('+')[0]}" for package in INFERENCE_PACKAGES]


def _training_runs(train_summary: str | Path | None) -> dict[str, str]:
    """The training summary's `mlflow` section (tracking_uri, experiment_id, parent_run_id, run_id);
    {} without a summary or in older summaries, which have none."""
    runs = read_summary(train_summary).get("mlflow") if train_summary is not None else None
    return {key: str(value) for key, value in runs.items() if value} if isinstance(runs, dict) else {}


def _lineage(
    model_hash: str,
    weights: str,
    metrics: dict[str, float],
    params: dict[str, Any],
    data_dir: str | Path | None,
    training: dict[str, str],
) -> dict[str, str]:
    tags = {
        "git_commit": git_commit(),
        "model_dvc_hash": model_hash,
        "model_weights_hash": weights,
        "params": json.dumps(params, sort_keys=True, ensure_ascii=False, default=str),
        **{f"metric.{name}": str(value) for name, value in metrics.items()},
        **{f"training_{key}": training[key] for key in ("parent_run_id", "run_id") if key in training},
    }
    if data_dir is not None:
        tags["data_dvc_hash"] = dvc_hash(data_dir)
    return tags


def _version_of_checkpoint(client, name: str, weights: str, model_hash: str):
    """The earliest version registered with these weights (or, registered before the weights hash was
    recorded, from this exact folder), or None."""
    versions = client.search_model_versions(f"name = '{name}' and tags.model_weights_hash = '{weights}'")
    versions = versions or client.search_model_versions(f"name = '{name}' and tags.model_dvc_hash = '{model_hash}'")
    return min(versions, key=lambda v: int(v.version)) if versions else None


def _champion(client, name: str) -> tuple[str | None, dict[str, float]]:
    """The champion's version and the metrics its MLflow run recorded; (None, {}) without one.

    Read from the registered model's aliases rather than by catching a failed alias lookup, so that
    a registry error stops the step instead of passing for "no champion" and promoting.
    """
    version = client.get_registered_model(name).aliases.get("champion")
    if version is None:
        return None, {}
    champion = client.get_model_version(name, version)
    return str(version), dict(client.get_run(champion.run_id).data.metrics) if champion.run_id else {}


def _start_value(metrics_summary: dict[str, Any], metric: str, where: str | Path) -> float | None:
    """The starting model's value of `metric`, from the evaluation's chain (None: no start was evaluated)."""
    chain = metrics_summary.get("chain") or []
    if len(chain) < 2:
        return None
    if metric not in chain[0]:
        raise ZhclipError(f"{where}: the start's evaluation has no {metric!r} to gate on; it has {sorted(chain[0])}")
    return float(chain[0][metric])


def _decide(
    candidate: float,
    start: float | None,
    champion_version: str | None,
    champion_value: float | None,
    config: RegisterConfig,
) -> tuple[bool, str, str]:
    """(promote, the rule that decided, the decision in words). The start comes first: a model worse
    than what it was trained from is never promoted, whatever the champion."""
    metric = config.metric
    if start is not None and candidate < start + config.min_gain_over_start:
        return (
            False,
            "start",
            (
                f"kept current champion: {metric} {candidate} is below its own start {start} "
                f"(min gain {config.min_gain_over_start}); training made it worse"
            ),
        )
    versus_start = f"; start {start}, gain {candidate - start:+.4f}" if start is not None else ""
    if champion_version is None:
        return True, "first", f"promoted: no champion yet ({metric} {candidate}{versus_start})"
    if champion_value is None:
        return (
            False,
            "champion",
            (
                f"kept current champion: version {champion_version} has no {metric} to compare; "
                f"move the alias by hand if this version should replace it"
            ),
        )
    promote = candidate >= champion_value - config.tolerance
    return (
        promote,
        "champion",
        (
            f"{'promoted' if promote else 'kept current champion'}: {metric} {candidate} vs champion "
            f"version {champion_version} {champion_value} (tolerance {config.tolerance}){versus_start}"
        ),
    )


def registration_card(chain: list[dict], decision: str, rule: str, metric: str) -> str:
    """The version's description in the registry (Markdown): the start and every stage, and how the gate decided."""
    lines = ["## Evaluation: the start and every stage", "", f"| model | {metric} | gain over start |", "|---|---|---|"]
    lines += [
        f"| {entry['model']} | {entry.get(metric, '')} | "
        f"{'' if entry is chain[0] or metric not in entry else format(entry[metric] - chain[0][metric], '+.2f')} |"
        for entry in chain
    ]
    return "\n".join([*lines, "", f"**Gate** (rule: {rule}): {decision}", ""])


@dataclass(frozen=True)
class Candidate:
    """What the gate decides on: the candidate's value of the gate's metric, its start's, the chain of
    evaluations (start and stages) and, when given, the benchmark suite's summary with its model's name."""

    value: float
    start: float | None
    chain: list[dict]
    suite: dict[str, Any] | None = None
    suite_model: str = ""


def _suite_verdicts(candidate: Candidate, champion: dict[str, float], margin: float) -> list[suite_gate.DatasetVerdict]:
    if candidate.suite is None:
        return []
    suite = candidate.suite
    start = suite_gate.scores(suite, "start") if "start" in suite["models"] else {}
    return suite_gate.judge(
        suite_gate.scores(suite, candidate.suite_model), start, suite_gate.champion_scores(champion), margin
    )


def _gate(client, name: str, version: str, candidate: Candidate, config: RegisterConfig) -> dict[str, Any]:
    """Alias `challenger` to `version`; `champion` too when it passes `_decide` and, given the suite, no
    dataset fails. Records the decision on the version, in tags and in its description (the card)."""
    client.set_registered_model_alias(name, "challenger", version)
    champion_version, champion_metrics = _champion(client, name)
    champion_value = champion_metrics.get(config.metric)
    verdicts: list[suite_gate.DatasetVerdict] = []
    if champion_version == str(version):  # its own gate promoted it, then was killed before recording why
        promote, rule, decision = True, "resumed", "promoted (its registration was interrupted after the promotion)"
    else:
        promote, rule, decision = _decide(candidate.value, candidate.start, champion_version, champion_value, config)
        verdicts = _suite_verdicts(candidate, champion_metrics, config.suite_margin)
        failed = suite_gate.failures(verdicts)
        if promote and failed:
            promote, rule, decision = False, "suite", f"kept current champion: {failed}"
    if promote:
        client.set_registered_model_alias(name, "champion", version)
    card = registration_card(candidate.chain, decision, rule, config.metric)
    client.update_model_version(
        name, version, description=card + "\n".join(suite_gate.card_section(verdicts) if verdicts else [])
    )
    for key, value in {
        "promotion": decision,
        "promotion.rule": rule,
        "promotion.candidate_value": candidate.value,
        "promotion.start_value": candidate.start,
        "promotion.champion_value": champion_value,
        **suite_gate.tags(verdicts),
        "promotion.champion_version": champion_version,  # last: its presence means the gate decided
    }.items():
        client.set_model_version_tag(name, version, key, str(value))
    return {
        "candidate_value": candidate.value,
        "start_value": candidate.start,
        "promoted": promote,
        "rule": rule,
        "decision": decision,
        "suite": [{"dataset": v.dataset, "passed": v.passed, "reason": v.reason} for v in verdicts],
        "previous_champion_version": int(champion_version) if champion_version else None,
        "previous_champion_value": champion_value,
        "champion_version": int(version) if promote else (int(champion_version) if champion_version else None),
    }


def _shipped_code(scratch: Path) -> str:
    """A `zhclip/model/` tree for MLflow's code_paths: the pulled model imports `zhclip.model` as the
    repository does, and ships nothing else of it (`zhclip` stays a namespace package there)."""
    shutil.copytree(
        Path(model_package.__file__).parent, scratch / "zhclip" / "model", ignore=shutil.ignore_patterns("__pycache__")
    )
    return str(scratch / "zhclip")


def _log_run(
    model_dir: Path,
    metrics: dict[str, float],
    config: RegisterConfig,
    params: dict[str, Any],
    lineage: dict[str, str],
    artifacts: list[str | Path],
    training: dict[str, str],
) -> tuple[str, str]:
    """One MLflow run holding params, metrics, step summaries and the pyfunc model; returns (run id, model URI).

    When training tracked into this same server and experiment, the run nests under the pipeline's
    parent run, beside the training stages.
    """
    import mlflow
    from transformers import AutoConfig

    experiment = mlflow.set_experiment(config.experiment)
    nested = (
        training.get("parent_run_id")
        and training.get("tracking_uri") == tracking_uri(config)
        and training.get("experiment_id") == experiment.experiment_id
    )
    # MLflow prints the run's URL on stdout when the run ends (HTTP tracking); stdout is the
    # summary JSON of `zhclip register`, so that note goes to stderr.
    with (
        contextlib.redirect_stdout(sys.stderr),
        warnings.catch_warnings(),
        tempfile.TemporaryDirectory() as scratch,
        mlflow.start_run(tags={"mlflow.parentRunId": training["parent_run_id"]} if nested else None) as run,
    ):
        # The model declares its signature (below); MLflow's hint to infer one from type hints is noise here.
        warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method")
        mlflow.set_tags({key: value for key, value in lineage.items() if key != "params"})
        mlflow.log_params({k: str(v)[:500] for k, v in flatten_params(params).items()})
        mlflow.log_metrics(metrics)
        for artifact in artifacts:
            read_summary(artifact)  # a missing or broken file fails here, named
            mlflow.log_artifact(str(artifact), artifact_path="step_summaries")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(SERVED_MODEL),
            artifacts={"model_dir": str(model_dir)},
            code_paths=[_shipped_code(Path(scratch))],
            pip_requirements=_pinned_requirements(),
            signature=_signature(AutoConfig.from_pretrained(model_dir).projection_dim),
            input_example=pd.DataFrame({"text": ["一只红色的圆形在左上角"]}),
            model_config=DEFAULT_CONFIG,
        )
    # mlflow's ActiveRun.__exit__ returns `exc_type is None`: it never swallows an exception, so `info`
    # is set here, but a bool-returning __exit__ reads to the checker as one that may
    return run.info.run_id, info.model_uri  # pyright: ignore[reportPossiblyUnboundVariable]


def _register_and_gate(
    client, model_uri: str, lineage: dict[str, str], candidate: Candidate, config: RegisterConfig
) -> dict[str, Any]:
    """Under the gate lock: the version (a new one, or the earlier one of the same checkpoint that a
    concurrent registration made meanwhile) and, for a new one, the gate's decision. A version whose
    registration was killed before its gate recorded a decision is gated now, not registered again."""
    import mlflow

    with gate_lock(client, config.model_name, config.lock_lease_s, config.lock_wait_s):
        existing = _version_of_checkpoint(
            client, config.model_name, lineage["model_weights_hash"], lineage["model_dvc_hash"]
        )
        if existing is not None and _decided(existing):
            return _already_registered(client, existing, config)
        if existing is not None:
            version, resumed = existing.version, True
        else:
            with contextlib.redirect_stdout(sys.stderr):
                version, resumed = mlflow.register_model(model_uri, config.model_name, tags=lineage).version, False
        gate = _gate(client, config.model_name, version, candidate, config)
    return {"version": int(version), "already_registered": resumed, "gate_resumed": resumed} | gate


def _decided(version) -> bool:
    """Whether the gate recorded its decision on `version` (the last thing a registration writes)."""
    return "promotion.champion_version" in version.tags


def _already_registered(client, existing, config: RegisterConfig) -> dict[str, Any]:
    champion_version, _ = _champion(client, config.model_name)
    return {
        "version": int(existing.version),
        "run_id": existing.run_id,
        "already_registered": True,
        "promoted": False,
        "decision": existing.tags.get("promotion"),
        "suite": suite_gate.recorded(existing.tags),
        "champion_version": int(champion_version) if champion_version else None,
    }


def register(
    model_dir: str | Path,
    metrics_path: str | Path,
    config: RegisterConfig,
    params: dict[str, Any] | None = None,
    summary_path: str | Path | None = None,
    step_summaries: Sequence[str | Path] = (),
    train_summary: str | Path | None = None,
    data_dir: str | Path | None = None,
    suite_path: str | Path | None = None,
) -> dict:
    """Log, register and gate; returns the summary (version, lineage, decision and both figures).

    `step_summaries` (the JSON summaries of earlier steps) and `train_summary` (stage 2's, whose
    `mlflow` section names the training runs) are attached to the MLflow run; `data_dir` is the
    training data, recorded by its DVC hash. `suite_path` is the benchmark suite's summary (`zhclip
    suite`): the model's figures are logged on the run and every dataset gates (suite_gate.py). A
    checkpoint registered before is not registered again: the summary names its existing version.
    """
    from mlflow import MlflowClient

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file() or not (model_dir / "model.safetensors").is_file():
        raise ZhclipError(f"{model_dir} is not a trained model folder (needs config.json and model.safetensors)")
    if data_dir is not None and not Path(data_dir).is_dir():
        raise ZhclipError(
            f"training data folder {data_dir} not found (pass the folder training read, e.g. data/validated)"
        )
    evaluation = read_summary(metrics_path)
    metrics: dict[str, float] = {
        k: v for k, v in evaluation.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    if config.metric not in metrics:
        raise ZhclipError(f"{metrics_path} has no metric {config.metric!r}; it has {sorted(metrics)}")
    start = _start_value(evaluation, config.metric, metrics_path)
    # Every model of the chain (start, stage 1, stage 2) side by side in the run, e.g. `start.mean_recall`.
    metrics |= {f"{entry['model']}.mean_recall": entry["mean_recall"] for entry in evaluation.get("chain", [])}
    # the model's name in the evaluation and the suite: its label (dvc.yaml's stage name, models/<stage>)
    label = str(evaluation.get("model") or model_dir.name)
    suite = read_summary(suite_path) if suite_path else None
    if suite is not None:
        metrics |= suite_gate.suite_metrics(suite, label)
    uri = tracking_uri(config)
    with using_tracking_uri(uri):
        client = MlflowClient()
        summary: dict[str, Any] = {
            "model_name": config.model_name,
            "tracking_uri": uri,
            "metric": config.metric,
            "candidate_value": metrics[config.metric],
        }
        with timed(summary):
            model_hash, weights = dvc_hash(model_dir), weights_hash(model_dir)
            existing = _version_of_checkpoint(client, config.model_name, weights, model_hash)
            if existing is not None and _decided(existing):
                summary.update(_already_registered(client, existing, config))
            else:
                training = _training_runs(train_summary)
                lineage = _lineage(model_hash, weights, metrics, params or {}, data_dir, training)
                if existing is None:
                    artifacts = [
                        *step_summaries,
                        *([train_summary] if train_summary and train_summary not in step_summaries else []),
                    ]
                    run_id, model_uri = _log_run(model_dir, metrics, config, params or {}, lineage, artifacts, training)
                else:  # registered, then killed before its gate decided: gate that version
                    run_id, model_uri = existing.run_id, existing.source
                chain = evaluation.get("chain") or [{"model": label, config.metric: metrics[config.metric]}]
                candidate = Candidate(metrics[config.metric], start, chain, suite, label)
                gated = _register_and_gate(client, model_uri, lineage, candidate, config)
                if existing is None and gated["already_registered"]:  # another registration of it came first
                    client.set_tag(run_id, "zhclip.duplicate_of_version", str(gated["version"]))
                summary.update({"run_id": run_id, "lineage": {k: v for k, v in lineage.items() if k != "params"}})
                summary.update(gated)
    if summary_path:
        write_summary(summary_path, summary)
    return summary
