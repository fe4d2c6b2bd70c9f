"""MLflow tracking of training: one parent run per pipeline run, one nested run per stage.

The driver opens the stage run (params, lineage tags) and closes it with the summary; rank 0 of the
training workers logs the step metrics into it through `StepLogger`, so no other rank creates runs.
Stage 2 finds the parent through stage 1's model folder (RUN_FILE), so both stages of one `dvc repro`
or one Kubeflow run sit under one parent. A re-run of an interrupted stage continues its run, found
by the Ray run name it was tagged with.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zhclip.components.core.errors import ZhclipError
from zhclip.components.core.lineage import (
    RUN_FILE,
)  # in a trained model folder: {"parent_run_id", "run_id", "tracking_uri"}
from zhclip.components.core.settings import setting

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
RAY_RUN_TAG = "zhclip.ray_run"


@dataclass
class MlflowConfig:
    """Section `mlflow`: the tracking server and experiment that training and registration share, so a
    registered version nests under its pipeline run."""

    tracking_uri: str = setting("", "MLflow tracking URI; empty: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    experiment: str = setting(
        "zhclip", "MLflow experiment: a parent run per pipeline run, a nested run per training stage"
    )


def resolve_tracking_uri(uri: str = "") -> str:
    """`uri`, else $MLFLOW_TRACKING_URI, else ./mlflow.db; a relative SQLite or file path is made
    absolute, since Ray workers do not run in the caller's directory."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    if "://" not in uri:
        return str(Path(uri).resolve())
    return uri


@contextmanager
def using_tracking_uri(uri: str) -> Iterator[None]:
    """`mlflow.set_tracking_uri`/`set_registry_uri` for the duration of the block only. MLflow keeps
    them in globals and exports them as environment variables for child processes, which would
    otherwise leak into everything a long-lived caller (a notebook, a test session) does later."""
    import mlflow

    saved = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        # None (unset before) puts MLflow back to its default: its code takes None, its annotation says str
        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])  # pyright: ignore[reportArgumentType]
        mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])  # pyright: ignore[reportArgumentType]
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)


def flatten_params(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as MLflow param names: {"train": {"lr": 0.1}} -> {"train.lr": 0.1}."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten_params(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _experiment_id(client, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(name)


def training_run(model_dir: str | Path) -> dict[str, str] | None:
    """The MLflow run that trained a model folder (local or s3://): {"tracking_uri", "run_id",
    "parent_run_id", ...}, if recorded."""
    from zhclip.components.core.storage import is_file, read_text

    run_file = f"{model_dir}/{RUN_FILE}"
    return json.loads(read_text(run_file)) if is_file(run_file) else None


def parent_run_from(model_dir: str | None) -> str | None:
    """The parent run recorded in a trained model folder (local or s3://), if any."""
    run = training_run(model_dir) if model_dir else None
    return run.get("parent_run_id") if run else None


def run_to_log_into(run_id: str | None, model_dir: str | Path | None = None) -> dict[str, str] | None:
    """Where an evaluation logs: the run named, else the run that trained `model_dir`, if recorded."""
    if run_id:
        return {"run_id": run_id}
    return training_run(model_dir) if model_dir else None


def start_stage_run(
    uri: str,
    experiment: str,
    stage: int,
    ray_run_name: str,
    params: dict[str, Any],
    tags: dict[str, str],
    parent_run_id: str | None,
) -> dict[str, str]:
    """Open (or reopen, for a resumed stage) the stage's run under `parent_run_id`, creating a parent
    when there is none. Returns {"tracking_uri", "experiment_id", "parent_run_id", "run_id"}."""
    from mlflow.entities import Param, RunTag

    try:
        client = _client(uri)
        experiment_id = _experiment_id(client, experiment)
    except Exception as err:  # MLflow raises many types for an unreachable or misconfigured store
        raise ZhclipError(
            f"MLflow tracking store {uri} is not usable ({err}); set mlflow.tracking_uri "
            "in params.yaml or MLFLOW_TRACKING_URI"
        ) from err
    previous = client.search_runs(
        [experiment_id], filter_string=f"tags.`{RAY_RUN_TAG}` = '{ray_run_name}'", max_results=1
    )
    if previous:
        run = previous[0]
        client.update_run(run.info.run_id, status="RUNNING")
        return {
            "tracking_uri": uri,
            "experiment_id": experiment_id,
            "parent_run_id": run.data.tags.get("mlflow.parentRunId", ""),
            "run_id": run.info.run_id,
        }
    if not parent_run_id:
        parent_run_id = client.create_run(
            experiment_id, run_name="pipeline", tags={"zhclip.kind": "pipeline", **tags}
        ).info.run_id
    run = client.create_run(
        experiment_id,
        run_name=f"stage{stage}",
        tags={
            "mlflow.parentRunId": parent_run_id,
            "zhclip.kind": "training",
            "zhclip.stage": str(stage),
            RAY_RUN_TAG: ray_run_name,
            **tags,
        },
    )
    client.log_batch(
        run.info.run_id,
        params=[Param(k, str(v)[:6000]) for k, v in flatten_params(params).items()],
        tags=[RunTag(k, v) for k, v in tags.items()],
    )
    return {
        "tracking_uri": uri,
        "experiment_id": experiment_id,
        "parent_run_id": parent_run_id,
        "run_id": run.info.run_id,
    }


def finish_stage_run(ids: dict[str, str], summary: dict[str, Any], status: str = "FINISHED") -> None:
    """Log the summary's numbers as run metrics, its warnings as the run's note (the first thing the
    MLflow UI shows of a run) and tag `zhclip.warnings`, and close the run."""
    from mlflow.entities import Metric, RunTag

    client = _client(ids["tracking_uri"])
    numbers = {
        f"summary.{k}": float(v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    warnings = summary.get("warnings") or []
    tags = [
        RunTag("zhclip.warnings", "\n".join(warnings)),
        RunTag("mlflow.note.content", "\n\n".join(f"**Warning:** {w}" for w in warnings)),
    ]
    client.log_batch(
        ids["run_id"], metrics=[Metric(k, v, 0, 0) for k, v in numbers.items()], tags=tags if warnings else []
    )
    client.set_terminated(ids["run_id"], status=status)


class StepLogger:
    """Rank 0's per-step metrics, sent to the stage run in batches (one call per `every` steps)."""

    def __init__(self, ids: dict[str, str] | None, every: int = 20):
        self.ids, self.every, self.pending = ids, every, []
        self.client = _client(ids["tracking_uri"]) if ids else None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.client:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(key, float(value), now, step) for key, value in metrics.items()]
        if len(self.pending) >= self.every * len(metrics):
            self.flush()

    def flush(self) -> None:
        if self.client and self.pending:
            assert self.ids is not None  # a client is made only from ids
            for start in range(0, len(self.pending), 1000):  # MLflow's batch limit
                self.client.log_batch(self.ids["run_id"], metrics=self.pending[start : start + 1000])
            self.pending = []


def registered_model_folder(uri: str, tracking_uri: str, scratch: str | Path, what: str = "model") -> Path:
    """The model folder inside a registered version (`models:/NAME/VERSION` or `models:/NAME@ALIAS`):
    its pyfunc downloaded into `scratch`, and the folder `zhclip register` logged in it (the one that
    holds config.json). `what` names the model in errors (the teacher, the model)."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    from zhclip.components.core.errors import ZhclipError

    try:
        with using_tracking_uri(resolve_tracking_uri(tracking_uri)):
            root = Path(download_artifacts(artifact_uri=uri, dst_path=str(scratch)))
    except MlflowException as err:
        raise ZhclipError(f"{what} {uri!r}: cannot download it from the registry: {err.message}") from err
    folders = sorted(path.parent for path in (root / "artifacts").rglob("config.json"))
    if not folders:
        raise ZhclipError(
            f"{what} {uri!r} holds no model folder (no artifacts/**/config.json); register it with `zhclip register`"
        )
    return folders[0]
