"""The Kubeflow pipeline: ingest -> validate -> start (evaluated as the baseline) -> train stage 1 ->
train stage 2 (or only stage 2 from the start, by start_config.stages) -> evaluate each -> the benchmark
suite (the start and the final model on every dataset of benchmark_config) -> register (gated on the
suite too) -> index (the champion embeds each gallery of search.galleries into a search index), with
zero-shot classification of each image set under the raw data's `zeroshot/` for the start and the final model.

The components are in workflows/steps.py, their settings in workflows/config.py; compile and submit in
workflows/submit.py, the local run in workflows/local_run.py.
"""

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from kfp import dsl, kubernetes
from kfp.dsl import Dataset
from kfp.dsl.graph_component import GraphComponent

from zhclip.components.core.progress import MLFLOW_BARS_ENV
from zhclip.components.core.storage import POLICY_ENV
from zhclip.components.training.start import RECIPES
from zhclip.workflows.config import KubeflowConfig
from zhclip.workflows.steps import (
    benchmark_op,
    evaluate_op,
    index_op,
    ingest_op,
    register_op,
    start_op,
    suite_op,
    train_op,
    validate_op,
    zeroshot_op,
)

PIPELINE_NAME = "zhclip"
# Pods carrying this label may reach MinIO and MLflow (infra/base/networkpolicies.yaml).
CLIENT_LABEL = ("zhclip.io/client", "true")
RUN_AS_USER = 10001  # the image's non-root user (infra/Dockerfile)


@dataclass
class _Run:
    """What the branches of one pipeline run share: the outputs and parameters they read, and the
    tasks they add (for caching and Kubernetes settings)."""

    raw: Any
    validated: Any
    start: Any
    baseline: Any
    configs: dict[str, Any]  # stage1, stage2, evaluate, zeroshot, benchmark, register, index
    zeroshot_sets: Any  # None: params.yaml lists no set (a loop over no sets does not compile)
    galleries: dict[str, str]  # name -> a split of the validated data or a URI (config.pipeline_galleries)
    index_catalog: str  # where each gallery's index is published, as <catalog>/<name> ('': not published)
    ray_address: Any
    start_benchmark: Any = None  # the start's results on the suite (None: params.yaml's suite is empty)
    training: list = field(default_factory=list)
    evaluations: list = field(default_factory=list)
    registrations: list = field(default_factory=list)
    indexing: list = field(default_factory=list)


def _zeroshot(run: _Run, model, label: str) -> None:
    """`model` classifies each zero-shot image set, a task per set."""
    if run.zeroshot_sets is None:
        return
    with dsl.ParallelFor(run.zeroshot_sets) as image_set:
        task = zeroshot_op(model=model, raw=run.raw.output, image_set=image_set, config=run.configs["zeroshot"])
        run.evaluations.append(task.set_display_name(f"zero-shot {label}"))


def _benchmark(run: _Run, model, label: str):
    """`model` scored on every dataset of the suite, as `label` (dvc.yaml's model name)."""
    task = benchmark_op(
        model=model, raw=run.raw.output, validated=run.validated, config=run.configs["benchmark"], label=label
    )
    run.evaluations.append(task.set_display_name(f"benchmark {label}"))
    return task


def _suite(run: _Run, model, label: str) -> dict[str, Any]:
    """The suite of the start and `model` (the register task's `suite` input); {} when there is no suite."""
    if run.start_benchmark is None:
        return {}
    final = _benchmark(run, model, label)
    table = suite_op(
        start_results=run.start_benchmark.outputs["results"],
        final_results=final.outputs["results"],
        config=run.configs["benchmark"],
        final=label,
    )
    run.evaluations.append(table.set_display_name("benchmark suite"))
    return {"suite": table.outputs["summary"]}


def _stages_after_start(run: _Run, recipe: dict[str, str]) -> None:
    """The recipe's stages, each evaluated beside the model it started from; score the last on the suite,
    register it, score it zero-shot, and index with the champion (which this registration may have moved)."""
    init, earlier = run.start.outputs["model"], run.baseline.outputs["scores"]
    for stage in recipe:
        trained = train_op(
            prepared=run.validated, config=run.configs[stage], init_model=init, ray_address=run.ray_address
        ).set_display_name(f"train {stage}")
        scored = evaluate_op(
            model=trained.outputs["model"],
            prepared=run.validated,
            config=run.configs["evaluate"],
            label=stage,
            init_scores=earlier,
        ).set_display_name(f"evaluate {stage}")
        init, earlier = trained.outputs["model"], scored.outputs["scores"]
        run.training.append(trained)
        run.evaluations.append(scored)
    suite = _suite(run, init, list(recipe)[-1])
    registration = register_op(model=init, scores=earlier, data=run.validated, config=run.configs["register"], **suite)
    run.registrations.append(registration)
    _zeroshot(run, init, "stage2")
    for name, gallery in run.galleries.items():
        indexed = index_op(
            validated=run.validated,
            gallery=gallery,
            publish_uri=f"{run.index_catalog.rstrip('/')}/{name}" if run.index_catalog else "",
            config=run.configs["index"],
            register_config=run.configs["register"],
        )
        run.indexing.append(indexed.after(registration).set_display_name(f"index {name}"))


def build_pipeline(defaults: dict[str, dict], cluster: KubeflowConfig | None = None) -> GraphComponent:
    """The pipeline function with `defaults` (from `step_configs`) as parameter defaults.

    With `cluster`, tasks get their Kubernetes settings; without, the pipeline is the same DAG with
    nothing that needs a cluster (what `run_local` runs).
    """

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="Two-stage Chinese CLIP training from a pretrained start, "
        "evaluation against the start, and registration.",
    )
    def zhclip_pipeline(
        raw_uri: str,
        start_config: dict = defaults["start"],
        ingest_config: dict = defaults["ingest"],
        validate_config: dict = defaults["validate"],
        stage1_config: dict = defaults["stage1"],
        stage2_config: dict = defaults["stage2"],
        evaluate_config: dict = defaults["evaluate"],
        zeroshot_config: dict = defaults["zeroshot"],
        benchmark_config: dict = defaults["benchmark"],
        zeroshot_sets: list = defaults["zeroshot"]["sets"],
        register_config: dict = defaults["register"],
        index_config: dict = defaults["index"],
        ray_address: str = cluster.ray_address if cluster else "",
    ):
        raw = dsl.importer(artifact_uri=raw_uri, artifact_class=Dataset, reimport=False)
        ingested = ingest_op(raw=raw.output, config=ingest_config)
        checked = validate_op(prepared=ingested.outputs["prepared"], config=validate_config)
        validated = checked.outputs["validated"]
        start = start_op(config=start_config)
        baseline = evaluate_op(model=start.outputs["model"], prepared=validated, config=evaluate_config, label="start")
        configs = {"stage1": stage1_config, "stage2": stage2_config, "evaluate": evaluate_config}
        configs |= {"zeroshot": zeroshot_config, "benchmark": benchmark_config}
        configs |= {"register": register_config, "index": index_config}
        sets = zeroshot_sets if defaults["zeroshot"]["sets"] else None
        catalog = cluster.index_catalog if cluster else ""
        run = _Run(raw, validated, start, baseline, configs, sets, defaults["galleries"], catalog, ray_address)
        run.evaluations.append(baseline)
        if defaults["benchmark"]["suite"]:  # compiled per params.yaml's suite, as the zero-shot sets are
            run.start_benchmark = _benchmark(run, start.outputs["model"], "start")
        # start_config.stages picks the branch per run (the UI's choice, as params.yaml's is dvc's).
        for name, recipe in RECIPES.items():
            with dsl.If(start.outputs["Output"] == name, name=name):
                _stages_after_start(run, recipe)
        _zeroshot(run, start.outputs["model"], "start")
        # Data steps are pure functions of their inputs: reuse earlier outputs. Training and
        # registration always run (a new model version is the point of a run), and so do the
        # evaluations, which log into the training run.
        for task in (ingested, checked, start):
            task.set_caching_options(True)
        after_start = (*run.evaluations, *run.registrations, *run.indexing)
        for task in (*run.training, *after_start):
            task.set_caching_options(False)
        if cluster:
            _on_kubernetes(
                cluster,
                defaults["object_store"],
                steps=(ingested, checked, start, *after_start),
                training=run.training,
                tracked=(start, *run.training, *after_start),
            )

    return cast(GraphComponent, zhclip_pipeline)  # what dsl.pipeline makes; annotated only as a Callable


def _on_kubernetes(
    cluster: KubeflowConfig, object_store: dict, steps: Sequence, training: Sequence, tracked: Sequence
) -> None:
    """Resources, GPU placement, retries, credentials, object-store retry policy and network labels of every task."""
    for task in (*steps, *training):
        kubernetes.add_pod_label(task, *CLIENT_LABEL)
        task.set_env_variable(POLICY_ENV, json.dumps(object_store))
        task.set_env_variable(MLFLOW_BARS_ENV, "false")  # a pod's log is no terminal (core/progress.py)
        kubernetes.set_security_context(task, run_as_user=RUN_AS_USER, run_as_non_root=True)
    for task in steps:
        task.set_cpu_request(cluster.step_cpu).set_cpu_limit(cluster.step_cpu)
        task.set_memory_request(cluster.step_memory).set_memory_limit(cluster.step_memory)
    for task in training:
        task.set_cpu_request(cluster.train_cpu).set_cpu_limit(cluster.train_cpu)
        task.set_memory_request(cluster.train_memory).set_memory_limit(cluster.train_memory)
        task.set_retry(num_retries=cluster.train_retries, backoff_duration=cluster.retry_backoff, backoff_factor=2.0)
        # PyTorch data loaders and Ray's object store need more shared memory than a pod's default 64 MB.
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory")
        if cluster.gpus:
            task.set_accelerator_type(cluster.accelerator).set_accelerator_limit(cluster.gpus)
            for label, value in cluster.gpu_node_selector.items():
                kubernetes.add_node_selector(task, label_key=label, label_value=value)
            kubernetes.add_toleration(task, key=cluster.gpu_toleration, operator="Exists", effect="NoSchedule")
    for task in tracked:
        kubernetes.use_secret_as_env(
            task,
            secret_name=cluster.minio_secret,
            secret_key_to_env={"access-key": "AWS_ACCESS_KEY_ID", "secret-key": "AWS_SECRET_ACCESS_KEY"},
        )
        kubernetes.use_secret_as_env(
            task,
            secret_name=cluster.mlflow_secret,
            secret_key_to_env={"username": "MLFLOW_TRACKING_USERNAME", "password": "MLFLOW_TRACKING_PASSWORD"},
        )
        for name, value in (
            ("MLFLOW_TRACKING_URI", cluster.mlflow_uri),
            ("AWS_ENDPOINT_URL", cluster.s3_endpoint),
            ("MLFLOW_S3_ENDPOINT_URL", cluster.s3_endpoint),
        ):
            task.set_env_variable(name, value)
