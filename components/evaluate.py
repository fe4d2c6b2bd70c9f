"""Evaluate: text-to-image and image-to-text recall@1/5/10 and mean recall, as Chinese-CLIP reports.

Semantics of the reference's `eval/evaluation.py`: a text may have several positive images and a hit
at k is any positive among the top k; image-to-text queries are the images that at least one text
references, and any of their captions counts. Values are percentages.

Scores come from a model folder (the split's texts and images are embedded here) or from feature
files in the reference's jsonl format; either way the step writes the reference's prediction and
score files beside an HTML report, so both tools can score each other's output.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from PIL import Image
from tqdm import tqdm

from components import cnclip_files, report
from components.common import ZhclipError, read_summary, release_freed_memory, timed, write_summary
from components.shards import PreparedSplit
from components.tracking import run_to_log_into
from model import decode_image, embed_images, embed_texts, load_model

KS = (1, 5, 10)
HEADLINE = ("mean_recall", *(f"{d}_r{k}" for d in ("t2i", "i2t") for k in KS))  # what the chain keeps of each model
TOP_K = 10  # predictions per query in the reference's files, and the recall@k curve's range
EXAMPLE_IMAGES = 5


@dataclass
class EvaluateConfig:
    split: str = "test"
    batch_size: int = 256
    chunk_size: int = 1024   # at most this many query rows scored at once ...
    score_block_mb: int = 64  # ... and fewer when their scores would pass this: memory does not grow with the gallery
    examples: int = 8        # query texts shown with their top images in the HTML report
    write_features: bool = False  # also write the reference's feature jsonl files (large for big splits)


@dataclass
class RetrievalSet:
    """Embedded texts and images with their ids, and the positive image rows of each text row."""

    text_ids: list[int]
    image_ids: list[int]
    text_emb: np.ndarray
    image_emb: np.ndarray
    text_to_images: list[set[int]]
    texts: list[str] = field(default_factory=list)  # for the report; may be empty
    # image rows -> decoded images, for the few the report shows (the split's images are never all held)
    load_images: Callable[[Sequence[int]], dict[int, Image.Image]] | None = None


@dataclass
class EmbeddedSplit:
    """A prepared split as retrieval sees it (each text and each image once, in order of first
    appearance), embedded, with the text row and image row of every pair in the split's order."""

    data: RetrievalSet
    pair_texts: np.ndarray
    pair_images: np.ndarray


def embed_split(model, processor, prepared_dir: str | Path, split: str, batch_size: int) -> EmbeddedSplit:
    """Embed a prepared split streamed row group by row group: memory holds the ids, captions and
    embeddings, one row group and one batch of decoded images, never the split's images."""
    shards = PreparedSplit.open(str(prepared_dir), split)
    ids = pa.concat_tables(shards.tables(["text_id", "text", "image_id"]))
    pair_texts, text_ids = pd.factorize(ids["text_id"].to_numpy())
    pair_images, image_ids = pd.factorize(ids["image_id"].to_numpy())
    first_text_pair = np.unique(pair_texts, return_index=True)[1]
    texts = ids["text"].take(first_text_pair).to_pylist()
    text_to_images: list[set[int]] = [set() for _ in text_ids]
    for text, image in zip(pair_texts.tolist(), pair_images.tolist()):
        text_to_images[text].add(image)
    text_emb = _embed_texts_trimmed(model, processor, texts, batch_size)
    image_emb = _embed_images_streamed(model, processor, shards, pd.Index(image_ids), batch_size)

    def load_images(rows: Sequence[int]) -> dict[int, Image.Image]:
        return _images_of(shards, {int(image_ids[row]): row for row in rows})

    data = RetrievalSet(text_ids=text_ids.tolist(), image_ids=image_ids.tolist(), text_emb=text_emb, image_emb=image_emb,
                        text_to_images=text_to_images, texts=texts, load_images=load_images)
    return EmbeddedSplit(data, pair_texts, pair_images)


TRIM_EVERY = 16  # batches between handing freed heap back: glibc keeps what tokenising and torch free (+130 MB on 50k texts)


def _embed_texts_trimmed(model, processor, texts: list[str], batch_size: int) -> np.ndarray:
    chunk = batch_size * TRIM_EVERY
    parts = []
    for start in range(0, len(texts), chunk):
        parts.append(embed_texts(model, processor, texts[start:start + chunk], batch_size))
        release_freed_memory()
    return np.concatenate(parts) if parts else embed_texts(model, processor, [], batch_size)


def _embed_images_streamed(model, processor, shards: PreparedSplit, image_index: pd.Index, batch_size: int) -> np.ndarray:
    """One embedding per image id of `image_index` (in its order), decoding each image once as the row groups stream by."""
    embedded = np.zeros(len(image_index), dtype=bool)
    out: np.ndarray | None = None
    rows: list[int] = []
    images: list[Image.Image] = []

    batches = 0

    def flush() -> None:
        nonlocal out, batches
        if images:
            emb = embed_images(model, processor, images, batch_size)
            out = np.zeros((len(image_index), emb.shape[1]), dtype=np.float32) if out is None else out
            out[rows] = emb
            rows.clear()
            images.clear()
            batches += 1
            if batches % TRIM_EVERY == 0:
                release_freed_memory()

    for table in tqdm(shards.tables(["image_id", "image"]), total=len(shards.groups), desc=f"embed {shards.split} images",
                      unit=" row groups", leave=False, disable=None):
        for row, blob in zip(image_index.get_indexer(table["image_id"].to_numpy()).tolist(), table["image"].to_pylist()):
            if not embedded[row]:
                embedded[row] = True
                rows.append(row)
                images.append(decode_image(blob))
                if len(images) == batch_size:
                    flush()
    flush()
    return out if out is not None else np.zeros((0, model.config.projection_dim), dtype=np.float32)


def _images_of(shards: PreparedSplit, rows_by_id: dict[int, int]) -> dict[int, Image.Image]:
    """Decoded images for a few image ids (image row -> image), reading the image column only of the row groups that hold them."""
    found: dict[int, Image.Image] = {}
    wanted = np.fromiter(rows_by_id, dtype=np.int64, count=len(rows_by_id))
    for group in range(len(shards.groups)):
        if len(found) == len(rows_by_id):
            break
        if np.isin(shards.read(group, ["image_id"])["image_id"].to_numpy(), wanted).any():
            table = shards.read(group, ["image_id", "image"])
            for image_id, blob in zip(table["image_id"].to_pylist(), table["image"].to_pylist()):
                if image_id in rows_by_id and rows_by_id[image_id] not in found:
                    found[rows_by_id[image_id]] = decode_image(blob)
    return found


@dataclass
class Rankings:
    """Top-k gallery rows per query, both directions, with each query's positives (row indices)."""

    t2i_queries: list[int]
    t2i: np.ndarray
    t2i_positives: list[set[int]]
    i2t_queries: list[int]
    i2t: np.ndarray
    i2t_positives: list[set[int]]


@contextmanager
def accelerated(model: torch.nn.Module) -> Iterator[torch.device]:
    """Run the model on the GPU in bfloat16 autocast when there is one; on the CPU in float32 otherwise."""
    if not torch.cuda.is_available():
        yield torch.device("cpu")
        return
    model.to("cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        yield torch.device("cuda")


def _stable_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Row-wise top k of a score block, ties going to the lower column as a stable descending sort would.

    torch.topk finds the best without sorting the whole row but breaks ties arbitrarily, so it takes
    one extra column: the k chosen are reordered by (score desc, index asc), and the rare rows whose
    k-th score equals the (k+1)-th (a tie across the cut) are sorted in full.
    """
    extra = min(k + 1, scores.shape[1])
    values, indices = torch.topk(scores, extra, dim=1)
    tied_at_cut = (values[:, k - 1] == values[:, k]).nonzero().flatten().tolist() if extra > k else []
    values, indices = values[:, :k], indices[:, :k]
    indices, by_index = indices.sort(dim=1)
    order = torch.sort(-values.gather(1, by_index), dim=1, stable=True).indices
    ranked = indices.gather(1, order)
    for row in tied_at_cut:
        ranked[row] = torch.sort(-scores[row], stable=True).indices[:k]
    return ranked


def top_k(queries: np.ndarray, gallery: np.ndarray, k: int, chunk_size: int = 1024,
          device: torch.device | str | None = None, rows: Sequence[int] | None = None, block_mb: int = 64) -> np.ndarray:
    """Indices of the k best gallery rows per query (the `rows` of `queries`, default all), by dot product.

    Queries are scored chunk_size at a time, fewer if their block of scores would exceed `block_mb`,
    so memory holds one block of at most `block_mb` (or one row), whatever the number of queries and
    the size of the gallery. Ties go to the lower gallery index, as in the reference's stable sort.
    """
    rows = np.arange(len(queries)) if rows is None else np.asarray(rows, dtype=np.int64)
    chunk_size = max(1, min(chunk_size, block_mb * 2**20 // (4 * max(1, len(gallery)))))
    k = min(k, len(gallery))
    dtype = torch.float64 if np.result_type(queries, gallery) == np.float64 else torch.float32
    gallery_t = torch.as_tensor(gallery, dtype=dtype, device=device)
    ranked = np.zeros((len(rows), k), dtype=np.int64)
    if k == 0:
        return ranked
    # One score buffer for every block: a fresh tens-of-MB block per chunk would leave freed copies
    # resident in the allocator's per-thread heaps.
    scores = torch.empty((min(chunk_size, len(rows)), len(gallery)), dtype=dtype, device=device)
    for start in range(0, len(rows), chunk_size):
        block = torch.as_tensor(queries[rows[start : start + chunk_size]], dtype=dtype, device=device)
        torch.matmul(block, gallery_t.T, out=scores[:len(block)])
        ranked[start : start + len(block)] = _stable_top_k(scores[:len(block)], k).cpu().numpy()
    return ranked


def first_hits(ranked: np.ndarray, positives: Sequence[set[int]]) -> np.ndarray:
    """0-based rank of each query's first positive in its ranked row; the row length when none is there."""
    return np.array([next((rank for rank, item in enumerate(row) if item in wanted), len(row))
                     for row, wanted in zip(ranked.tolist(), positives)], dtype=np.int64)


def recalls(ranked: np.ndarray, positives: Sequence[set[int]], ks: Sequence[int] = KS) -> dict[int, float]:
    """Percentage of queries with at least one positive in their top k, for each k."""
    hits = first_hits(ranked, positives)
    return {k: 100.0 * float(np.mean(hits < k)) for k in ks}


def chance_recalls(positives: Sequence[set[int]], gallery_size: int, ks: Sequence[int] = KS) -> dict[int, float]:
    """Expected recall@k of a uniformly random ranking: 1 - C(N-p, k) / C(N, k) per query, averaged.

    A gallery smaller than k is ranked whole, as `top_k` does.
    """
    def expected(p: int, k: int) -> float:
        k = min(k, gallery_size)
        return 1 - math.comb(gallery_size - p, k) / math.comb(gallery_size, k)

    return {k: 100.0 * float(np.mean([expected(len(p), k) for p in positives])) for k in ks}


def rank(text_emb: np.ndarray, image_emb: np.ndarray, text_to_images: Sequence[set[int]], chunk_size: int = 1024,
         k: int = TOP_K, block_mb: int = 64) -> Rankings:
    """Top-k retrieval both ways. Text rows without positives are no T2I query but stay in the I2T gallery."""
    t2i_queries = [text for text, images in enumerate(text_to_images) if images]
    image_to_texts: dict[int, set[int]] = {}
    for text, images in enumerate(text_to_images):
        for image in images:
            image_to_texts.setdefault(image, set()).add(text)
    i2t_queries = sorted(image_to_texts)
    device = "cuda" if torch.cuda.is_available() else None
    return Rankings(
        t2i_queries=t2i_queries,
        t2i=top_k(text_emb, image_emb, k, chunk_size, device, rows=t2i_queries, block_mb=block_mb),
        t2i_positives=[set(text_to_images[t]) for t in t2i_queries],
        i2t_queries=i2t_queries,
        i2t=top_k(image_emb, text_emb, k, chunk_size, device, rows=i2t_queries, block_mb=block_mb),
        i2t_positives=[image_to_texts[i] for i in i2t_queries],
    )


def recall_curves(rankings: Rankings) -> dict[str, list[float]]:
    """Recall@k in percent for k = 1..TOP_K, per direction (what the recall@k plot draws)."""
    ks = range(1, TOP_K + 1)
    return {"t2i": list(recalls(rankings.t2i, rankings.t2i_positives, ks).values()),
            "i2t": list(recalls(rankings.i2t, rankings.i2t_positives, ks).values())}


def metrics_of(rankings: Rankings, gallery_images: int, gallery_texts: int) -> dict[str, float]:
    """R@1/5/10 per direction, mean recall per direction and overall, and the chance level."""
    t2i = recalls(rankings.t2i, rankings.t2i_positives)
    i2t = recalls(rankings.i2t, rankings.i2t_positives)
    chance_t2i = chance_recalls(rankings.t2i_positives, gallery_images)
    chance_i2t = chance_recalls(rankings.i2t_positives, gallery_texts)
    metrics = {f"t2i_r{k}": t2i[k] for k in KS} | {f"i2t_r{k}": i2t[k] for k in KS}
    metrics["t2i_mean_recall"] = float(np.mean(list(t2i.values())))
    metrics["i2t_mean_recall"] = float(np.mean(list(i2t.values())))
    metrics["mean_recall"] = float(np.mean(list(t2i.values()) + list(i2t.values())))
    metrics["chance_mean_recall"] = float(np.mean(list(chance_t2i.values()) + list(chance_i2t.values())))
    return {key: round(value, 4) for key, value in metrics.items()}


def retrieval_metrics(text_emb: np.ndarray, image_emb: np.ndarray, text_to_images: Sequence[set[int]], chunk_size: int = 1024) -> dict[str, float]:
    """All recall figures for texts (rows of text_emb) against images (rows of image_emb).

    `text_to_images[t]` holds the image row indices positive for text row t.
    """
    return metrics_of(rank(text_emb, image_emb, text_to_images, chunk_size), len(image_emb), len(text_emb))


def evaluate(model_dir: str | Path, prepared_dir: str | Path, config: EvaluateConfig, summary_path: str | Path | None = None,
             plots_path: str | Path | None = None, report_dir: str | Path | None = None,
             mlflow_run_id: str | None = None, init_metrics: str | Path | None = None, label: str | None = None) -> dict:
    """Embed the split's texts and images with the model and score retrieval; returns the metrics.

    Optional outputs: the recall@k curve as CSV (`plots_path`), the reference's prediction and score
    files with an HTML/Markdown report (`report_dir`), and the metrics and report logged to an
    existing MLflow run (`mlflow_run_id`; by default the run that trained the model, when recorded).

    `init_metrics` is the evaluation summary of the model this one was trained from: its `chain`
    (start, then each stage) is carried on, so the summary and report set this model beside every
    model before it, with the gain over the start. `label` names the model there (default: its folder).
    """
    try:
        model, processor = load_model(model_dir)
    except (FileNotFoundError, OSError) as err:
        raise ZhclipError(f"cannot load model from {model_dir}: {err}") from err
    earlier = read_summary(init_metrics).get("chain", []) if init_metrics else []
    summary: dict = {"model": label or Path(model_dir).name, "model_dir": str(model_dir), "split": config.split}
    with timed(summary):
        with accelerated(model):
            data = embed_split(model, processor, prepared_dir, config.split, config.batch_size).data
        summary.update(texts=len(data.text_ids), images=len(data.image_ids))
        summary.update(_score(data, config, plots_path, report_dir, run_to_log_into(mlflow_run_id, model_dir), summary, earlier))
    if summary_path:
        write_summary(summary_path, summary)
    return summary


def evaluate_features(image_feats: str | Path, text_feats: str | Path, annotations: str | Path, config: EvaluateConfig,
                      summary_path: str | Path | None = None, plots_path: str | Path | None = None,
                      report_dir: str | Path | None = None, mlflow_run_id: str | None = None) -> dict:
    """Score features in the reference's jsonl format against `{"text_id", "image_ids"}` annotations.

    Every text and image in the feature files is in the gallery, as in the reference's
    `make_topk_predictions(_tr).py`; the annotated texts are the text-to-image queries.
    """
    image_ids, image_emb = cnclip_files.read_features(image_feats, "image_id")
    text_ids, text_emb = cnclip_files.read_features(text_feats, "text_id")
    if image_emb.shape[1] != text_emb.shape[1]:
        raise ZhclipError(f"{image_feats} has {image_emb.shape[1]}-d features but {text_feats} has {text_emb.shape[1]}-d")
    positives, captions = cnclip_files.read_annotations(annotations)
    image_row = {image_id: row for row, image_id in enumerate(image_ids)}
    text_row = {text_id: row for row, text_id in enumerate(text_ids)}
    text_to_images: list[set[int]] = [set() for _ in text_ids]
    for text_id, wanted in positives.items():
        if text_id not in text_row:
            raise ZhclipError(f"{annotations}: text_id {text_id} has no feature in {text_feats}")
        missing = [i for i in wanted if i not in image_row]
        if missing:
            raise ZhclipError(f"{annotations}: text_id {text_id} references image_ids {missing[:5]} with no feature in {image_feats}")
        text_to_images[text_row[text_id]] = {image_row[i] for i in wanted}
    summary: dict = {"model": "features", "image_feats": str(image_feats), "text_feats": str(text_feats),
                     "annotations": str(annotations), "texts": len(text_ids), "images": len(image_ids)}
    data = RetrievalSet(text_ids=text_ids, image_ids=image_ids, text_emb=text_emb, image_emb=image_emb,
                        text_to_images=text_to_images, texts=[captions.get(t, f"text {t}") for t in text_ids])
    with timed(summary):
        summary.update(_score(data, config, plots_path, report_dir, run_to_log_into(mlflow_run_id), summary))
    if summary_path:
        write_summary(summary_path, summary)
    return summary


def _score(data: RetrievalSet, config: EvaluateConfig, plots_path: str | Path | None, report_dir: str | Path | None,
           mlflow_run: dict[str, str] | None, context: dict[str, Any], earlier: list[dict] = ()) -> dict[str, Any]:
    rankings = rank(data.text_emb, data.image_emb, data.text_to_images, config.chunk_size, block_mb=config.score_block_mb)
    metrics = metrics_of(rankings, len(data.image_ids), len(data.text_ids))
    curves = recall_curves(rankings)
    chain = [*earlier, {"model": context["model"], **{k: metrics[k] for k in HEADLINE}, "recall_at_k": curves}]
    metrics |= gain_over_start(chain)
    if plots_path:
        write_recall_curves(plots_path, curves)
    artifacts: list[Path] = []
    if report_dir:
        artifacts = write_retrieval_files(report_dir, data, rankings, config.write_features)
        artifacts += report.write(_retrieval_report(data, rankings, metrics, curves, context, config.examples, chain), report_dir)
    if mlflow_run:
        report.log_to_mlflow(mlflow_run, metrics, artifacts, "evaluate")
    return {**metrics, "chain": chain}


def gain_over_start(chain: Sequence[dict]) -> dict[str, float]:
    """This model's (the chain's last) mean recall against the start's (its first); {} for the start itself."""
    if len(chain) < 2:
        return {}
    start, last = chain[0]["mean_recall"], chain[-1]["mean_recall"]
    return {"start_mean_recall": start, "gain_over_start": round(last - start, 4)}


def write_recall_curves(path: str | Path, curves: dict[str, list[float]]) -> Path:
    """Recall@k for k = 1..10 per direction as CSV (columns k, t2i, i2t) for `dvc plots`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(["k", "t2i", "i2t"])
        for k, (t2i, i2t) in enumerate(zip(curves["t2i"], curves["i2t"]), start=1):
            writer.writerow([k, round(t2i, 4), round(i2t, 4)])
    return path


def write_retrieval_files(out_dir: str | Path, data: RetrievalSet, rankings: Rankings, with_features: bool) -> list[Path]:
    """The reference's files: answers and top-10 predictions both ways, their score JSON, optionally features.

    `evaluation.py answers_t2i.jsonl predictions_t2i.jsonl out.json` (and `evaluation_tr.py` with the
    `_i2t` files) reproduce `score_t2i.json` / `score_i2t.json`.
    """
    out_dir = Path(out_dir)
    text_ids, image_ids = np.asarray(data.text_ids), np.asarray(data.image_ids)

    def ids(ranked: np.ndarray, gallery: np.ndarray, queries: list[int], query_ids: np.ndarray) -> dict[int, list[int]]:
        return dict(zip(query_ids[queries].tolist(), gallery[ranked].tolist()))

    def answers(positives: list[set[int]], queries: list[int], query_ids: np.ndarray, gallery: np.ndarray) -> dict[int, list[int]]:
        return {int(query_ids[q]): sorted(int(gallery[p]) for p in wanted) for q, wanted in zip(queries, positives)}

    files = [
        cnclip_files.write_predictions(out_dir / "answers_t2i.jsonl", "text_id", "image_ids",
                                       answers(rankings.t2i_positives, rankings.t2i_queries, text_ids, image_ids)),
        cnclip_files.write_predictions(out_dir / "answers_i2t.jsonl", "image_id", "text_ids",
                                       answers(rankings.i2t_positives, rankings.i2t_queries, image_ids, text_ids)),
        cnclip_files.write_predictions(out_dir / "predictions_t2i.jsonl", "text_id", "image_ids",
                                       ids(rankings.t2i, image_ids, rankings.t2i_queries, text_ids)),
        cnclip_files.write_predictions(out_dir / "predictions_i2t.jsonl", "image_id", "text_ids",
                                       ids(rankings.i2t, text_ids, rankings.i2t_queries, image_ids)),
    ]
    for direction, ranked, positives in (("t2i", rankings.t2i, rankings.t2i_positives), ("i2t", rankings.i2t, rankings.i2t_positives)):
        hits = first_hits(ranked, positives)
        files.append(write_summary(out_dir / f"score_{direction}.json",
                                   cnclip_files.score_json({k: int((hits < k).sum()) for k in KS}, len(positives))))
    if with_features:
        files.append(cnclip_files.write_features(out_dir / "image_feat.jsonl", "image_id", data.image_ids, data.image_emb))
        files.append(cnclip_files.write_features(out_dir / "text_feat.jsonl", "text_id", data.text_ids, data.text_emb))
    return files


def _retrieval_report(data: RetrievalSet, rankings: Rankings, metrics: dict[str, float], curves: dict[str, list[float]],
                      context: dict[str, Any], examples: int, chain: Sequence[dict]) -> report.Report:
    headline = [["", "R@1", "R@5", "R@10", "mean recall"]]
    for direction, name in (("t2i", "text → image"), ("i2t", "image → text")):
        headline.append([name] + [f"{metrics[f'{direction}_r{k}']:.2f}" for k in KS] + [f"{metrics[f'{direction}_mean_recall']:.2f}"])
    headline.append(["both", "", "", "", f"{metrics['mean_recall']:.2f}"])
    shown = []
    # Spread over the split: neighbouring texts are often captions of the same image.
    rows = np.unique(np.linspace(0, len(rankings.t2i_queries) - 1, examples).astype(int)) if examples else []
    pictures = data.load_images({int(i) for row in rows for i in rankings.t2i[row][:EXAMPLE_IMAGES]}) if data.load_images else {}
    for row in rows:
        query, ranked, positives = rankings.t2i_queries[row], rankings.t2i[row], rankings.t2i_positives[row]
        shown.append(report.Example(
            query=data.texts[query] if data.texts else f"text {data.text_ids[query]}",
            results=[report.Result(label=f"image {data.image_ids[image]}", hit=int(image) in positives,
                                   image=pictures.get(int(image)))
                     for image in ranked[:EXAMPLE_IMAGES]]))
    notes = {key: context[key] for key in ("model_dir", "split", "image_feats", "text_feats", "annotations") if key in context}
    notes |= {"texts": len(data.text_ids), "images": len(data.image_ids), "chance mean recall": f"{metrics['chance_mean_recall']:.2f}"}
    tables, figures = [report.Table("Recall (%)", headline)], [report.Figure("Recall@k", report.line_plot(curves, "k", "recall@k (%)"))]
    if len(chain) > 1:
        tables.append(comparison_table(chain))
        figures.append(report.Figure("Recall@k: the start and every stage (T2I solid, I2T dashed)", report.line_plot(
            {f"{entry['model']} {d.upper()}": entry["recall_at_k"][d] for entry in chain for d in ("t2i", "i2t")},
            "k", "recall@k (%)", dashed=lambda name: name.endswith("I2T"))))
    return report.Report(title="zhclip retrieval evaluation", notes=notes, tables=tables, figures=figures, examples=shown)


def comparison_table(chain: Sequence[dict]) -> report.Table:
    """The start and each stage side by side: recall figures and the gain in mean recall over the start."""
    rows = [["model", *(f"{d.upper()} R@{k}" for d in ("t2i", "i2t") for k in KS), "mean recall", "gain over start"]]
    for entry in chain:
        gain = entry["mean_recall"] - chain[0]["mean_recall"]
        rows.append([entry["model"], *(f"{entry[f'{d}_r{k}']:.2f}" for d in ("t2i", "i2t") for k in KS),
                     f"{entry['mean_recall']:.2f}", "" if entry is chain[0] else f"{gain:+.2f}"])
    return report.Table("Start → stages (%)", rows)
