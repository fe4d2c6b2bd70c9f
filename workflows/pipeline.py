"""The Kubeflow pipeline: ingest -> validate -> start (evaluated as the baseline) -> train stage 1 ->
train stage 2 (or only stage 2 from the start, by start_config.stages) -> evaluate each -> register -> index
(the champion embeds a validated split into a search index, when index_split names one), with zero-shot
classification of each image set under the raw data's `zeroshot/` for the start and the final model.

Each component body only calls the step function from `components/` that the DVC stage calls too.
Defaults of every pipeline parameter come from params.yaml at compile time; the Kubernetes settings
of the tasks (GPUs, resources, node selection, secrets, retries) from its `kubeflow` section.
"""

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kfp import compiler, dsl, kubernetes
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from components.common import ZhclipError, config_from
from components.evaluate import EvaluateConfig
from components.index import IndexConfig
from components.ingest import IngestConfig
from components.register import RegisterConfig
from components.start import RECIPES, StartConfig
from components.train import TrainConfig
from components.validate import ValidateConfig
from components.zeroshot import ZeroshotConfig

PIPELINE_NAME = "zhclip"
# The component image (built from infra/Dockerfile); the project and its locked dependencies are inside
# it. Read when this module is imported, since the component decorators below bake it in.
IMAGE = os.environ.get("ZHCLIP_IMAGE", "zhclip:latest")
# Pods carrying this label may reach MinIO and MLflow (infra/base/networkpolicies.yaml).
CLIENT_LABEL = ("zhclip.io/client", "true")
RUN_AS_USER = 1000  # the image's non-root user


def _component(func):
    return dsl.component(func, base_image=IMAGE, install_kfp_package=False)


@dataclass
class KubeflowConfig:
    """How the pipeline's tasks run on Kubernetes (params.yaml section `kubeflow`)."""

    gpus: int = 1  # per training task; 0 trains on CPU or, with ray_address, on a KubeRay cluster
    accelerator: str = "nvidia.com/gpu"
    gpu_node_selector: dict[str, str] = field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    gpu_toleration: str = "nvidia.com/gpu"  # taint key of the GPU nodes (effect NoSchedule)
    train_cpu: str = "8"
    train_memory: str = "32Gi"
    step_cpu: str = "2"
    step_memory: str = "8Gi"
    train_retries: int = 2
    retry_backoff: str = "60s"  # first wait; doubles on every further retry
    minio_secret: str = "minio-credentials"  # keys access-key, secret-key
    mlflow_secret: str = "mlflow-credentials"  # keys username, password
    s3_endpoint: str = "http://minio.zhclip.svc.cluster.local:9000"
    mlflow_uri: str = "http://mlflow.zhclip.svc.cluster.local:5000"
    ray_address: str = ""  # default of the pipeline parameter: "" trains with in-process Ray on the pod's GPUs
    ray_storage: str = "/tmp/ray_results"  # Ray Train's storage inside the pod (in-process Ray)
    index_split: str = "test"  # default of the pipeline parameter: the validated split the champion indexes ("": no index task)
    index_uri: str = ""  # where the index task also publishes it, e.g. s3://zhclip-index/test (what the search Deployment reads)

    def __post_init__(self):
        if self.gpus < 0 or self.train_retries < 0:
            raise ValueError("gpus and train_retries must be at least 0")


@_component
def ingest_op(raw: Input[Dataset], prepared: Output[Dataset], summary: Output[Metrics], config: dict):
    from components.common import build_config
    from components.ingest import IngestConfig, ingest

    result = ingest(raw.path, prepared.path, build_config(IngestConfig, config, "pipeline parameter"))
    for split, counts in result["splits"].items():
        summary.log_metric(f"{split}_pairs", counts["pairs"])
        summary.log_metric(f"{split}_quarantined", counts["quarantined"])


@_component
def validate_op(prepared: Input[Dataset], validated: Output[Dataset], quarantine: Output[Dataset],
                data_docs: Output[Artifact], report: Output[Metrics], config: dict):
    from components.common import build_config
    from components.validate import ValidateConfig, validate

    result = validate(prepared.path, validated.path, build_config(ValidateConfig, config, "pipeline parameter"),
                      quarantine_path=quarantine.path, docs_dir=data_docs.path)
    for split, outcome in result["splits"].items():
        report.log_metric(f"{split}_rows_kept", outcome["rows_out"])
        report.log_metric(f"{split}_rows_quarantined", outcome["rows_quarantined"])


@_component
def train_op(prepared: Input[Dataset], model: Output[Model], summary: Output[Metrics], config: dict,
             init_model: Input[Model] = None, ray_address: str = ""):
    import os

    from components.common import build_config
    from components.train import TrainConfig, train

    data, init = prepared.path, init_model.path if init_model else None
    if ray_address:  # join this KubeRay cluster instead of starting Ray on the pod's own GPUs; its
        os.environ["RAY_ADDRESS"] = ray_address  # workers read the artifacts from the object store
        data, init = prepared.uri, init_model.uri if init_model else None
    result = train(data, model.path, build_config(TrainConfig, config, "pipeline parameter"), init)
    for key in ("steps", "first_loss", "final_loss", "samples_per_s"):
        summary.log_metric(key, result[key])


@_component
def start_op(model: Output[Model], summary: Output[Metrics], config: dict) -> str:
    from components.common import build_config
    from components.start import StartConfig, prepare_start, recipe_name

    # The starting weights are object-store URIs (s3://...) in config's vision/text/checkpoint, read from MinIO.
    settings = build_config(StartConfig, config, "pipeline parameter start_config")
    result = prepare_start(model.path, settings)
    summary.log_metric("projection_dim", result["projection_dim"])
    return recipe_name(settings.stages)  # which branch of the pipeline trains: two-stage or fine-tune


@_component
def evaluate_op(model: Input[Model], prepared: Input[Dataset], scores: Output[Metrics], report: Output[HTML],
                summary: Output[Markdown], files: Output[Artifact], config: dict, label: str,
                init_scores: Input[Metrics] = None):
    import shutil
    from pathlib import Path

    from components.common import build_config
    from components.evaluate import EvaluateConfig, evaluate

    result = evaluate(model.path, prepared.path, build_config(EvaluateConfig, config, "pipeline parameter"),
                      summary_path=scores.path, report_dir=files.path, label=label,
                      init_metrics=init_scores.path if init_scores else None)
    for key, value in result.items():
        if isinstance(value, float):
            scores.log_metric(key, value)
    # The Kubeflow UI renders HTML and Markdown artifacts when the artifact file itself is the page.
    shutil.copy(Path(files.path) / "report.html", report.path)
    shutil.copy(Path(files.path) / "report.md", summary.path)


@_component
def zeroshot_op(model: Input[Model], raw: Input[Dataset], image_set: str, scores: Output[Metrics],
                report: Output[HTML], summary: Output[Markdown], files: Output[Artifact], config: dict):
    import shutil
    from pathlib import Path

    from components.common import build_config
    from components.zeroshot import ZeroshotConfig, zeroshot

    result = zeroshot(model.path, Path(raw.path) / "zeroshot" / image_set,
                      build_config(ZeroshotConfig, config, "pipeline parameter"), summary_path=scores.path,
                      predictions_path=Path(files.path) / "predictions.csv", report_dir=files.path)
    for key in ("top1", "top5", "chance_top1"):
        scores.log_metric(key, result[key])
    shutil.copy(Path(files.path) / "report.html", report.path)
    shutil.copy(Path(files.path) / "report.md", summary.path)


@_component
def register_op(model: Input[Model], scores: Input[Metrics], data: Input[Dataset], decision: Output[Metrics],
                card: Output[Markdown], config: dict) -> int:
    from pathlib import Path

    from components.common import build_config
    from components.register import RegisterConfig, register

    settings = build_config(RegisterConfig, config, "pipeline parameter")
    result = register(model.path, scores.path, settings, data_dir=data.path)
    decision.log_metric("version", result["version"])
    decision.log_metric("champion_version", result["champion_version"])
    Path(card.path).write_text(
        f"# {settings.model_name} version {result['version']}\n\n"
        f"| | |\n|---|---|\n| {settings.metric} | {result['candidate_value']} |\n"
        f"| its start's {settings.metric} | {result.get('start_value')} |\n"
        f"| promoted to champion | {result['promoted']} |\n| rule that decided | {result.get('rule')} |\n"
        f"| decision | {result['decision']} |\n| champion version | {result['champion_version']} |\n"
        f"| already registered (same weights) | {result['already_registered']} |\n\n"
        f"Pull it: `mlflow.pyfunc.load_model(\"models:/{settings.model_name}@champion\")`\n", encoding="utf-8")
    return result["version"]


@_component
def index_op(validated: Input[Dataset], index: Output[Artifact], summary: Output[Metrics], split: str, publish_uri: str,
             config: dict, register_config: dict):
    from pyarrow import fs

    from components.common import build_config
    from components.index import IndexConfig, build_index
    from components.register import RegisterConfig
    from components.storage import arrow_filesystem

    settings = dict(config)
    alias = settings.pop("alias")
    registry = build_config(RegisterConfig, register_config, "pipeline parameter register_config")
    # The gallery by its URI (s3://... on a cluster), so each image's location is one the search Deployment can read.
    result = build_index(f"{validated.uri.rstrip('/')}/{split}", index.path, f"models:/{registry.model_name}@{alias}",
                         build_config(IndexConfig, settings, "pipeline parameter index_config"), registry.tracking_uri or None)
    summary.log_metric("images", result["images"])
    summary.log_metric("rejected", result["rejected"])
    if publish_uri:  # a fixed place for the search service, beside this run's own copy in the pipeline root
        target, path = arrow_filesystem(publish_uri)
        fs.copy_files(index.path, path, source_filesystem=fs.LocalFileSystem(), destination_filesystem=target)


def step_configs(params: dict[str, Any]) -> dict[str, dict]:
    """Each step's config from params.yaml, as plain dicts for pipeline parameters."""
    return {
        "start": asdict(StartConfig.from_params(params)),
        "ingest": asdict(config_from(IngestConfig, params, "ingest")),
        "validate": asdict(config_from(ValidateConfig, params, "validate")),
        "stage1": asdict(TrainConfig.from_params(params, 1)),
        "stage2": asdict(TrainConfig.from_params(params, 2)),
        "evaluate": asdict(config_from(EvaluateConfig, params, "evaluate")),
        "zeroshot": asdict(config_from(ZeroshotConfig, params, "zeroshot")),
        "register": asdict(RegisterConfig.from_params(params)),
        "index": {**asdict(config_from(IndexConfig, params, "index")), "alias": (params.get("search") or {}).get("alias", "champion")},
    }


def kubeflow_config(params: dict[str, Any]) -> KubeflowConfig:
    """The `kubeflow` section of params.yaml (task resources, secrets, retries)."""
    return config_from(KubeflowConfig, params, "kubeflow")


def cluster_step_configs(params: dict[str, Any], cluster: KubeflowConfig) -> dict[str, dict]:
    """Step configs for a cluster run: training uses the pod's GPUs (one Ray worker each) and pod-local
    Ray storage; everything else is params.yaml as it is."""
    configs = step_configs(params)
    for stage in ("stage1", "stage2"):
        configs[stage]["storage_path"] = cluster.ray_storage
        if cluster.gpus:
            configs[stage].update(use_gpu=True, num_workers=cluster.gpus)
    return configs


def build_pipeline(defaults: dict[str, dict], cluster: KubeflowConfig | None = None):
    """The pipeline function with `defaults` (from `step_configs`) as parameter defaults.

    With `cluster`, tasks get their Kubernetes settings; without, the pipeline is the same DAG with
    nothing that needs a cluster (what `run_local` runs).
    """

    @dsl.pipeline(name=PIPELINE_NAME, description="Two-stage Chinese CLIP training from a pretrained start, "
                                                  "evaluation against the start, and registration.")
    def zhclip_pipeline(
        raw_uri: str,
        start_config: dict = defaults["start"],
        ingest_config: dict = defaults["ingest"],
        validate_config: dict = defaults["validate"],
        stage1_config: dict = defaults["stage1"],
        stage2_config: dict = defaults["stage2"],
        evaluate_config: dict = defaults["evaluate"],
        zeroshot_config: dict = defaults["zeroshot"],
        zeroshot_sets: list = defaults["zeroshot"]["sets"],
        register_config: dict = defaults["register"],
        index_config: dict = defaults["index"],
        index_split: str = (cluster or KubeflowConfig()).index_split,
        index_uri: str = cluster.index_uri if cluster else "",
        ray_address: str = cluster.ray_address if cluster else "",
    ):
        raw = dsl.importer(artifact_uri=raw_uri, artifact_class=Dataset, reimport=False)
        ingested = ingest_op(raw=raw.output, config=ingest_config)
        checked = validate_op(prepared=ingested.outputs["prepared"], config=validate_config)
        validated = checked.outputs["validated"]
        start = start_op(config=start_config)
        baseline = evaluate_op(model=start.outputs["model"], prepared=validated, config=evaluate_config, label="start")
        stage_configs = {"stage1": stage1_config, "stage2": stage2_config}
        training, evaluations, registrations, indexing = [], [baseline], [], []
        zeroshot_sets_known = bool(defaults["zeroshot"]["sets"])  # a loop over no sets does not compile

        def stages_after_start(recipe: dict[str, str]) -> None:
            """The recipe's stages, each evaluated beside the model it started from; register the last."""
            init, earlier = start.outputs["model"], baseline.outputs["scores"]
            for stage in recipe:
                trained = train_op(prepared=validated, config=stage_configs[stage], init_model=init,
                                   ray_address=ray_address).set_display_name(f"train {stage}")
                scored = evaluate_op(model=trained.outputs["model"], prepared=validated, config=evaluate_config,
                                     label=stage, init_scores=earlier).set_display_name(f"evaluate {stage}")
                init, earlier = trained.outputs["model"], scored.outputs["scores"]
                training.append(trained)
                evaluations.append(scored)
            registration = register_op(model=init, scores=earlier, data=validated, config=register_config)
            registrations.append(registration)
            if zeroshot_sets_known:
                with dsl.ParallelFor(zeroshot_sets) as image_set:
                    evaluations.append(zeroshot_op(model=init, raw=raw.output, image_set=image_set, config=zeroshot_config)
                                       .set_display_name("zero-shot stage2"))
            with dsl.If(index_split != "", name="index"):  # the champion, which this registration may have moved
                indexing.append(index_op(validated=validated, split=index_split, publish_uri=index_uri, config=index_config,
                                         register_config=register_config).after(registration).set_display_name("index"))

        # start_config.stages picks the branch per run (the UI's choice, as params.yaml's is dvc's).
        for name, recipe in RECIPES.items():
            with dsl.If(start.outputs["Output"] == name, name=name):
                stages_after_start(recipe)
        if zeroshot_sets_known:
            with dsl.ParallelFor(zeroshot_sets) as image_set:
                evaluations.append(zeroshot_op(model=start.outputs["model"], raw=raw.output, image_set=image_set,
                                               config=zeroshot_config).set_display_name("zero-shot start"))
        # Data steps are pure functions of their inputs: reuse earlier outputs. Training and
        # registration always run (a new model version is the point of a run), and so do the
        # evaluations, which log into the training run.
        for task in (ingested, checked, start):
            task.set_caching_options(True)
        for task in (*training, *evaluations, *registrations, *indexing):
            task.set_caching_options(False)
        if cluster:
            _on_kubernetes(cluster, steps=(ingested, checked, start, *evaluations, *registrations, *indexing), training=training,
                           tracked=(start, *training, *evaluations, *registrations, *indexing))

    return zhclip_pipeline


def _on_kubernetes(cluster: KubeflowConfig, steps: tuple, training: tuple, tracked: tuple) -> None:
    """Resources, GPU placement, retries, credentials and network labels of every task."""
    for task in (*steps, *training):
        kubernetes.add_pod_label(task, *CLIENT_LABEL)
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
        kubernetes.use_secret_as_env(task, secret_name=cluster.minio_secret, secret_key_to_env={
            "access-key": "AWS_ACCESS_KEY_ID", "secret-key": "AWS_SECRET_ACCESS_KEY"})
        kubernetes.use_secret_as_env(task, secret_name=cluster.mlflow_secret, secret_key_to_env={
            "username": "MLFLOW_TRACKING_USERNAME", "password": "MLFLOW_TRACKING_PASSWORD"})
        for name, value in (("MLFLOW_TRACKING_URI", cluster.mlflow_uri), ("AWS_ENDPOINT_URL", cluster.s3_endpoint),
                            ("MLFLOW_S3_ENDPOINT_URL", cluster.s3_endpoint)):
            task.set_env_variable(name, value)


def compile_pipeline(out: str | Path, params: dict[str, Any]) -> Path:
    """Write the pipeline YAML (Kubeflow Pipelines v2 IR with the Kubernetes platform spec)."""
    cluster = kubeflow_config(params)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(cluster_step_configs(params, cluster), cluster), str(out))
    return out


def submit(host: str, params: dict[str, Any], raw_uri: str, experiment: str = "zhclip",
           run_name: str | None = None, namespace: str | None = None,
           arguments: dict[str, Any] | None = None) -> dict[str, str]:
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
                version_id = client.list_pipeline_versions(pipeline_id, page_size=1, sort_by="created_at desc") \
                    .pipeline_versions[0].pipeline_version_id
            else:
                version_id = client.upload_pipeline_version(package, run_name, pipeline_id=pipeline_id).pipeline_version_id
            experiment_id = client.create_experiment(experiment, namespace=namespace).experiment_id
            run = client.run_pipeline(experiment_id, run_name, params={"raw_uri": raw_uri, **(arguments or {})},
                                      pipeline_id=pipeline_id, version_id=version_id)
        except (kfp_server_api.ApiException, urllib3.exceptions.HTTPError, OSError, TimeoutError) as err:
            raise ZhclipError(f"Kubeflow Pipelines API at {host}: {err}") from err
    return {"pipeline_id": pipeline_id, "version_id": version_id, "experiment_id": experiment_id,
            "run_id": run.run_id, "run_name": run_name}


def run_local(raw_dir: str | Path, root: str | Path, params: dict[str, Any]) -> dict[str, Any]:
    """Run the whole pipeline in subprocesses of this environment with kfp.local; returns the outputs."""
    from kfp import local

    raw_dir = Path(raw_dir).resolve()
    if not (raw_dir / "train_imgs.tsv").is_file():
        raise ZhclipError(f"{raw_dir} has no train_imgs.tsv; run `zhclip demo-data --out {raw_dir}` first")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(Path(root).resolve()))
    configs = step_configs(params)
    for role in ("vision", "text", "checkpoint"):  # the tasks run elsewhere: local starting weights by absolute path
        if configs["start"][role] and "://" not in configs["start"][role]:
            configs["start"][role] = str(Path(configs["start"][role]).resolve())
    try:
        build_pipeline(configs)(raw_uri=str(raw_dir), index_split=kubeflow_config(params).index_split)
    except RuntimeError as err:
        raise ZhclipError(f"local pipeline run failed ({err}); the failing task's log is printed above") from err
    return _local_outputs(Path(root).resolve())


def _task_metrics(run_dir: Path, task: str, artifact: str) -> dict[str, Any]:
    executor_output = json.loads((run_dir / task / "executor_output.json").read_text(encoding="utf-8"))
    return executor_output["artifacts"][artifact]["artifacts"][0]["metadata"]


def _local_outputs(root: Path) -> dict[str, Any]:
    """The newest local run's folder and the metrics its tasks logged: the final model's evaluation
    (`scores`), the start's (`start_scores`), zero-shot per model, the registration and the index (of the branch that ran)."""
    run_dir = max(root.glob("zhclip-*"), key=lambda path: path.stat().st_mtime)

    def ran(pattern: str) -> list[Path]:
        return sorted(task for task in run_dir.glob(pattern) if (task / "executor_output.json").is_file())

    def summary(task: Path) -> dict[str, Any]:  # the step's own JSON summary, kept as the scores artifact's file
        return json.loads((task / "scores").read_text(encoding="utf-8"))

    evaluations = {summary(task)["model"]: task for task in ran("evaluate-op*")}
    zeroshot = {"start": [], "final": []}
    for task in ran("for-loop-*/zeroshot-op*"):
        model = "start" if Path(summary(task)["model_dir"]).parent.name == "start-op" else "final"
        zeroshot[model].append(_task_metrics(task.parent, task.name, "scores"))
    (registered,) = ran("register-op*")
    indexed = ran("index-op*")
    return {"run_dir": str(run_dir), "scores": _task_metrics(run_dir, evaluations["stage2"].name, "scores"),
            "start_scores": _task_metrics(run_dir, evaluations["start"].name, "scores"),
            "zeroshot_start": zeroshot["start"], "zeroshot": zeroshot["final"],
            "register": _task_metrics(run_dir, registered.name, "decision"),
            "index": _task_metrics(run_dir, indexed[0].name, "summary") if indexed else None}
