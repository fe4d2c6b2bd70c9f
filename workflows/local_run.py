"""The whole pipeline run on this machine with kfp.local (no cluster), for tests and a first look."""

import json
from pathlib import Path
from typing import Any

from zhclip.components.core.errors import ZhclipError
from zhclip.workflows.config import step_configs
from zhclip.workflows.pipeline import build_pipeline


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
        build_pipeline(configs)(raw_uri=str(raw_dir))
    except RuntimeError as err:
        raise ZhclipError(f"local pipeline run failed ({err}); the failing task's log is printed above") from err
    return _local_outputs(Path(root).resolve())


def _task_metrics(run_dir: Path, task: str, artifact: str) -> dict[str, Any]:
    executor_output = json.loads((run_dir / task / "executor_output.json").read_text(encoding="utf-8"))
    return executor_output["artifacts"][artifact]["artifacts"][0]["metadata"]


def _local_outputs(root: Path) -> dict[str, Any]:
    """The newest local run's folder and the metrics its tasks logged: the final model's evaluation
    (`scores`), the start's (`start_scores`), zero-shot per model, the benchmark suite's summary, the
    registration and the index (of the branch that ran)."""
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
    indexed, suite = ran("index-op*"), ran("suite-op*")
    return {
        "run_dir": str(run_dir),
        "scores": _task_metrics(run_dir, evaluations["stage2"].name, "scores"),
        "start_scores": _task_metrics(run_dir, evaluations["start"].name, "scores"),
        "zeroshot_start": zeroshot["start"],
        "zeroshot": zeroshot["final"],
        "suite": json.loads((suite[0] / "summary").read_text(encoding="utf-8")) if suite else None,
        "register": _task_metrics(run_dir, registered.name, "decision"),
        "index": _task_metrics(run_dir, indexed[0].name, "summary") if indexed else None,
    }
