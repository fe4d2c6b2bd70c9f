"""The `zhclip` command line: one sub-command per pipeline step, each a thin shell over its function.

Every command reads its defaults from params.yaml (`--params`), and explicit flags win. Problems with
input or setup end with `error: ...` and exit status 2, never a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from components.common import ZhclipError, config_from, load_params

app = typer.Typer(help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
pipeline_app = typer.Typer(help="Compile, run locally or submit the Kubeflow pipeline.", no_args_is_help=True)
app.add_typer(pipeline_app, name="pipeline")
model_app = typer.Typer(help="Import and export models.", no_args_is_help=True)
app.add_typer(model_app, name="model")

ParamsOption = typer.Option(Path("params.yaml"), "--params", help="params.yaml to read defaults from.")


def _echo_json(summary: dict) -> None:
    typer.echo(json.dumps(summary, indent=2, ensure_ascii=False, default=str))


def _finish(summary: dict, summary_path: Optional[Path], line: str) -> None:
    """The step's result: one line for people when the JSON went to a file (as under `dvc repro`), else the JSON."""
    if summary_path:
        typer.echo(f"{line}  [summary: {summary_path}]")
    else:
        _echo_json(summary)


@app.command("demo-data")
def demo_data_command(
    out: Path = typer.Option(Path("data/raw"), help="Folder for the Chinese-CLIP-format splits."),
    summary: Optional[Path] = typer.Option(None, help="Write the JSON summary here."),
    seed: Optional[int] = typer.Option(None, help="Random seed (same seed, same bytes)."),
    train_images: Optional[int] = typer.Option(None, help="Images in the train split."),
    test_images: Optional[int] = typer.Option(None, help="Images in the test split."),
    params: Path = ParamsOption,
) -> None:
    """Generate the bundled demo dataset: coloured shapes with Chinese captions, train/valid/test."""
    from components.demo_data import DemoDataConfig, generate_demo_data

    config = config_from(DemoDataConfig, load_params(params), "demo_data", seed=seed, train_images=train_images, test_images=test_images)
    result = generate_demo_data(out, config, summary)
    _finish(result, summary, f"demo data in {out}: " + ", ".join(f"{split} {counts['images']} images / {counts['texts']} captions"
                                                              for split, counts in result["splits"].items()))


@app.command("demo-towers")
def demo_towers_command(
    corpus: Path = typer.Option(Path("data/raw/pretrain"), help="The pretraining corpus `zhclip demo-data` writes."),
    out: Path = typer.Option(Path("weights/demo"), help="Folder for vision/ (CLIPModel) and text/ (BertForMaskedLM)."),
    summary: Optional[Path] = typer.Option(None, help="Write the JSON summary here."),
    params: Path = ParamsOption,
) -> None:
    """Pretrain the demo's stand-ins for OpenAI CLIP (English captions) and Chinese RoBERTa (masked LM).

    The paper starts from those; no download is possible here, so the demo makes small ones the same
    way, and `zhclip start` loads them exactly as it loads real checkpoints.
    """
    from components.demo_towers import DemoTowersConfig, pretrain_demo_towers

    all_params = load_params(params)
    preset = (all_params.get("model") or {}).get("preset")
    config = config_from(DemoTowersConfig, all_params, "demo_towers", preset=preset)
    result = pretrain_demo_towers(corpus, out, config, summary)
    typer.echo(f"demo towers in {out}: English CLIP loss {result['vision']['first_loss']} -> {result['vision']['final_loss']}, "
               f"Chinese BERT masked-LM loss {result['text']['first_loss']} -> {result['text']['final_loss']}")


@app.command()
def ingest(
    raw: Path = typer.Option(Path("data/raw"), help="Folder with {split}_imgs.tsv + {split}_texts.jsonl, or {split}.csv + images."),
    out: Path = typer.Option(Path("data/prepared"), help="Folder for Parquet shards and quarantine files."),
    summary: Optional[Path] = typer.Option(None, help="Write the JSON summary here."),
    shard_rows: Optional[int] = typer.Option(None, help="Pairs per Parquet shard."),
    params: Path = ParamsOption,
) -> None:
    """Decode, normalise and shard the raw splits; malformed rows go to OUT/quarantine/ with a reason."""
    from components.ingest import IngestConfig, ingest as run

    result = run(raw, out, config_from(IngestConfig, load_params(params), "ingest", shard_rows=shard_rows), summary)
    _finish(result, summary, f"ingest into {out}: " + ", ".join(f"{split} {counts['pairs']} pairs"
                                                             for split, counts in result["splits"].items()))


@app.command()
def validate(
    data: Path = typer.Option(Path("data/prepared"), help="Prepared data from `zhclip ingest`."),
    out: Path = typer.Option(Path("data/validated"), help="Folder for the rows that pass (what training reads)."),
    report: Optional[Path] = typer.Option(None, help="Write the JSON summary (per-expectation counts) here."),
    quarantine: Path = typer.Option(Path("reports/validation_quarantine.jsonl"), help="Where rejected rows go, with reasons."),
    docs: Optional[Path] = typer.Option(None, help="Render Great Expectations Data Docs (HTML) into this folder."),
    max_bad_fraction: Optional[float] = typer.Option(None, help="Largest share of bad rows per split before the gate fails (default 0)."),
    params: Path = ParamsOption,
) -> None:
    """Great Expectations gate: quarantines bad rows, or fails naming each failed expectation with example ids."""
    from components.validate import ValidateConfig, validate as run

    config = config_from(ValidateConfig, load_params(params), "validate", max_bad_fraction=max_bad_fraction)
    result = run(data, out, config, report, quarantine, docs)
    counts = ", ".join(f"{split} {s['rows_out']}/{s['rows_in']} rows kept" for split, s in result["splits"].items())
    typer.echo(f"validation passed: {counts}; quarantine: {result['quarantine']}")


def _stage_number(stage: str) -> int:
    number = stage.removeprefix("stage")
    if number not in ("1", "2"):
        raise ZhclipError(f"--stage {stage!r}: give 1 or 2 (stage1, stage2 also work, as dvc.yaml passes them)")
    return int(number)


@app.command()
def start(
    out: Path = typer.Option(Path("models/start"), help="Folder for the starting model (Hugging Face format)."),
    summary: Optional[Path] = typer.Option(None, help="Write the JSON summary here."),
    source: Optional[str] = typer.Option(None, help="scratch, towers or checkpoint (default: params.yaml start.source)."),
    vision: Optional[str] = typer.Option(None, help="towers: an OpenAI-CLIP folder (Hugging Face format), local or s3://."),
    text: Optional[str] = typer.Option(None, help="towers: a Chinese RoBERTa-wwm folder (BertModel format), local or s3://."),
    checkpoint: Optional[str] = typer.Option(None, help="checkpoint: a Chinese-CLIP .pt or a model folder, local or s3://."),
    params: Path = ParamsOption,
) -> None:
    """Build the model training starts from: random towers, pretrained towers, or a released checkpoint.

    The pipeline evaluates it as the baseline every stage must beat; params.yaml section `start` also
    says which stages run ({stage1: start, stage2: stage1}, or {stage2: start} to fine-tune).
    """
    from components.start import StartConfig, prepare_start

    config = StartConfig.from_params(load_params(params), source=source, vision=vision, text=text, checkpoint=checkpoint)
    result = prepare_start(out, config, summary)
    _finish(result, summary, f"start ({result['source']}{': ' + ', '.join(result['weights'].values()) if result['weights'] else ''}) "
                             f"written to {out}")


@app.command()
def train(
    stage: str = typer.Option(..., help="1 (or stage1): image tower locked (LiT); 2 (or stage2): both towers learn."),
    data: Path = typer.Option(Path("data/prepared"), help="Prepared data from `zhclip ingest`."),
    out: Path = typer.Option(..., help="Folder for the trained Hugging Face model."),
    init: Optional[Path] = typer.Option(None, help="Model folder to start from: `zhclip start`'s, or stage 1's for stage 2 "
                                              "(without it stage 1 starts from random towers)."),
    summary: Optional[Path] = typer.Option(None, help="Write the JSON summary here."),
    history: Optional[Path] = typer.Option(None, help="Write the per-step loss and learning rate as CSV here."),
    epochs: Optional[int] = typer.Option(None, help="Passes over the training pairs."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (AdamW)."),
    batch_size: Optional[int] = typer.Option(None, help="Pairs per step and worker."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many optimizer steps (0: all epochs)."),
    accum_steps: Optional[int] = typer.Option(None, help="Micro-batches per step (same loss, less memory)."),
    precision: Optional[str] = typer.Option(None, help="fp32, or bf16 autocast on GPUs."),
    mask_ratio: Optional[float] = typer.Option(None, help="FLIP: share of image patches dropped while training."),
    num_workers: Optional[int] = typer.Option(None, help="Ray Train workers."),
    use_gpu: Optional[bool] = typer.Option(None, help="One GPU per worker."),
    storage_path: Optional[str] = typer.Option(None, help="Checkpoint storage: a folder or s3://bucket/prefix."),
    checkpoint_every: Optional[int] = typer.Option(None, help="Steps between checkpoints (0: only at the end)."),
    params: Path = ParamsOption,
) -> None:
    """Train one stage with Ray Train (in-process Ray, or the cluster at $RAY_ADDRESS).

    Checkpoints go to the storage path every --checkpoint-every steps; re-running an interrupted
    stage with the same settings and data resumes from its last checkpoint. The stage is tracked as
    an MLflow run (params, per-step loss/lr/logit scale/speed, validation recall) under the
    pipeline's parent run. All settings: params.yaml sections train and stage1/stage2.
    """
    from components.train import TrainConfig, train as run

    config = TrainConfig.from_params(load_params(params), _stage_number(stage), epochs=epochs, lr=lr, batch_size=batch_size,
                                     max_steps=max_steps, accum_steps=accum_steps, precision=precision,
                                     mask_ratio=mask_ratio, num_workers=num_workers, use_gpu=use_gpu,
                                     storage_path=storage_path, checkpoint_every=checkpoint_every)
    result = run(data, out, config, init, summary, history)
    _finish(result, summary, f"stage {result['stage']} model in {out}")


@app.command()
def evaluate(
    model: Optional[Path] = typer.Option(None, help="Trained model folder (or score feature files instead: --image-feats, --text-feats, --annotations)."),
    data: Path = typer.Option(Path("data/prepared"), help="Prepared data from `zhclip ingest` (with --model)."),
    image_feats: Optional[Path] = typer.Option(None, help="Image features in Chinese-CLIP's jsonl ({\"image_id\", \"feature\"})."),
    text_feats: Optional[Path] = typer.Option(None, help="Text features in Chinese-CLIP's jsonl ({\"text_id\", \"feature\"})."),
    annotations: Optional[Path] = typer.Option(None, help="Positives per text ({\"text_id\", \"image_ids\"} lines, e.g. test_texts.jsonl)."),
    out: Optional[Path] = typer.Option(None, help="Write the metrics JSON here."),
    plots: Optional[Path] = typer.Option(None, help="Write recall@k (k=1..10, both directions) as CSV here, for `dvc plots`."),
    report_dir: Optional[Path] = typer.Option(None, help="Write report.html/.md and Chinese-CLIP's prediction and score files here."),
    split: Optional[str] = typer.Option(None, help="Split to score (default: test)."),
    chunk_size: Optional[int] = typer.Option(None, help="At most this many queries scored at once (fewer when their scores pass evaluate.score_block_mb)."),
    write_features: Optional[bool] = typer.Option(None, help="Also write the features as Chinese-CLIP jsonl into --report-dir."),
    init_metrics: Optional[Path] = typer.Option(None, help="The evaluation JSON of the model this one was trained from: "
                                                       "the summary and report then show the start, every stage and the gain."),
    label: Optional[str] = typer.Option(None, help="The model's name in that comparison (default: its folder's name)."),
    params: Path = ParamsOption,
) -> None:
    """Text-to-image and image-to-text recall@1/5/10 and mean recall (percent), with the chance level."""
    from components.evaluate import EvaluateConfig, evaluate as run, evaluate_features

    config = config_from(EvaluateConfig, load_params(params), "evaluate", split=split, chunk_size=chunk_size,
                         write_features=write_features)
    feature_files = (image_feats, text_feats, annotations)
    if model and any(feature_files):
        raise ZhclipError("give either --model or --image-feats/--text-feats/--annotations, not both")
    if model:
        result = run(model, data, config, out, plots, report_dir, init_metrics=init_metrics, label=label)
        gain = f", {result['gain_over_start']:+.2f} over the start" if "gain_over_start" in result else ""
        _finish(result, out, f"{result['model']}: {result['split']} mean recall {result['mean_recall']:.2f} "
                             f"(chance {result['chance_mean_recall']:.2f}){gain}")
    elif all(feature_files):
        _echo_json(evaluate_features(image_feats, text_feats, annotations, config, out, plots, report_dir))
    else:
        raise ZhclipError("give --model, or all of --image-feats, --text-feats and --annotations")


@app.command()
def zeroshot(
    model: Path = typer.Option(..., help="Trained model folder."),
    images: Path = typer.Option(..., help="Image folder: <images>/<class name>/<image files>; the folder names are the labels."),
    out: Optional[Path] = typer.Option(None, help="Write the metrics JSON (top-1, top-5, per-class accuracy) here."),
    predictions: Optional[Path] = typer.Option(None, help="Write image, actual, predicted as CSV here (DVC confusion plot)."),
    report_dir: Optional[Path] = typer.Option(None, help="Write report.html/.md (accuracy, confusion matrix, examples) here."),
    template: list[str] = typer.Option([], help="A prompt with {} for the class name, e.g. '{}的照片' (repeatable; default: params.yaml)."),
    params: Path = ParamsOption,
) -> None:
    """Zero-shot classification with Chinese prompt ensembles: top-1/top-5 and per-class accuracy, confusion matrix."""
    from components.zeroshot import ZeroshotConfig, zeroshot as run

    config = config_from(ZeroshotConfig, load_params(params), "zeroshot", templates=template or None)
    result = run(model, images, config, out, predictions, report_dir)
    _finish(result, out, f"zero-shot {images.name} with {model}: top-1 {result['top1']:.2f} %, top-5 {result['top5']:.2f} % "
                         f"(chance {result['chance_top1']:.2f} %)")


@app.command()
def register(
    model: Path = typer.Option(..., help="Trained model folder."),
    metrics: Path = typer.Option(..., help="Metrics JSON from `zhclip evaluate`."),
    summary: Optional[Path] = typer.Option(None, help="Write the JSON summary here."),
    name: Optional[str] = typer.Option(None, help="Registered model name."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)."),
    log_summary: list[Path] = typer.Option([], help="An earlier step's JSON summary to attach to the MLflow run (repeatable)."),
    train_summary: Optional[Path] = typer.Option(None, help="Stage 2's training summary; its MLflow runs become lineage tags."),
    data: Optional[Path] = typer.Option(None, help="The data training read (e.g. data/validated), recorded by its DVC hash."),
    params: Path = ParamsOption,
) -> None:
    """Log an MLflow pyfunc, register a version (alias challenger); champion if no worse than its start and the champion.

    Lineage goes into version tags; a checkpoint registered before keeps its version (no duplicate).
    """
    from components.register import RegisterConfig, register as run

    all_params = load_params(params)
    config = RegisterConfig.from_params(all_params, model_name=name, tracking_uri=tracking_uri)
    result = run(model, metrics, config, all_params, summary, log_summary, train_summary, data)
    _finish(result, summary, f"{result['model_name']} version {result['version']}: {result['decision']}")


@app.command()
def embed(
    model: str = typer.Option(..., help="A model folder, or an MLflow URI such as models:/zhclip-demo@champion."),
    text: list[str] = typer.Option([], help="A text to embed (repeatable)."),
    image: list[Path] = typer.Option([], help="An image file to embed (repeatable)."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI for models:/ URIs."),
) -> None:
    """Print L2-normalised embeddings as JSON lines and, given texts and images, their cosine similarities."""
    from components.embed import embed as run

    for line in run(model, text, image, tracking_uri):
        typer.echo(json.dumps(line, ensure_ascii=False))


def _champion_uri(params: dict, model: Optional[str]) -> str:
    """`model`, else the registry's champion of params.yaml's register.model_name (what the pipelines index)."""
    if model:
        return model
    name = (params.get("register") or {}).get("model_name", "zhclip-demo")
    alias = (params.get("search") or {}).get("alias", "champion")
    return f"models:/{name}@{alias}"


def _tracking_uri(params: dict, tracking_uri: Optional[str]) -> Optional[str]:
    return tracking_uri or (params.get("mlflow") or {}).get("tracking_uri") or None


@app.command()
def index(
    gallery: str = typer.Option(..., help="Images to index: a folder, a Chinese-CLIP *_imgs.tsv, or a prepared split "
                                          "(e.g. data/validated/test); local or s3://."),
    out: str = typer.Option(..., help="Index folder to write (local or s3://, e.g. on MinIO)."),
    model: Optional[str] = typer.Option(None, help="A model folder or registry URI (default: models:/<register.model_name>@champion)."),
    summary: Optional[Path] = typer.Option(None, help="Write the JSON summary here."),
    factory: Optional[str] = typer.Option(None, help="FAISS index_factory string: HNSW32 (default), Flat (exact), IVF4096,PQ64 (huge galleries)."),
    search_params: Optional[str] = typer.Option(None, help="FAISS search setting stored with the index, e.g. efSearch=128."),
    batch_size: Optional[int] = typer.Option(None, help="Images embedded at once."),
    workers: Optional[int] = typer.Option(None, help="Ray Data actors that embed pieces of the gallery (one GPU each on a "
                                                     "GPU cluster, e.g. $RAY_ADDRESS); 0: in this process."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI for models:/ URIs (default: params mlflow.tracking_uri)."),
    params: Path = ParamsOption,
) -> None:
    """Embed a gallery with a model into a FAISS index that `zhclip serve` searches.

    The index records the model's registered version and weights hash; the server refuses other
    weights. After `champion` moves, run the same command again (or `dvc repro index`).
    """
    from components.index import IndexConfig, build_index

    all_params = load_params(params)
    config = config_from(IndexConfig, all_params, "index", factory=factory, search_params=search_params, batch_size=batch_size,
                         workers=workers)
    result = build_index(gallery, out, _champion_uri(all_params, model), config, _tracking_uri(all_params, tracking_uri), summary)
    rejected = f", {result['rejected']} rejected (see the summary)" if result["rejected"] else ""
    _finish(result, summary, f"index {out}: {result['images']} images{rejected}, built by {result['model']['uri']}"
                             f"{' version ' + result['model']['version'] if result['model']['version'] else ''}")


@app.command()
def serve(
    index: list[str] = typer.Option([], help="An index folder from `zhclip index` (local or s3://), or NAME=URI (repeatable; "
                                             "default: indexes/<name> of each params search.galleries, as dvc repro builds them)."),
    model: Optional[str] = typer.Option(None, help="The model that built the indexes: a folder or registry URI "
                                              "(default: models:/<register.model_name>@champion)."),
    host: Optional[str] = typer.Option(None, help="Address to listen on (default 127.0.0.1; 0.0.0.0 in a container)."),
    port: Optional[int] = typer.Option(None, help="Port (default 8000)."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI for models:/ URIs (default: params mlflow.tracking_uri)."),
    params: Path = ParamsOption,
) -> None:
    """Search API and web page: Chinese text -> images, image -> similar images (open http://HOST:PORT/).

    /healthz answers while the model and indexes load, /readyz once they are loaded. Limits on k,
    paging, query length and uploads: params.yaml section `serve`.
    """
    from components.search import ServeConfig, serve as run

    all_params = load_params(params)
    config = config_from(ServeConfig, all_params, "serve", host=host, port=port)
    galleries = (all_params.get("search") or {}).get("galleries") or {}
    indexes = index or [f"{name}=indexes/{name}" for name in galleries]
    run(indexes, _champion_uri(all_params, model), config, _tracking_uri(all_params, tracking_uri))


@app.command()
def upload(
    src: Path = typer.Option(Path("data/prepared"), help="Local folder to upload (e.g. prepared shards)."),
    dest: str = typer.Option(..., help="Destination s3://bucket/prefix; the bucket is created if missing."),
    endpoint: Optional[str] = typer.Option(None, help="S3/MinIO endpoint (default: $AWS_ENDPOINT_URL)."),
) -> None:
    """Upload a folder to MinIO or any S3 endpoint (credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)."""
    from components.storage import upload as run

    _echo_json(run(src, dest, endpoint))


@app.command()
def results() -> None:
    """Print where the last `dvc repro` put its results and the headline metrics."""
    from components.results import headline

    typer.echo(headline())


@model_app.command("convert")
def model_convert(
    checkpoint: Path = typer.Option(..., help="A released Chinese-CLIP .pt checkpoint (e.g. clip_cn_vit-b-16.pt)."),
    out: Path = typer.Option(..., help="Folder for the Hugging Face model (safetensors)."),
    preset: Optional[str] = typer.Option(None, help="Architecture to expect (default: read from the tensor shapes)."),
    vocab: Optional[Path] = typer.Option(None, help="vocab.txt (default: the one in the cn-clip wheel)."),
    context_length: int = typer.Option(52, help="Text length the tokenizer pads and truncates to."),
) -> None:
    """Import a reference checkpoint; the result loads with transformers (AutoModel; ViT: ChineseCLIPModel) and can be --init for training."""
    from components.convert import convert

    _echo_json(convert(checkpoint, out, vocab, context_length, preset))


@model_app.command("export-onnx")
def model_export_onnx(
    model: Path = typer.Option(..., help="Trained or converted model folder."),
    out: Path = typer.Option(..., help="Folder for image_encoder.onnx and text_encoder.onnx."),
    tolerance: float = typer.Option(1e-3, help="Largest allowed difference from PyTorch on the check batch."),
) -> None:
    """Export the image and text encoders to ONNX (dynamic batch) and verify them with onnxruntime."""
    from components.export import export

    _echo_json(export(model, out, tolerance))


@pipeline_app.command("compile")
def pipeline_compile(
    out: Path = typer.Option(Path("pipeline.yaml"), help="Where to write the compiled pipeline YAML."),
    params: Path = ParamsOption,
) -> None:
    """Compile the Kubeflow pipeline to YAML that Kubeflow accepts.

    Parameter defaults come from params.yaml, task resources, GPUs, secrets and retries from its
    `kubeflow` section, the component image from $ZHCLIP_IMAGE (default zhclip:latest).
    """
    from workflows.pipeline import compile_pipeline

    typer.echo(f"wrote {compile_pipeline(out, load_params(params))}")


@pipeline_app.command("submit")
def pipeline_submit(
    host: str = typer.Option(..., help="Kubeflow Pipelines API, e.g. http://localhost:8888 after "
                                       "`kubectl port-forward -n kubeflow svc/ml-pipeline 8888`."),
    raw_uri: str = typer.Option(..., help="Raw data the run ingests, e.g. s3://zhclip-data/raw/v1."),
    experiment: str = typer.Option("zhclip", help="KFP experiment to file the run under."),
    run_name: Optional[str] = typer.Option(None, help="Run (and pipeline version) name; default zhclip-<time>."),
    namespace: Optional[str] = typer.Option(None, help="Kubeflow profile namespace (multi-user installs)."),
    ray_address: Optional[str] = typer.Option(None, help="Train on this KubeRay cluster, e.g. "
                                                         "ray://zhclip-head-svc.zhclip:10001 (default: the pod's GPUs)."),
    params: Path = ParamsOption,
) -> None:
    """Compile, upload as a new version of the `zhclip` pipeline, and start a run."""
    from workflows.pipeline import submit

    arguments = {"ray_address": ray_address} if ray_address is not None else {}
    _echo_json(submit(host, load_params(params), raw_uri, experiment, run_name, namespace, arguments))


@pipeline_app.command("run-local")
def pipeline_run_local(
    raw: Path = typer.Option(Path("data/raw"), help="Raw Chinese-CLIP-format data to feed the pipeline."),
    root: Path = typer.Option(Path("kfp_local"), help="Local pipeline root for artifacts."),
    params: Path = ParamsOption,
) -> None:
    """Run the whole pipeline here with kfp.local's SubprocessRunner (no cluster needed)."""
    from workflows.pipeline import run_local

    _echo_json(run_local(raw, root, load_params(params)))


def main() -> None:
    try:
        app()
    except ZhclipError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
