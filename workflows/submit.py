"""Compiling the pipeline to Kubeflow's YAML and starting a run on a Kubeflow Pipelines API."""

import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kfp import compiler

from zhclip.components.core.errors import ZhclipError
from zhclip.workflows.config import cluster_step_configs, kubeflow_config
from zhclip.workflows.pipeline import PIPELINE_NAME, build_pipeline


def compile_pipeline(out: str | Path, params: dict[str, Any]) -> Path:
    """Write the pipeline YAML (Kubeflow Pipelines v2 IR with the Kubernetes platform spec)."""
    cluster = kubeflow_config(params)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    configs = cluster_step_configs(params, cluster)
    # In a thread of its own, where the call stack is a few frames deep: building the pipeline, KFP
    # calls inspect.stack() on each of the ~200 resource and environment settings of its tasks (to
    # name the caller in an error), which looks up every frame's module. From a deep stack (pytest, a
    # notebook) that took 6-10 s instead of under 1 (bench/investigations/2026-12-07-command-start).
    with ThreadPoolExecutor(max_workers=1) as thread:
        thread.submit(lambda: compiler.Compiler().compile(build_pipeline(configs, cluster), str(out))).result()
    return out


def submit(
    host: str,
    params: dict[str, Any],
    raw_uri: str,
    experiment: str = "zhclip",
    run_name: str | None = None,
    namespace: str | None = None,
    arguments: dict[str, Any] | None = None,
) -> dict[str, str | None]:
    """Compile, upload as a new version of the `zhclip` pipeline and start a run on the KFP API at `host`.

    Authentication follows kfp.Client (e.g. `KF_PIPELINES_SA_TOKEN_PATH` inside a cluster).
    """
    import kfp
    import kfp_server_api
    import urllib3

    run_name = run_name or f"zhclip-{time.strftime('%Y%m%d-%H%M%S')}"
    with tempfile.TemporaryDirectory() as tmp:
        package = str(compile_pipeline(Path(tmp) / "pipeline.yaml", params))
        try:
            client = kfp.Client(host=host, namespace=namespace or "kubeflow")
            pipeline_id = client.get_pipeline_id(PIPELINE_NAME)
            if pipeline_id is None:
                pipeline_id = client.upload_pipeline(package, PIPELINE_NAME, namespace=namespace).pipeline_id
                assert pipeline_id is not None  # the API's answer carries the new pipeline's id
                versions = client.list_pipeline_versions(
                    pipeline_id, page_size=1, sort_by="created_at desc"
                ).pipeline_versions
                assert versions  # the upload made one
                version_id = versions[0].pipeline_version_id
            else:
                version_id = client.upload_pipeline_version(
                    package, run_name, pipeline_id=pipeline_id
                ).pipeline_version_id
            # kfp annotates namespace `str = None`: None (the client's default namespace) is its own default
            experiment_id = client.create_experiment(experiment, namespace=namespace).experiment_id  # pyright: ignore[reportArgumentType]
            assert experiment_id is not None  # the API's answer carries it
            run = client.run_pipeline(
                experiment_id,
                run_name,
                params={"raw_uri": raw_uri, **(arguments or {})},
                pipeline_id=pipeline_id,
                version_id=version_id,
            )
        except (kfp_server_api.ApiException, urllib3.exceptions.HTTPError, OSError, TimeoutError) as err:
            raise ZhclipError(f"Kubeflow Pipelines API at {host}: {err}") from err
    return {
        "pipeline_id": pipeline_id,
        "version_id": version_id,
        "experiment_id": experiment_id,
        "run_id": run.run_id,
        "run_name": run_name,
    }
