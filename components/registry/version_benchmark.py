"""A registered version scored on datasets of the benchmark suite: its model folder pulled from the
registry, each dataset scored as `zhclip benchmark` scores it, and the figures logged on the version's
MLflow run as `benchmark/<dataset>/<figure>`, where the promotion gate reads a champion's. Scoring the
champion on a dataset added to the suite after it was registered gives the gate its figure there.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from typing import Any

from zhclip.components.core.errors import ZhclipError
from zhclip.components.core.tracking import registered_model_folder, resolve_tracking_uri, using_tracking_uri
from zhclip.components.evaluation.benchmark import benchmark
from zhclip.components.evaluation.suite_config import SuiteDataset
from zhclip.components.registry.suite_gate import PREFIX


def _version(client, uri: str):
    """The registry's version for models:/NAME/VERSION or models:/NAME@ALIAS."""
    from mlflow.exceptions import MlflowException

    name_and_version = uri.removeprefix("models:/")
    try:
        if "@" in name_and_version:
            return client.get_model_version_by_alias(*name_and_version.split("@", 1))
        name, _, version = name_and_version.rpartition("/")
        return client.get_model_version(name, version)
    except MlflowException as err:
        raise ZhclipError(f"no registered version {uri}: {err.message}") from err


def benchmark_version(
    uri: str, datasets: Sequence[SuiteDataset], batch_size: int = 256, tracking_uri: str = ""
) -> dict[str, Any]:
    """Score the version `uri` on each dataset and log the figures on its run; returns them by dataset."""
    from mlflow import MlflowClient

    if not uri.startswith("models:/"):
        raise ZhclipError(f"{uri!r} is not a registered version: give models:/NAME/VERSION or models:/NAME@ALIAS")
    with using_tracking_uri(resolve_tracking_uri(tracking_uri)), tempfile.TemporaryDirectory() as scratch:
        client = MlflowClient()
        version = _version(client, uri)
        run_id = version.run_id
        if not run_id:
            raise ZhclipError(f"{uri} has no MLflow run to log its figures on (registered without one)")
        pulled = registered_model_folder(uri, tracking_uri, scratch)
        results = {dataset.name: benchmark(pulled, dataset, batch_size) for dataset in datasets}
        for name, figures in results.items():
            for key, value in figures.items():
                if _is_figure(key, value):  # the score too: the gate reads benchmark/<dataset>/score
                    client.log_metric(run_id, f"{PREFIX}/{name}/{key}", value)
    return {"model": uri, "version": int(version.version), "run_id": run_id, "datasets": results}


def _is_figure(key: str, value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and key != "duration_s"
