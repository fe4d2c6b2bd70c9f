"""The Kubeflow pipeline: ingest -> validate -> train stage 1 -> train stage 2 -> evaluate -> register.

Each component body only calls the step function from `components/` that the DVC stage calls too.
Defaults of every pipeline parameter come from params.yaml at compile time.
"""


import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kfp import compiler, dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from components.common import config_from
from components.evaluate import EvaluateConfig
from components.ingest import IngestConfig
from components.register import RegisterConfig
from components.train import TrainConfig
from components.validate import ValidateConfig

# The component image (built from infra/); the project and its locked dependencies are inside it.
IMAGE = os.environ.get("ZHCLIP_IMAGE", "zhclip:latest")


def _component(func):
    return dsl.component(func, base_image=IMAGE, install_kfp_package=False)


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
             init_model: Input[Model] = None):
    from components.common import build_config
    from components.train import TrainConfig, train

    result = train(prepared.path, model.path, build_config(TrainConfig, config, "pipeline parameter"), init_model.path if init_model else None)
    for key in ("steps", "first_loss", "final_loss", "samples_per_s"):
        summary.log_metric(key, result[key])


@_component
def evaluate_op(model: Input[Model], prepared: Input[Dataset], scores: Output[Metrics], report: Output[HTML],
                summary: Output[Markdown], files: Output[Artifact], config: dict):
    import shutil
    from pathlib import Path

    from components.common import build_config
    from components.evaluate import EvaluateConfig, evaluate

    result = evaluate(model.path, prepared.path, build_config(EvaluateConfig, config, "pipeline parameter"),
                      summary_path=scores.path, report_dir=files.path)
    for key, value in result.items():
        if isinstance(value, float):
            scores.log_metric(key, value)
    # The Kubeflow UI renders HTML and Markdown artifacts when the artifact file itself is the page.
    shutil.copy(Path(files.path) / "report.html", report.path)
    shutil.copy(Path(files.path) / "report.md", summary.path)


@_component
def register_op(model: Input[Model], scores: Input[Metrics], decision: Output[Metrics], config: dict) -> int:
    from components.common import build_config
    from components.register import RegisterConfig, register

    result = register(model.path, scores.path, build_config(RegisterConfig, config, "pipeline parameter"))
    decision.log_metric("version", result["version"])
    decision.log_metric("champion_version", result["champion_version"])
    return result["version"]


def step_configs(params: dict[str, Any]) -> dict[str, dict]:
    """Each step's config from params.yaml, as plain dicts for pipeline parameters."""
    return {
        "ingest": asdict(config_from(IngestConfig, params, "ingest")),
        "validate": asdict(config_from(ValidateConfig, params, "validate")),
        "stage1": asdict(TrainConfig.from_params(params, 1)),
        "stage2": asdict(TrainConfig.from_params(params, 2)),
        "evaluate": asdict(config_from(EvaluateConfig, params, "evaluate")),
        "register": asdict(config_from(RegisterConfig, params, "register")),
    }


def build_pipeline(params: dict[str, Any]):
    """The pipeline function, its parameter defaults taken from `params`."""
    defaults = step_configs(params)

    @dsl.pipeline(name="zhclip", description="Two-stage Chinese CLIP training, evaluation and registration.")
    def zhclip_pipeline(
        raw_uri: str,
        ingest_config: dict = defaults["ingest"],
        validate_config: dict = defaults["validate"],
        stage1_config: dict = defaults["stage1"],
        stage2_config: dict = defaults["stage2"],
        evaluate_config: dict = defaults["evaluate"],
        register_config: dict = defaults["register"],
    ):
        raw = dsl.importer(artifact_uri=raw_uri, artifact_class=Dataset, reimport=False)
        ingested = ingest_op(raw=raw.output, config=ingest_config)
        validated = validate_op(prepared=ingested.outputs["prepared"], config=validate_config).outputs["validated"]
        stage1 = train_op(prepared=validated, config=stage1_config)
        stage2 = train_op(prepared=validated, config=stage2_config, init_model=stage1.outputs["model"])
        for task in (stage1, stage2):
            task.set_caching_options(False)
        scored = evaluate_op(model=stage2.outputs["model"], prepared=validated, config=evaluate_config)
        register_op(model=stage2.outputs["model"], scores=scored.outputs["scores"], config=register_config)

    return zhclip_pipeline


def compile_pipeline(out: str | Path, params: dict[str, Any]) -> Path:
    """Write the pipeline YAML (Kubeflow Pipelines v2 IR)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(params), str(out))
    return out


def run_local(raw_dir: str | Path, root: str | Path, params: dict[str, Any]) -> dict[str, Any]:
    """Run the whole pipeline in subprocesses of this environment with kfp.local; returns the outputs."""
    from kfp import local

    from components.common import ZhclipError

    raw_dir = Path(raw_dir).resolve()
    if not (raw_dir / "train_imgs.tsv").is_file():
        raise ZhclipError(f"{raw_dir} has no train_imgs.tsv; run `zhclip demo-data --out {raw_dir}` first")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(Path(root).resolve()))
    try:
        build_pipeline(params)(raw_uri=str(raw_dir))
    except RuntimeError as err:
        raise ZhclipError(f"local pipeline run failed ({err}); the failing task's log is printed above") from err
    return _local_outputs(Path(root).resolve())


def _task_metrics(run_dir: Path, task: str, artifact: str) -> dict[str, Any]:
    executor_output = json.loads((run_dir / task / "executor_output.json").read_text(encoding="utf-8"))
    return executor_output["artifacts"][artifact]["artifacts"][0]["metadata"]


def _local_outputs(root: Path) -> dict[str, Any]:
    """The newest local run's folder and the metrics its evaluate and register tasks logged."""
    run_dir = max(root.glob("zhclip-*"), key=lambda path: path.stat().st_mtime)
    return {"run_dir": str(run_dir), "scores": _task_metrics(run_dir, "evaluate-op", "scores"),
            "register": _task_metrics(run_dir, "register-op", "decision")}
