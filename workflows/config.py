"""The pipeline's settings: each step's config from params.yaml as plain pipeline parameters, and how the
tasks run on Kubernetes (section `kubeflow`)."""

from dataclasses import asdict, dataclass, replace
from pathlib import PurePosixPath
from typing import Any

from zhclip.components.core.architecture import ModelConfig
from zhclip.components.core.errors import ZhclipError
from zhclip.components.core.settings import config_from, setting
from zhclip.components.core.storage import ObjectStoreConfig
from zhclip.components.data.ingest import IngestConfig
from zhclip.components.data.validate import ValidateConfig
from zhclip.components.evaluation.evaluate import EvaluateConfig
from zhclip.components.evaluation.suite_config import BenchmarkConfig, SuiteDataset, suite_datasets
from zhclip.components.evaluation.zeroshot import ZeroshotConfig
from zhclip.components.registry.register import RegisterConfig
from zhclip.components.search.index_build import IndexConfig
from zhclip.components.search.service import SearchConfig
from zhclip.components.training.config import stage_config
from zhclip.components.training.start import StartConfig

VALIDATED_FOLDER = PurePosixPath("data/validated")  # dvc.yaml's validate output, where galleries name splits
RAW_FOLDER = PurePosixPath("data/raw")  # dvc.yaml's raw data: the folder a pipeline run imports as raw_uri
# the names a suite path in the pipeline's form starts with (pipeline_suite), read from the run's artifacts
ARTIFACT_ROOTS = {VALIDATED_FOLDER: "{validated}", RAW_FOLDER: "{raw}"}


@dataclass
class KubeflowConfig:
    """How the pipeline's tasks run on Kubernetes (params.yaml section `kubeflow`)."""

    gpus: int = setting(
        1,
        "GPUs per training task; in the pipeline they replace train.use_gpu (true) and train.num_workers (a "
        "Ray worker a GPU); 0 keeps train's and trains on CPU or, with ray_address, on a KubeRay cluster",
    )
    accelerator: str = setting("nvidia.com/gpu", "the GPU resource a training task requests")
    gpu_node_selector: dict[str, str] = setting(
        {"nvidia.com/gpu.present": "true"}, "node labels a training task is scheduled on"
    )
    gpu_toleration: str = setting("nvidia.com/gpu", "taint key of the GPU nodes (effect NoSchedule)")
    train_cpu: str = setting("8", "CPU request of a training task")
    train_memory: str = setting("32Gi", "memory request of a training task")
    step_cpu: str = setting("2", "CPU request of every other task")
    step_memory: str = setting("8Gi", "memory request of every other task")
    train_retries: int = setting(2, "retries of a failed training task (it resumes from its last checkpoint)")
    retry_backoff: str = setting("60s", "first wait; doubles on every further retry")
    minio_secret: str = setting("minio-credentials", "keys access-key, secret-key")
    mlflow_secret: str = setting("mlflow-credentials", "keys username, password")
    s3_endpoint: str = setting("http://minio.zhclip.svc.cluster.local:9000", "MinIO (S3) endpoint the tasks use")
    mlflow_uri: str = setting("http://mlflow.zhclip.svc.cluster.local:5000", "MLflow tracking server the tasks use")
    ray_address: str = setting("", "default of the pipeline parameter: '' trains with in-process Ray on the pod's GPUs")
    ray_storage: str = setting(
        "/tmp/ray_results",
        "Ray Train's storage inside the pod (in-process Ray); replaces train.storage_path in the pipeline",
    )
    index_catalog: str = setting(
        "s3://zhclip-index",
        "where the pipeline publishes the index of each gallery of search.galleries, as <catalog>/<name>: what "
        "infra's search Deployment follows ('': not published)",
    )

    def __post_init__(self):
        if self.gpus < 0 or self.train_retries < 0:
            raise ValueError("gpus and train_retries must be at least 0")


def pipeline_galleries(params: dict[str, Any]) -> dict[str, str]:
    """search.galleries as the pipeline's index tasks read them: name -> a split of the run's validated
    data (a gallery under dvc.yaml's data/validated) or a folder URI the tasks can read (s3://...)."""
    galleries = {}
    for name, path in config_from(SearchConfig, params, "search").galleries.items():
        if "://" in path:
            galleries[name] = path
        elif PurePosixPath(path).parent == VALIDATED_FOLDER:
            galleries[name] = PurePosixPath(path).name
        else:
            raise ZhclipError(
                f"params.yaml search.galleries.{name}: {path} is a local folder the pipeline's tasks cannot read; "
                f"name a split of {VALIDATED_FOLDER}/ or an s3:// folder"
            )
    return galleries


def pipeline_suite(params: dict[str, Any]) -> list[dict]:
    """benchmark.suite as the pipeline's benchmark tasks read it: a path under data/validated or data/raw
    becomes the same path in the run's validated or raw artifact ({validated}/..., {raw}/...), a URI
    stays as it is; `suite_on_artifacts` fills the artifacts' folders in on the task. A label file
    relative to its set moves with the set; one at an absolute local path is refused, as is any other
    local path: the pods cannot read this machine's files."""
    suite = []
    for dataset in suite_datasets(config_from(BenchmarkConfig, params, "benchmark").suite):
        where = f"params.yaml benchmark.suite {dataset.name}"
        if dataset.label_file.startswith("/"):
            raise ZhclipError(
                f"{where}: label_file {dataset.label_file} is a local file the pipeline's tasks cannot read; "
                "name it relative to the set's folder, or by an s3:// URI"
            )
        suite.append(asdict(replace(dataset, path=_in_artifacts(dataset.path, where))))
    return suite


def _in_artifacts(path: str, where: str) -> str:
    if "://" in path:
        return path
    posix = PurePosixPath(path)
    for folder, placeholder in ARTIFACT_ROOTS.items():
        if posix == folder or folder in posix.parents:
            return str(PurePosixPath(placeholder) / posix.relative_to(folder))
    raise ZhclipError(
        f"{where}: {path} is a local path the pipeline's tasks cannot read; name one under "
        f"{VALIDATED_FOLDER}/ or {RAW_FOLDER}/ (the run's own data), or an s3:// URI"
    )


def suite_on_artifacts(suite: list[dict], validated: str, raw: str) -> list[SuiteDataset]:
    """`pipeline_suite`'s entries with the run's artifact folders in place of {validated} and {raw}."""
    folders = {ARTIFACT_ROOTS[VALIDATED_FOLDER]: validated, ARTIFACT_ROOTS[RAW_FOLDER]: raw}
    located = []
    for entry in suite:
        path = entry["path"]
        # only a leading placeholder: a URI may hold braces of its own (s3://sets/{2024})
        root = next((p for p in folders if path == p or path.startswith(f"{p}/")), None)
        if root is None and "://" not in path:
            raise ZhclipError(
                f"benchmark_config suite {entry['name']}: {path} is neither in the run's data "
                f"({', '.join(folders)}) nor a URI; compile the pipeline from params.yaml (`zhclip pipeline compile`)"
            )
        located.append(SuiteDataset(**{**entry, "path": folders[root] + path[len(root) :] if root else path}))
    return located


def step_configs(params: dict[str, Any]) -> dict[str, dict]:
    """Each step's config from params.yaml, as plain dicts for pipeline parameters, and the galleries
    the index tasks build (`pipeline_galleries`)."""
    return {
        "galleries": pipeline_galleries(params),
        "start": asdict(config_from(StartConfig, params, "start")),
        "ingest": asdict(config_from(IngestConfig, params, "ingest")),
        "validate": asdict(config_from(ValidateConfig, params, "validate")),
        "stage1": asdict(stage_config(params, 1)),
        "stage2": asdict(stage_config(params, 2)),
        "evaluate": asdict(config_from(EvaluateConfig, params, "evaluate")),
        "zeroshot": asdict(config_from(ZeroshotConfig, params, "zeroshot")),
        "benchmark": {
            "suite": pipeline_suite(params),
            "batch_size": config_from(BenchmarkConfig, params, "benchmark").batch_size,
            "preset": config_from(ModelConfig, params, "model").preset,
        },
        "register": asdict(config_from(RegisterConfig, params, "register")),
        "index": {
            **asdict(config_from(IndexConfig, params, "index")),
            "alias": config_from(SearchConfig, params, "search").alias,
        },
        "object_store": asdict(config_from(ObjectStoreConfig, params, "object_store")),
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
