"""The pipeline's steps as KFP components: each body only calls the step function from `components/` that
the DVC stage calls too (KFP ships a component's source, so its imports live inside it)."""

import os
from collections.abc import Callable

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output
from kfp.dsl.python_component import PythonComponent

# The component image (built from infra/Dockerfile); the project and its locked dependencies are inside
# it. Read when this module is imported, since the component decorators below bake it in.
IMAGE = os.environ.get("ZHCLIP_IMAGE", "zhclip:latest")


def _component(func: Callable) -> PythonComponent:
    # a task's arguments are checked by KFP when the pipeline is built, not by the type checker
    component = dsl.component(func, base_image=IMAGE, install_kfp_package=False)
    assert isinstance(component, PythonComponent)  # a partial only when called without func
    return component


@_component
def ingest_op(raw: Input[Dataset], prepared: Output[Dataset], summary: Output[Metrics], config: dict):
    from zhclip.components.core.settings import build_config
    from zhclip.components.data.ingest import IngestConfig, ingest

    result = ingest(raw.path, prepared.path, build_config(IngestConfig, config, "pipeline parameter"))
    for split, counts in result["splits"].items():
        summary.log_metric(f"{split}_pairs", counts["pairs"])
        summary.log_metric(f"{split}_quarantined", counts["quarantined"])


@_component
def validate_op(
    prepared: Input[Dataset],
    validated: Output[Dataset],
    quarantine: Output[Dataset],
    data_docs: Output[Artifact],
    report: Output[Metrics],
    config: dict,
):
    from zhclip.components.core.settings import build_config
    from zhclip.components.data.validate import ValidateConfig, validate

    result = validate(
        prepared.path,
        validated.path,
        build_config(ValidateConfig, config, "pipeline parameter"),
        quarantine_path=quarantine.path,
        docs_dir=data_docs.path,
    )
    for split, outcome in result["splits"].items():
        report.log_metric(f"{split}_rows_kept", outcome["rows_out"])
        report.log_metric(f"{split}_rows_quarantined", outcome["rows_quarantined"])


@_component
def train_op(
    prepared: Input[Dataset],
    model: Output[Model],
    summary: Output[Metrics],
    config: dict,
    init_model: Input[Model] = None,  # pyright: ignore[reportArgumentType]  # KFP's form of an optional input
    ray_address: str = "",
):
    import os

    from zhclip.components.core.settings import build_config
    from zhclip.components.training.config import TrainConfig
    from zhclip.components.training.runner import train

    data, init = prepared.path, init_model.path if init_model else None
    if ray_address:  # join this KubeRay cluster instead of starting Ray on the pod's own GPUs; its
        os.environ["RAY_ADDRESS"] = ray_address  # workers read the artifacts from the object store
        data, init = prepared.uri, init_model.uri if init_model else None
    result = train(data, model.path, build_config(TrainConfig, config, "pipeline parameter"), init)
    for key in ("steps", "first_loss", "final_loss", "samples_per_s"):
        summary.log_metric(key, result[key])


@_component
def start_op(model: Output[Model], summary: Output[Metrics], config: dict) -> str:
    from zhclip.components.core.settings import build_config
    from zhclip.components.training.start import StartConfig, prepare_start, recipe_name

    # The starting weights are object-store URIs (s3://...) in config's vision/text/checkpoint, read from MinIO.
    settings = build_config(StartConfig, config, "pipeline parameter start_config")
    result = prepare_start(model.path, settings)
    summary.log_metric("projection_dim", result["projection_dim"])
    return recipe_name(settings.stages)  # which branch of the pipeline trains: two-stage or fine-tune


@_component
def evaluate_op(
    model: Input[Model],
    prepared: Input[Dataset],
    scores: Output[Metrics],
    report: Output[HTML],
    summary: Output[Markdown],
    files: Output[Artifact],
    config: dict,
    label: str,
    init_scores: Input[Metrics] = None,  # pyright: ignore[reportArgumentType]  # KFP's form of an optional input
):
    import shutil
    from pathlib import Path

    from zhclip.components.core.settings import build_config
    from zhclip.components.evaluation.evaluate import EvaluateConfig, evaluate

    result = evaluate(
        model.path,
        prepared.path,
        build_config(EvaluateConfig, config, "pipeline parameter"),
        summary_path=scores.path,
        report_dir=files.path,
        label=label,
        init_metrics=init_scores.path if init_scores else None,
    )
    for key, value in result.items():
        if isinstance(value, float):
            scores.log_metric(key, value)
    # The Kubeflow UI renders HTML and Markdown artifacts when the artifact file itself is the page.
    shutil.copy(Path(files.path) / "report.html", report.path)
    shutil.copy(Path(files.path) / "report.md", summary.path)


@_component
def zeroshot_op(
    model: Input[Model],
    raw: Input[Dataset],
    image_set: str,
    scores: Output[Metrics],
    report: Output[HTML],
    summary: Output[Markdown],
    files: Output[Artifact],
    config: dict,
):
    import shutil
    from pathlib import Path

    from zhclip.components.core.settings import build_config
    from zhclip.components.evaluation.zeroshot import ZeroshotConfig, zeroshot

    result = zeroshot(
        model.path,
        Path(raw.path) / "zeroshot" / image_set,
        build_config(ZeroshotConfig, config, "pipeline parameter"),
        summary_path=scores.path,
        predictions_path=Path(files.path) / "predictions.csv",
        report_dir=files.path,
    )
    for key in ("top1", "top5", "chance_top1"):
        scores.log_metric(key, result[key])
    shutil.copy(Path(files.path) / "report.html", report.path)
    shutil.copy(Path(files.path) / "report.md", summary.path)


@_component
def benchmark_op(
    model: Input[Model],
    raw: Input[Dataset],
    validated: Input[Dataset],
    results: Output[Artifact],
    config: dict,
    label: str,
):
    """Score `model` on every dataset of the suite, as results/<label>/<dataset>.json (dvc.yaml's layout).
    One task a model, not a task a dataset: the paper's 24 datasets would be 24 pods for minutes of work each."""
    from pathlib import Path

    from zhclip.components.evaluation.benchmark import benchmark
    from zhclip.workflows.config import suite_on_artifacts

    batch_size = int(config["batch_size"])  # a pipeline parameter's numbers arrive as floats (protobuf's Struct)
    for dataset in suite_on_artifacts(config["suite"], validated.path, raw.path):
        benchmark(model.path, dataset, batch_size, Path(results.path) / label / f"{dataset.name}.json")


@_component
def suite_op(
    start_results: Input[Artifact],
    final_results: Input[Artifact],
    summary: Output[Metrics],
    report: Output[HTML],
    files: Output[Artifact],
    config: dict,
    final: str,
):
    """The suite's table of the start and the final model, beside Chinese-CLIP's published figures."""
    import shutil
    from pathlib import Path

    from zhclip.components.evaluation.suite import write_suite
    from zhclip.workflows.config import suite_on_artifacts

    results = Path(files.path) / "results"
    for model in (start_results, final_results):
        shutil.copytree(model.path, results, dirs_exist_ok=True)
    datasets = suite_on_artifacts(config["suite"], "", "")  # names and tasks: the paths are not read
    result = write_suite(results, ["start", final], datasets, config["preset"], summary.path, files.path)
    for model, figures in result["models"].items():
        summary.log_metric(f"{model}_suite_mean", figures["suite_mean"])
    shutil.copy(Path(files.path) / "report.html", report.path)


@_component
def register_op(
    model: Input[Model],
    scores: Input[Metrics],
    data: Input[Dataset],
    decision: Output[Metrics],
    card: Output[Markdown],
    config: dict,
    suite: Input[Metrics] = None,  # pyright: ignore[reportArgumentType]  # KFP's form of an optional input
) -> int:
    from pathlib import Path

    from zhclip.components.core.settings import build_config
    from zhclip.components.registry.register import RegisterConfig, register

    settings = build_config(RegisterConfig, config, "pipeline parameter")
    result = register(model.path, scores.path, settings, data_dir=data.path, suite_path=suite.path if suite else None)
    decision.log_metric("version", result["version"])
    decision.log_metric("champion_version", result["champion_version"])
    Path(card.path).write_text(
        f"# {settings.model_name} version {result['version']}\n\n"
        f"| | |\n|---|---|\n| {settings.metric} | {result['candidate_value']} |\n"
        f"| its start's {settings.metric} | {result.get('start_value')} |\n"
        f"| promoted to champion | {result['promoted']} |\n| rule that decided | {result.get('rule')} |\n"
        f"| decision | {result['decision']} |\n| champion version | {result['champion_version']} |\n"
        f"| already registered (same weights) | {result['already_registered']} |\n\n"
        f'Pull it: `mlflow.pyfunc.load_model("models:/{settings.model_name}@champion")`\n',
        encoding="utf-8",
    )
    return result["version"]


@_component
def index_op(
    validated: Input[Dataset],
    index: Output[Artifact],
    summary: Output[Metrics],
    gallery: str,
    publish_uri: str,
    config: dict,
    register_config: dict,
):
    """Index `gallery` (a split of `validated`, or a folder URI) with the champion; publish it to `publish_uri`."""
    from zhclip.components.core.settings import build_config
    from zhclip.components.registry.register import RegisterConfig
    from zhclip.components.search.index_build import IndexConfig, build_index
    from zhclip.components.search.index_store import publish_index

    settings = dict(config)
    alias = settings.pop("alias")
    registry = build_config(RegisterConfig, register_config, "pipeline parameter register_config")
    # The gallery by its URI (s3://... on a cluster), so each image's location is one the search Deployment can read.
    result = build_index(
        gallery if "://" in gallery else f"{validated.uri.rstrip('/')}/{gallery}",
        index.path,
        f"models:/{registry.model_name}@{alias}",
        build_config(IndexConfig, settings, "pipeline parameter index_config"),
        registry.tracking_uri or None,
    )
    summary.log_metric("images", result["images"])
    summary.log_metric("rejected", result["rejected"])
    if publish_uri:  # the index catalog the search Deployment follows, beside this run's own copy in the pipeline root
        publish_index(index.path, publish_uri, result["model"]["weights_hash"])
