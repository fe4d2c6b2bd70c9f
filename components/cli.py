"""The `zhclip` command line: one sub-command per pipeline step, each a thin shell over its function.

Every command reads its defaults from params.yaml (`--params`), and explicit flags win. Problems with
input or setup end with `error: ...` and exit status 2, never a traceback.
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from zhclip.components.core.errors import ZhclipError
from zhclip.components.core.settings import (
    apply_settings,
    config_from,
    load_params,
    parse_settings,
    resolved_params,
    section_help,
    settings_in_source,
)

app = typer.Typer(help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
pipeline_app = typer.Typer(help="Compile, run locally or submit the Kubeflow pipeline.", no_args_is_help=True)
app.add_typer(pipeline_app, name="pipeline")
model_app = typer.Typer(help="Import and export models.", no_args_is_help=True)
app.add_typer(model_app, name="model")

ParamsOption = typer.Option(
    Path("params.yaml"), "--params", help="The project's settings file (docs/configuration.md)."
)
DefaultsOption = typer.Option(False, "--defaults", help="Use the built-in defaults instead of a params file.")
SetOption = typer.Option(
    [],
    "--set",
    help="Any setting for this run, SECTION.KEY=VALUE (VALUE read as YAML: 3, true, [a, b], {k: v}); repeatable.",
)


def _option(section: str, name: str, switch: bool = False) -> Any:  # Any, as typer.Option: a parameter's default
    """An option that overrides setting `name` of params.yaml section `section`; its help is the
    setting's own; `switch`: a yes/no setting, given as --name or --no-name."""
    text = section_help(section, name)
    flag = f"--{name.replace('_', '-')}"
    return typer.Option(
        None,
        f"{flag}/--no-{flag[2:]}" if switch else flag,
        help=f"{text[:1].upper()}{text[1:]} (params.yaml {section}.{name}).",
    )


# The settings a flag can carry; a mapping (start.stages, search.galleries, ...) is set with --set.
FLAG_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "list[str]": list[str]}


def _setting_flags(sections: tuple[str, ...], own: set[str]) -> dict[str, tuple[str, inspect.Parameter]]:
    """One keyword parameter per flag-typed setting of `sections` (its own, not shared ones) that the
    command does not declare itself (`own`: its parameters, e.g. submit's --ray-address, a run
    parameter): the Python name (section__key) -> (section, the parameter typer reads)."""
    flags: dict[str, tuple[str, inspect.Parameter]] = {}
    for section in sections:
        for key, found in settings_in_source(section).items():
            if found.shared_from or not found.in_params or found.annotation not in FLAG_TYPES or key in own:
                continue
            taken = [name for name in flags if name.split("__", 1)[1] == key]
            assert not taken, f"--{key} would set both {section}.{key} and {taken[0].replace('__', '.')}"
            name = f"{section}__{key}"
            parameter = inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=_option(section, key, switch=found.annotation == "bool"),
                annotation=FLAG_TYPES[found.annotation] | None,
            )
            flags[name] = (section, parameter)
    return flags


def with_settings(*sections: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """A command that reads params.yaml (--params FILE, or --defaults), with a flag for each setting
    of `sections` (named and explained by the setting itself, so a new setting needs no edit here)
    and --set SECTION.KEY=VALUE for any setting (mappings too). The command gets `settings`: the
    params with the flags applied; a flag of a section that stages overlay (train) wins over them."""

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        own = [param for name, param in inspect.signature(command).parameters.items() if name != "settings"]
        flags = _setting_flags(sections, {param.name for param in own})
        extra = [
            inspect.Parameter("set_", inspect.Parameter.KEYWORD_ONLY, default=SetOption, annotation=list[str]),
            inspect.Parameter("params", inspect.Parameter.KEYWORD_ONLY, default=ParamsOption, annotation=Path),
            inspect.Parameter("defaults", inspect.Parameter.KEYWORD_ONLY, default=DefaultsOption, annotation=bool),
        ]

        @functools.wraps(command)
        def run(**given: Any) -> None:
            overrides = parse_settings(given.pop("set_"))
            for name, (section, _) in flags.items():
                value = given.pop(name)
                if value is not None:
                    overrides.setdefault(section, {})[name.split("__", 1)[1]] = value
            command(settings=_params(given.pop("params"), given.pop("defaults"), overrides), **given)

        run.__signature__ = inspect.Signature([*own, *(param for _, param in flags.values()), *extra])  # type: ignore[attr-defined]
        return run

    return decorate


def _print_version(asked: bool) -> None:
    if asked:
        from importlib.metadata import version

        typer.echo(f"zhclip {version('zhclip')}")
        raise typer.Exit()


@app.callback()
def _global_options(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print zhclip's version and exit."
    ),
) -> None:
    """The options before any command."""


def _params(path: Path, defaults: bool, overrides: dict[str, dict] | None = None) -> dict:
    """The settings of the command (the params file, or none, with `overrides` on top); their
    `object_store` section becomes this process's retry policy."""
    from zhclip.components.core.storage import ObjectStoreConfig, use_policy

    params = apply_settings(load_params(None if defaults else path), overrides or {})
    use_policy(config_from(ObjectStoreConfig, params, "object_store"))
    return params


def _echo_json(summary: dict) -> None:
    typer.echo(json.dumps(summary, indent=2, ensure_ascii=False, default=str))


def _finish(summary: dict, summary_path: Path | None, line: str) -> None:
    """The step's result: one line for people when the JSON went to a file (as under `dvc repro`), else the JSON."""
    if summary_path:
        typer.echo(f"{line}  [summary: {summary_path}]")
    else:
        _echo_json(summary)


@app.command("init")
def init_command(
    folder: Path = typer.Argument(
        ..., help="The new project's folder (created; must not hold a dvc.yaml or params.yaml)."
    ),
    raw: str = typer.Option(
        ...,
        help="Your raw splits: a folder or s3:// prefix with train, valid and test in one format each "
        "(docs/own-data.md). A folder inside FOLDER is named relative to it.",
    ),
    set_: list[str] = typer.Option(
        [],
        "--set",
        help="A setting to start from, section.key=value (value read as YAML), e.g. --set model.preset=tiny. "
        "Repeat for several.",
    ),
) -> None:
    """Write a DVC project for your own data: the pipeline without the demo's stages, and params.yaml
    with the settings to choose (start weights, preset, model name, zero-shot sets, galleries) first."""
    from zhclip.components.project.scaffold import CHOICES, init_project

    made = init_project(folder, raw, set_)
    typer.echo(f"wrote {made['project']}: dvc.yaml ({', '.join(made['stages'])}), params.yaml, weights/README.md")
    typer.echo(f"raw data {made['raw']}:")
    for split, found in made["splits"].items():
        typer.echo(f"  {split:5}  {found}")
    typer.echo("choose before `dvc repro` (first in params.yaml):")
    for section, (keys, why) in CHOICES.items():
        chosen = ", ".join(
            f"{section}.{key}: {json.dumps(made['choices'][f'{section}.{key}'], ensure_ascii=False)}" for key in keys
        )
        typer.echo(f"  {chosen}   # {why}")
    typer.echo(f"then: cd {made['project']} && dvc repro")


@app.command("demo-data")
@with_settings("demo_data")
def demo_data_command(
    out: Path = typer.Option(Path("data/raw"), help="Folder for the Chinese-CLIP-format splits."),
    summary: Path | None = typer.Option(None, help="Write the JSON summary here."),
    *,
    settings: dict,
) -> None:
    """Generate the bundled demo dataset: coloured shapes with Chinese captions, train/valid/test."""
    from zhclip.components.demo.data import DemoDataConfig, generate_demo_data

    result = generate_demo_data(out, config_from(DemoDataConfig, settings, "demo_data"), summary)
    _finish(
        result,
        summary,
        f"demo data in {out}: "
        + ", ".join(
            f"{split} {counts['images']} images / {counts['texts']} captions"
            for split, counts in result["splits"].items()
        ),
    )


@app.command("demo-towers")
@with_settings("demo_towers", "model")
def demo_towers_command(
    corpus: Path = typer.Option(Path("data/raw/pretrain"), help="The pretraining corpus `zhclip demo-data` writes."),
    out: Path = typer.Option(Path("weights/demo"), help="Folder for vision/ (CLIPModel) and text/ (BertForMaskedLM)."),
    summary: Path | None = typer.Option(None, help="Write the JSON summary here."),
    *,
    settings: dict,
) -> None:
    """Pretrain the demo's stand-ins for OpenAI CLIP (English captions) and Chinese RoBERTa (masked LM).

    The paper starts from those; no download is possible here, so the demo makes small ones the same
    way, and `zhclip start` loads them exactly as it loads real checkpoints.
    """
    from zhclip.components.demo.towers import DemoTowersConfig, pretrain_demo_towers

    config = config_from(DemoTowersConfig, settings, "demo_towers")
    result = pretrain_demo_towers(corpus, out, config, summary)
    typer.echo(
        f"demo towers in {out}: English CLIP loss {result['vision']['first_loss']} -> "
        f"{result['vision']['final_loss']}, "
        f"Chinese BERT masked-LM loss {result['text']['first_loss']} -> {result['text']['final_loss']}"
    )


@app.command()
@with_settings("ingest", "spill")
def ingest(
    raw: Path = typer.Option(
        Path("data/raw"),
        help="Folder with {split}_imgs.tsv + {split}_texts.jsonl, {split}.csv + images, or img2dataset "
        "shards in {split}/ (docs/own-data.md).",
    ),
    out: Path = typer.Option(Path("data/prepared"), help="Folder for Parquet shards and quarantine files."),
    summary: Path | None = typer.Option(None, help="Write the JSON summary here."),
    *,
    settings: dict,
) -> None:
    """Decode, normalise and shard the raw splits; malformed rows go to OUT/quarantine/ with a reason."""
    from zhclip.components.data.ingest import IngestConfig
    from zhclip.components.data.ingest import ingest as run

    result = run(raw, out, config_from(IngestConfig, settings, "ingest"), summary)
    _finish(
        result,
        summary,
        f"ingest into {out}: "
        + ", ".join(f"{split} {counts['pairs']} pairs" for split, counts in result["splits"].items()),
    )


@app.command()
@with_settings("validate", "spill")
def validate(
    data: Path = typer.Option(Path("data/prepared"), help="Prepared data from `zhclip ingest`."),
    out: Path = typer.Option(Path("data/validated"), help="Folder for the rows that pass (what training reads)."),
    report: Path | None = typer.Option(None, help="Write the JSON summary (per-expectation counts) here."),
    quarantine: Path = typer.Option(
        Path("reports/validation_quarantine.jsonl"), help="Where rejected rows go, with reasons."
    ),
    docs: Path | None = typer.Option(None, help="Render Great Expectations Data Docs (HTML) into this folder."),
    *,
    settings: dict,
) -> None:
    """Great Expectations gate: quarantines bad rows, or fails naming each failed expectation with example ids."""
    from zhclip.components.data.validate import ValidateConfig
    from zhclip.components.data.validate import validate as run

    config = config_from(ValidateConfig, settings, "validate")
    result = run(data, out, config, report, quarantine, docs)
    counts = ", ".join(f"{split} {s['rows_out']}/{s['rows_in']} rows kept" for split, s in result["splits"].items())
    typer.echo(f"validation passed: {counts}; quarantine: {result['quarantine']}")


def _stage_number(stage: str) -> int:
    number = stage.removeprefix("stage")
    if number not in ("1", "2"):
        raise ZhclipError(f"--stage {stage!r}: give 1 or 2 (stage1, stage2 also work, as dvc.yaml passes them)")
    return int(number)


@app.command()
@with_settings("start", "model")
def start(
    out: Path = typer.Option(Path("models/start"), help="Folder for the starting model (Hugging Face format)."),
    summary: Path | None = typer.Option(None, help="Write the JSON summary here."),
    *,
    settings: dict,
) -> None:
    """Build the model training starts from: random towers, pretrained towers, or a released checkpoint.

    The pipeline evaluates it as the baseline every stage must beat; params.yaml section `start` also
    says which stages run ({stage1: start, stage2: stage1}, or {stage2: start} to fine-tune).
    """
    from zhclip.components.training.start import StartConfig, prepare_start

    config = config_from(StartConfig, settings, "start")
    result = prepare_start(out, config, summary)
    _finish(
        result,
        summary,
        f"start ({result['source']}{': ' + ', '.join(result['weights'].values()) if result['weights'] else ''}) "
        f"written to {out}",
    )


@app.command()
@with_settings("train", "model", "mlflow")
def train(
    stage: str = typer.Option(..., help="1 (or stage1): image tower locked (LiT); 2 (or stage2): both towers learn."),
    data: Path = typer.Option(
        Path("data/validated"), help="The rows that passed `zhclip validate` (what `dvc repro` trains on)."
    ),
    out: Path = typer.Option(..., help="Folder for the trained Hugging Face model."),
    init: Path | None = typer.Option(
        None,
        help="Model folder to start from: `zhclip start`'s, or stage 1's for stage 2 "
        "(without it stage 1 starts from random towers).",
    ),
    summary: Path | None = typer.Option(None, help="Write the JSON summary here."),
    history: Path | None = typer.Option(None, help="Write the per-step loss and learning rate as CSV here."),
    *,
    settings: dict,
) -> None:
    """Train one stage with Ray Train (in-process Ray, or the cluster at $RAY_ADDRESS).

    Checkpoints go to the storage path every --checkpoint-every steps; re-running an interrupted
    stage with the same settings and data resumes from its last checkpoint. The stage is tracked as
    an MLflow run (params, per-step loss/lr/logit scale/speed, validation recall) under the
    pipeline's parent run. All settings: params.yaml sections train and stage1/stage2.
    """
    from zhclip.components.training.config import stage_config
    from zhclip.components.training.runner import train as run

    config = stage_config(settings, _stage_number(stage))
    result = run(data, out, config, init, summary, history)
    _finish(result, summary, f"stage {result['stage']} model in {out}")


@app.command()
@with_settings("evaluate")
def evaluate(
    model: Path | None = typer.Option(
        None, help="Trained model folder (or score feature files instead: --image-feats, --text-feats, --annotations)."
    ),
    data: Path = typer.Option(
        Path("data/validated"), help="The rows that passed `zhclip validate` (with --model; what `dvc repro` scores)."
    ),
    image_feats: Path | None = typer.Option(
        None, help='Image features in Chinese-CLIP\'s jsonl ({"image_id", "feature"}).'
    ),
    text_feats: Path | None = typer.Option(
        None, help='Text features in Chinese-CLIP\'s jsonl ({"text_id", "feature"}).'
    ),
    annotations: Path | None = typer.Option(
        None, help='Positives per text ({"text_id", "image_ids"} lines, e.g. test_texts.jsonl).'
    ),
    out: Path | None = typer.Option(None, help="Write the metrics JSON here."),
    plots: Path | None = typer.Option(
        None, help="Write recall@k (k=1..10, both directions) as CSV here, for `dvc plots`."
    ),
    report_dir: Path | None = typer.Option(
        None, help="Write report.html/.md and Chinese-CLIP's prediction and score files here."
    ),
    init_metrics: Path | None = typer.Option(
        None,
        help="The evaluation JSON of the model this one was trained from: "
        "the summary and report then show the start, every stage and the gain.",
    ),
    label: str | None = typer.Option(None, help="The model's name in that comparison (default: its folder's name)."),
    *,
    settings: dict,
) -> None:
    """Text-to-image and image-to-text recall@1/5/10 and mean recall (percent), with the chance level."""
    from zhclip.components.evaluation.evaluate import EvaluateConfig, evaluate_features
    from zhclip.components.evaluation.evaluate import evaluate as run

    config = config_from(EvaluateConfig, settings, "evaluate")
    feature_files = (image_feats, text_feats, annotations)
    if model and any(feature_files):
        raise ZhclipError("give either --model or --image-feats/--text-feats/--annotations, not both")
    if model:
        result = run(model, data, config, out, plots, report_dir, init_metrics=init_metrics, label=label)
        gain = f", {result['gain_over_start']:+.2f} over the start" if "gain_over_start" in result else ""
        _finish(
            result,
            out,
            f"{result['model']}: {result['split']} mean recall {result['mean_recall']:.2f} "
            f"(chance {result['chance_mean_recall']:.2f}){gain}",
        )
    elif image_feats and text_feats and annotations:  # all three feature files given
        _echo_json(evaluate_features(image_feats, text_feats, annotations, config, out, plots, report_dir))
    else:
        raise ZhclipError("give --model, or all of --image-feats, --text-feats and --annotations")


@app.command()
@with_settings("zeroshot")
def zeroshot(
    model: Path = typer.Option(..., help="Trained model folder."),
    images: str = typer.Option(
        ...,
        help="Image set, a folder or s3:// prefix: ELEVATER (label_cn.txt + test/000/, 001/, ...), class folders "
        "with a label file (--set zeroshot.label_file=...), or <images>/<class name>/<image files>.",
    ),
    out: Path | None = typer.Option(None, help="Write the metrics JSON (top-1, top-5, per-class accuracy) here."),
    predictions: Path | None = typer.Option(
        None, help="Write image, actual, predicted as CSV here (DVC confusion plot)."
    ),
    report_dir: Path | None = typer.Option(
        None, help="Write report.html/.md (accuracy, confusion matrix, examples) here."
    ),
    *,
    settings: dict,
) -> None:
    """Zero-shot classification with Chinese prompt ensembles: top-1/top-5 and per-class accuracy, confusion matrix."""
    from zhclip.components.evaluation.zeroshot import ZeroshotConfig
    from zhclip.components.evaluation.zeroshot import zeroshot as run

    config = config_from(ZeroshotConfig, settings, "zeroshot")
    result = run(model, images, config, out, predictions, report_dir)
    _finish(
        result,
        out,
        f"zero-shot {result['dataset']} with {model}: top-1 {result['top1']:.2f} %, top-5 {result['top5']:.2f} % "
        f"(chance {result['chance_top1']:.2f} %)",
    )


@app.command()
@with_settings("benchmark", "mlflow")
def benchmark(
    model: str = typer.Option(
        ...,
        help="Model folder, or a registered version (models:/NAME/VERSION or models:/NAME@ALIAS): its "
        "figures are then logged on the version's MLflow run, where the promotion gate reads a champion's.",
    ),
    dataset: str | None = typer.Option(
        None, help="A dataset of benchmark.suite, by name (a registered version: default every one)."
    ),
    name: str | None = typer.Option(None, help="Instead of --dataset, the dataset itself: its name ..."),
    task: str | None = typer.Option(None, help="... its task: retrieval or zeroshot ..."),
    path: str | None = typer.Option(None, help="... and its folder or s3:// prefix (dvc.yaml passes all three)."),
    split: str = typer.Option("test", help="Retrieval: the split's files; zero-shot: the folder of the images."),
    label_file: str = typer.Option("", "--label-file", "--label_file", help="Zero-shot: the class names' file."),
    template_set: str = typer.Option(
        "", "--template-set", "--template_set", help="Zero-shot: one of Chinese-CLIP's template lists."
    ),
    published: str = typer.Option("", help="The dataset's name in Chinese-CLIP's published tables."),
    out: Path | None = typer.Option(None, help="Write the figures as JSON here."),
    *,
    settings: dict,
) -> None:
    """Score a model on one dataset of the benchmark suite: retrieval R@1/5/10 and mean recall, or
    zero-shot top-1/top-5 (`zhclip suite` gathers them into the suite's table)."""
    from zhclip.components.evaluation.benchmark import benchmark as run
    from zhclip.components.evaluation.suite_config import BenchmarkConfig, suite_datasets

    config = config_from(BenchmarkConfig, settings, "benchmark")
    if model.startswith("models:/") and not (dataset or name):
        _benchmark_version(model, suite_datasets(config.suite), config.batch_size, settings, out)
        return
    if dataset and not (name or task or path):
        chosen = config.dataset(dataset)
    elif name and task and path and not dataset:
        entry = {"name": name, "task": task, "path": path, "split": split}
        entry |= {"label_file": label_file, "template_set": template_set, "published": published}
        (chosen,) = suite_datasets([entry])
    else:
        raise ZhclipError("give --dataset NAME (of benchmark.suite), or --name, --task and --path")
    if model.startswith("models:/"):
        _benchmark_version(model, [chosen], config.batch_size, settings, out)
        return
    result = run(model, chosen, config.batch_size, out)
    figures = "mean recall {mean_recall:.2f} %" if chosen.task == "retrieval" else "top-1 {top1:.2f} %"
    _finish(result, out, f"benchmark {chosen.name} with {model}: " + figures.format(**result))


def _benchmark_version(uri: str, datasets: list, batch_size: int, settings: dict, out: Path | None) -> None:
    from zhclip.components.core.summaries import write_summary
    from zhclip.components.core.tracking import MlflowConfig
    from zhclip.components.registry.version_benchmark import benchmark_version

    tracking = config_from(MlflowConfig, settings, "mlflow").tracking_uri
    result = benchmark_version(uri, datasets, batch_size, tracking)
    if out:
        write_summary(out, result)
    scores = ", ".join(f"{name} {figures['score']:.2f}" for name, figures in result["datasets"].items())
    _finish(result, out, f"benchmark of {uri} (version {result['version']}, logged on its run): {scores}")


@app.command()
@with_settings("benchmark", "model")
def suite(
    results_dir: Path = typer.Option(
        Path("metrics/benchmark"), "--results", help="The folder of `zhclip benchmark`'s results."
    ),
    out: Path | None = typer.Option(None, help="Write the suite's figures as JSON here (a DVC metrics file)."),
    report_dir: Path | None = typer.Option(None, help="Write report.html/.md with the suite's table here."),
    *,
    settings: dict,
) -> None:
    """The benchmark suite's table: every model of benchmark.models on every dataset, the suite's means,
    and Chinese-CLIP's published figures for the same model size (model.preset) beside them."""
    from zhclip.components.core.architecture import ModelConfig
    from zhclip.components.evaluation.suite import published_note, write_suite
    from zhclip.components.evaluation.suite_config import BenchmarkConfig, suite_datasets

    config = config_from(BenchmarkConfig, settings, "benchmark")
    datasets = suite_datasets(config.suite)
    preset = config_from(ModelConfig, settings, "model").preset
    summary = write_suite(results_dir, config.models, datasets, preset, out, report_dir)
    means = ", ".join(f"{model} {figures['suite_mean']:.2f}" for model, figures in summary["models"].items())
    line = f"benchmark suite of {len(datasets)} datasets, mean score: {means}; {published_note(summary)}"
    _finish(summary, out, line)


@app.command()
@with_settings("register", "mlflow")
def register(
    model: Path = typer.Option(..., help="Trained model folder."),
    metrics: Path = typer.Option(..., help="Metrics JSON from `zhclip evaluate`."),
    summary: Path | None = typer.Option(None, help="Write the JSON summary here."),
    log_summary: list[Path] = typer.Option(
        [], help="An earlier step's JSON summary to attach to the MLflow run (repeatable)."
    ),
    train_summary: Path | None = typer.Option(
        None, help="Stage 2's training summary; its MLflow runs become lineage tags."
    ),
    data: Path | None = typer.Option(
        None, help="The data training read (e.g. data/validated), recorded by its DVC hash."
    ),
    suite_summary: Path | None = typer.Option(
        None,
        "--suite",
        help="The benchmark suite's summary (`zhclip suite`): its figures go on the version, and no dataset may "
        "fall more than register.suite_margin below the champion or below the start.",
    ),
    *,
    settings: dict,
) -> None:
    """Log an MLflow pyfunc and register a version (alias challenger); it becomes champion when it is no worse
    than its start and the champion (on every dataset of the suite, given one).

    Lineage goes into version tags; a checkpoint registered before keeps its version (no duplicate).
    """
    from zhclip.components.registry.register import RegisterConfig
    from zhclip.components.registry.register import register as run

    config = config_from(RegisterConfig, settings, "register")
    result = run(
        model, metrics, config, resolved_params(settings), summary, log_summary, train_summary, data, suite_summary
    )
    _finish(result, summary, f"{result['model_name']} version {result['version']}: {result['decision']}")


@app.command()
def embed(
    model: str = typer.Option(..., help="A model folder, or an MLflow URI such as models:/zhclip-demo@champion."),
    text: list[str] = typer.Option([], help="A text to embed (repeatable)."),
    image: list[Path] = typer.Option([], help="An image file to embed (repeatable)."),
    tracking_uri: str | None = _option("mlflow", "tracking_uri"),
) -> None:
    """Print L2-normalised embeddings as JSON lines and, given texts and images, their cosine similarities."""
    from zhclip.components.registry.embed import embed as run

    for line in run(model, text, image, tracking_uri):
        typer.echo(json.dumps(line, ensure_ascii=False))


def _model_and_tracking(settings: dict, model: str | None) -> tuple[str, str | None]:
    """`model`, else the registry alias of section `search` (what the pipelines index), and the MLflow
    tracking URI of section `mlflow`."""
    from zhclip.components.core.tracking import MlflowConfig
    from zhclip.components.search.service import SearchConfig

    uri = model or config_from(SearchConfig, settings, "search").model_uri()
    return uri, config_from(MlflowConfig, settings, "mlflow").tracking_uri or None


@app.command()
@with_settings("index", "search", "mlflow")
def index(
    gallery: str = typer.Option(
        ...,
        help="Images to index: a folder, a Chinese-CLIP *_imgs.tsv, or a prepared split "
        "(e.g. data/validated/test); local or s3://.",
    ),
    out: str | None = typer.Option(None, help="Index folder to write (local or s3://, e.g. on MinIO)."),
    publish: str | None = typer.Option(
        None,
        help="Instead of --out: an index catalog (local or s3://); the index goes to <catalog>/<weights>, "
        "where `zhclip serve --follow` finds the index of each new champion.",
    ),
    model: str | None = typer.Option(
        None, help="A model folder or registry URI (default: models:/<register.model_name>@champion)."
    ),
    summary: Path | None = typer.Option(None, help="Write the JSON summary here."),
    *,
    settings: dict,
) -> None:
    """Embed a gallery with a model into a FAISS index that `zhclip serve` searches.

    The index records the model's registered version and weights hash; the server refuses other
    weights. After `champion` moves, run the same command again (or `dvc repro index`).
    """
    from zhclip.components.search.index_build import IndexConfig, build_index

    if (out is None) == (publish is None):
        raise ZhclipError("give exactly one of --out (an index folder) and --publish (an index catalog)")

    config = config_from(IndexConfig, settings, "index")
    model_uri, tracking = _model_and_tracking(settings, model)
    result = build_index(gallery, out, model_uri, config, tracking, summary, catalog=publish)
    rejected = f", {result['rejected']} rejected (see the summary)" if result["rejected"] else ""
    _finish(
        result,
        summary,
        f"index {result['index']}: {result['images']} images{rejected}, built by {result['model']['uri']}"
        f"{' version ' + result['model']['version'] if result['model']['version'] else ''}",
    )


@app.command()
@with_settings("serve", "search", "mlflow")
def serve(
    index: list[str] = typer.Option(
        [],
        help="An index folder from `zhclip index`, or an index catalog (`zhclip index --publish`) where the "
        "model's own index is found by its weights; local or s3://; NAME=URI names it (repeatable; "
        "default: indexes/<name> of each params search.galleries, as dvc repro builds them).",
    ),
    model: str | None = typer.Option(
        None,
        help="The model that built the indexes: a folder or registry URI "
        "(default: models:/<register.model_name>@champion).",
    ),
    follow: str | None = typer.Option(
        None,
        help="Instead of --model: a registry alias (models:/NAME@champion) to follow: when it moves, the new "
        "version and its index load in the background, pass the canary, and replace the live pair.",
    ),
    *,
    settings: dict,
) -> None:
    """Search API and web page: Chinese text -> images, image -> similar images (open http://HOST:PORT/).

    /healthz answers while the model and indexes load, /readyz once they are loaded, /metrics for
    Prometheus. POST /admin/reload checks the model now (Authorization: Bearer $ZHCLIP_ADMIN_TOKEN).
    Limits on k, paging, query length and uploads: params.yaml section `serve`.
    """
    from zhclip.components.search.http_app import serve as run
    from zhclip.components.search.service import SearchConfig, ServeConfig

    if model and follow:
        raise ZhclipError(
            "give --model (serve it) or --follow (serve what the alias names, and move with it), not both"
        )
    if follow and "@" not in follow:
        raise ZhclipError(f"--follow {follow!r}: give a registry alias, models:/<name>@<alias>")
    config = config_from(ServeConfig, settings, "serve")
    galleries = config_from(SearchConfig, settings, "search").galleries
    indexes = index or [f"{name}=indexes/{name}" for name in galleries]
    model_uri, tracking = _model_and_tracking(settings, model or follow)
    run(indexes, model_uri, config, tracking, follow=bool(follow))


@app.command()
@with_settings("object_store")
def upload(
    src: Path = typer.Option(Path("data/prepared"), help="Local folder to upload (e.g. prepared shards)."),
    dest: str = typer.Option(..., help="Destination s3://bucket/prefix; the bucket is created if missing."),
    endpoint: str | None = typer.Option(None, help="S3/MinIO endpoint (default: $AWS_ENDPOINT_URL)."),
    *,
    settings: dict,
) -> None:
    """Upload a folder to MinIO or any S3 endpoint (credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY).

    Requests are retried as params.yaml section `object_store` says."""
    from zhclip.components.core.storage import upload as run

    _echo_json(run(src, dest, endpoint))


@app.command()
def results() -> None:
    """Print where the last `dvc repro` put its results and the headline metrics."""
    from zhclip.components.project.results import headline

    typer.echo(headline())


@app.command("config")
def config_command(
    out: Path = typer.Option(Path("docs/configuration.md"), help="Where to write the settings reference page."),
    check: bool = typer.Option(False, help="Write nothing; fail if OUT differs from what the code says (CI)."),
    params: Path = ParamsOption,
    defaults: bool = DefaultsOption,
) -> None:
    """Write the reference of every setting (default, this project's value, meaning) from the code."""
    from zhclip.components.core.settings import reference_page

    page = reference_page(_params(params, defaults))
    if check:
        if not out.is_file() or out.read_text(encoding="utf-8") != page:
            raise ZhclipError(f"{out} is out of date with the settings in the code; run `zhclip config --out {out}`")
        typer.echo(f"{out} is current")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    typer.echo(f"wrote {out}")


@model_app.command("convert")
def model_convert(
    checkpoint: Path = typer.Option(..., help="A released Chinese-CLIP .pt checkpoint (e.g. clip_cn_vit-b-16.pt)."),
    out: Path = typer.Option(..., help="Folder for the Hugging Face model (safetensors)."),
    preset: str | None = typer.Option(None, help="Architecture to expect (default: read from the tensor shapes)."),
    vocab: Path | None = typer.Option(None, help="vocab.txt (default: the one in the cn-clip wheel)."),
    context_length: int | None = typer.Option(
        None, help="Text length the tokenizer pads and truncates to (default: Chinese-CLIP's 52)."
    ),
) -> None:
    """Import a reference checkpoint: the result loads with transformers (AutoModel; ViT: ChineseCLIPModel)
    and can be --init for training."""
    from zhclip.components.registry.import_checkpoint import convert
    from zhclip.model import CONTEXT_LENGTH

    _echo_json(convert(checkpoint, out, vocab, context_length or CONTEXT_LENGTH, preset))


@model_app.command("export-onnx")
def model_export_onnx(
    model: Path = typer.Option(..., help="Trained or converted model folder."),
    out: Path = typer.Option(..., help="Folder for image_encoder.onnx and text_encoder.onnx."),
    tolerance: float = typer.Option(1e-3, help="Largest allowed difference from PyTorch on the check batch."),
) -> None:
    """Export the image and text encoders to ONNX (dynamic batch) and verify them with onnxruntime."""
    from zhclip.components.registry.export_onnx import export

    _echo_json(export(model, out, tolerance))


@pipeline_app.command("compile")
@with_settings("kubeflow")
def pipeline_compile(
    out: Path = typer.Option(Path("pipeline.yaml"), help="Where to write the compiled pipeline YAML."),
    *,
    settings: dict,
) -> None:
    """Compile the Kubeflow pipeline to YAML that Kubeflow accepts.

    Parameter defaults come from params.yaml, task resources, GPUs, secrets and retries from its
    `kubeflow` section, the component image from $ZHCLIP_IMAGE (default zhclip:latest).
    """
    from zhclip.workflows.submit import compile_pipeline

    typer.echo(f"wrote {compile_pipeline(out, settings)}")


@pipeline_app.command("submit")
@with_settings("kubeflow")
def pipeline_submit(
    host: str = typer.Option(
        ...,
        help="Kubeflow Pipelines API, e.g. http://localhost:8888 after "
        "`kubectl port-forward -n kubeflow svc/ml-pipeline 8888`.",
    ),
    raw_uri: str = typer.Option(..., help="Raw data the run ingests, e.g. s3://zhclip-data/raw/v1."),
    experiment: str = typer.Option("zhclip", help="KFP experiment to file the run under."),
    run_name: str | None = typer.Option(None, help="Run (and pipeline version) name; default zhclip-<time>."),
    namespace: str | None = typer.Option(None, help="Kubeflow profile namespace (multi-user installs)."),
    ray_address: str | None = typer.Option(
        None, help="Train on this KubeRay cluster, e.g. ray://zhclip-head-svc.zhclip:10001 (default: the pod's GPUs)."
    ),
    *,
    settings: dict,
) -> None:
    """Compile, upload as a new version of the `zhclip` pipeline, and start a run."""
    from zhclip.workflows.submit import submit

    arguments = {"ray_address": ray_address} if ray_address is not None else {}
    _echo_json(submit(host, settings, raw_uri, experiment, run_name, namespace, arguments))


@pipeline_app.command("run-local")
@with_settings("kubeflow")
def pipeline_run_local(
    raw: Path = typer.Option(Path("data/raw"), help="Raw Chinese-CLIP-format data to feed the pipeline."),
    root: Path = typer.Option(Path("kfp_local"), help="Local pipeline root for artifacts."),
    *,
    settings: dict,
) -> None:
    """Run the whole pipeline here with kfp.local's SubprocessRunner (no cluster needed)."""
    from zhclip.workflows.local_run import run_local

    _echo_json(run_local(raw, root, settings))


def main() -> None:
    from zhclip.components.core.progress import quiet_library_bars
    from zhclip.components.core.storage import object_store_errors

    quiet_library_bars()
    try:
        with object_store_errors():
            app()
    except ZhclipError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
