"""Register: log the model as an MLflow pyfunc, register a version, and gate the `champion` alias.

The new version always gets alias `challenger`; `champion` moves to it only if its metric is at
least the current champion's (minus a tolerance). Versions are never deleted or overwritten.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pandas as pd

import model as model_package
from components.common import ZhclipError, read_summary, timed, write_summary
from components.lineage import git_commit

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# What a pulled model needs at inference, pinned to the versions it was trained with.
INFERENCE_PACKAGES = ("torch", "transformers", "safetensors", "numpy", "pillow", "pandas")


@dataclass
class RegisterConfig:
    model_name: str = "zhclip-demo"
    experiment: str = "zhclip"
    tracking_uri: str = ""  # empty: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    metric: str = "mean_recall"
    tolerance: float = 0.0


def tracking_uri(config: RegisterConfig) -> str:
    return config.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _signature(projection_dim: int):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec
    import numpy as np

    inputs = Schema([ColSpec("string", "text", required=False), ColSpec("binary", "image", required=False)])
    return ModelSignature(inputs=inputs, outputs=Schema([TensorSpec(np.dtype("float32"), (-1, projection_dim))]))


def _flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _champion_metric(client, name: str, metric: str) -> tuple[str | None, float | None]:
    from mlflow.exceptions import MlflowException

    try:
        champion = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None, None
    value = champion.tags.get(metric)
    return champion.version, float(value) if value is not None else None


def register(
    model_dir: str | Path,
    metrics_path: str | Path,
    config: RegisterConfig,
    params: dict[str, Any] | None = None,
    summary_path: str | Path | None = None,
    step_summaries: list[str | Path] = (),
) -> dict:
    """Log, register and gate; returns the summary (version, aliases, decision and both figures).

    `step_summaries` (the JSON summaries of earlier steps) are attached to the MLflow run.
    """
    import mlflow
    from mlflow import MlflowClient
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file() or not (model_dir / "model.safetensors").is_file():
        raise ZhclipError(f"{model_dir} is not a trained model folder (needs config.json and model.safetensors)")
    metrics = {k: v for k, v in read_summary(metrics_path).items() if isinstance(v, (int, float))}
    if config.metric not in metrics:
        raise ZhclipError(f"{metrics_path} has no metric {config.metric!r}; it has {sorted(metrics)}")
    uri = tracking_uri(config)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    mlflow.set_experiment(config.experiment)
    client = MlflowClient()
    summary: dict[str, Any] = {"model_name": config.model_name, "tracking_uri": uri, "metric": config.metric}
    with timed(summary), mlflow.start_run() as run:
        mlflow.log_params({k: str(v)[:500] for k, v in _flatten(params or {}).items()})
        mlflow.log_metrics(metrics)
        for step_summary in step_summaries:
            read_summary(step_summary)  # a missing or broken file fails here, named
            mlflow.log_artifact(str(step_summary), artifact_path="step_summaries")
        projection_dim = AutoConfig.from_pretrained(model_dir).projection_dim
        info = mlflow.pyfunc.log_model(
            name="model",
            loader_module="model.pyfunc",
            data_path=str(model_dir),
            code_paths=[str(Path(model_package.__file__).parent)],
            pip_requirements=[f"{package}=={version(package)}" for package in INFERENCE_PACKAGES],
            signature=_signature(projection_dim),
            input_example=pd.DataFrame({"text": ["一只红色的圆形在左上角"]}),
        )
        registered = mlflow.register_model(info.model_uri, config.model_name,
                                           tags={config.metric: str(metrics[config.metric]), "git_commit": git_commit()})
        summary["run_id"] = run.info.run_id
    new_version = registered.version
    client.set_registered_model_alias(config.model_name, "challenger", new_version)
    champion_version, champion_value = _champion_metric(client, config.model_name, config.metric)
    promote = champion_value is None or metrics[config.metric] >= champion_value - config.tolerance
    if promote:
        client.set_registered_model_alias(config.model_name, "champion", new_version)
    decision = "promoted" if promote else "kept current champion"
    client.set_model_version_tag(config.model_name, new_version, "promotion",
                                 f"{decision}: {metrics[config.metric]} vs champion {champion_value}")
    summary.update(version=int(new_version), candidate_value=metrics[config.metric],
                   previous_champion_version=int(champion_version) if champion_version else None,
                   previous_champion_value=champion_value, promoted=promote,
                   champion_version=int(new_version if promote else champion_version))
    if summary_path:
        write_summary(summary_path, summary)
    return summary
