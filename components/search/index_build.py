"""Index: a gallery embedded by one model into a FAISS index, with each image's id and location.

Why FAISS: it is the reference library for vector search (Meta, used by clip-retrieval and most CLIP
demos), reads and writes an index as one byte string (so MinIO holds it as one object), and one
`index_factory` string chooses among exact search, graphs (HNSW) and compressed inverted lists
(IVF-PQ, a few bytes per image: what a 200M-image gallery needs), on CPU or GPU. LanceDB would add a
table format and a query engine the search service does not need.

An index folder (local or s3://) holds:

- `index.faiss`: the vectors (inner product of L2-normalised embeddings, i.e. cosine);
- `items.parquet`: row i of the index -> image id, location (see `zhclip.components.search.gallery`), caption;
- `index.json`: the model that built it (URI, registered name and version, weights hash), the
  gallery, the FAISS settings and counts. Search refuses a model whose weights differ.

Images stream through the model one batch at a time and items are written as they come, so memory
holds the index's vectors and one batch, never the gallery. With `workers`, pieces of the gallery
(a shard's row group, 256 files of a folder) go to that many Ray Data actors, each with the model
loaded once, on a GPU each when the Ray cluster has them (the cluster at $RAY_ADDRESS, or a local one).
Images that do not decode are not indexed; they are listed in the summary with the reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from zhclip.components.core.errors import ZhclipError
from zhclip.components.core.progress import progress_bar
from zhclip.components.core.settings import setting
from zhclip.components.core.storage import Folder
from zhclip.components.core.summaries import timed, write_summary
from zhclip.components.registry.embed import load_embedder, model_identity
from zhclip.components.search.canary import CaptionSampler, canary_recall
from zhclip.components.search.gallery import GalleryImage, Piece, first_of_each, gallery_pieces, read_piece
from zhclip.components.search.index_store import (
    ITEM_SCHEMA,
    ITEMS_FILE,
    fitting_search_params,
    save_index,
    search_vectors,
    set_search_params,
    uncommit,
    weights_folder_name,
)

REJECTED_SHOWN = 20  # rejected images listed in the summary (all are counted)


@dataclass
class IndexConfig:
    """Section `index`: the FAISS index `zhclip index` embeds a gallery into."""

    factory: str = setting("HNSW32", "faiss.index_factory: HNSW32 (graph), Flat (exact), IVF4096,PQ64 (huge galleries)")
    search_params: str = setting(
        "",
        "faiss.ParameterSpace string applied when searching; empty: what fits the factory "
        "(HNSW: efSearch=256, recall 0.98 at 1M in bench/search.py; IVF: nprobe=64; Flat: none)",
    )
    batch_size: int = setting(64, "images embedded at once")
    train_size: int = setting(100_000, "vectors an index that needs training (IVF, PQ) is trained on")
    workers: int = setting(
        0, "Ray Data actors embedding pieces of the gallery (one GPU each on a GPU cluster); 0: here"
    )
    backend: str = setting(
        "torch", "embeds images: torch (eager PyTorch, on a GPU when there is one), onnx or onnx-int8 (CPU)"
    )
    canary_size: int = setting(
        100,
        "captions of the gallery stored with the index, with the recall@10 they reach at build time; "
        "`zhclip serve` asks them again before it swaps to a new model (0: none)",
    )

    def __post_init__(self):
        if self.canary_size < 0:
            raise ValueError(f"canary_size must be 0 (no canary) or more, got {self.canary_size}")
        for name in ("batch_size", "train_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.workers < 0:
            raise ValueError(f"workers must be 0 (embed here) or more, got {self.workers}")


def new_index(factory: str, dim: int):
    """An empty inner-product FAISS index; fails naming the factory string when FAISS rejects it."""
    import faiss

    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise ZhclipError(
            f"index factory {factory!r} is not one FAISS builds ({str(err).strip().splitlines()[-1]}); "
            "e.g. HNSW32, Flat, IVF4096,PQ64"
        ) from err


class _VectorSink:
    """Adds batches to the index; one that needs training buffers its first `train_size` vectors first."""

    def __init__(self, index, train_size: int):
        self.index, self.train_size, self.pending = index, train_size, []

    def add(self, vectors: np.ndarray) -> None:
        if self.index.is_trained:
            self.index.add(vectors)
            return
        self.pending.append(vectors)
        if sum(len(chunk) for chunk in self.pending) >= self.train_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        buffered = np.concatenate(self.pending)
        self.pending = []
        if not self.index.is_trained:
            needed = max(self.index.d, _inverted_lists(self.index))  # k-means needs a point per list at least
            if len(buffered) < needed:  # below d, FAISS itself only warns and clusters badly
                raise ZhclipError(
                    f"{len(buffered)} images are too few to train this index (it needs {needed}); "
                    "use factory Flat or HNSW32, or fewer IVF lists"
                )
            self.index.train(buffered)
        self.index.add(buffered)


def _inverted_lists(index) -> int:
    """How many lists an IVF index clusters into (0 for any other index)."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    return int(ivf.nlist) if ivf is not None else 0


def _embed_batch(embedder, batch: list[GalleryImage], rejected: list[dict]) -> tuple[np.ndarray, list[GalleryImage]]:
    """The batch's embeddings; when a batch fails, each image alone, so one bad image costs only itself."""
    from mlflow.exceptions import MlflowException

    try:
        return np.asarray(
            embedder.predict(pd.DataFrame({"image": [image.blob for image in batch]})), dtype=np.float32
        ), batch
    except (ValueError, MlflowException):
        kept, vectors = [], []
        for image in batch:
            try:
                vectors.append(np.asarray(embedder.predict(pd.DataFrame({"image": [image.blob]})), dtype=np.float32))
                kept.append(image)
            except (ValueError, MlflowException) as err:
                rejected.append(
                    {"id": image.id, "location": image.location, "reason": str(err).removeprefix("row 0: ")}
                )
        return (np.concatenate(vectors) if vectors else np.zeros((0, embedder_dim(embedder)), np.float32)), kept


def embedder_dim(embedder) -> int:
    """The embedding width of a model folder's embedder or a pulled pyfunc."""
    return int(np.asarray(embedder.predict(pd.DataFrame({"text": ["维度"]}))).shape[1])


def _batches(images, size: int):
    batch = []
    for image in images:
        batch.append(image)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


Embedded = tuple[np.ndarray, list[GalleryImage], int]  # vectors, the images they belong to, images read


def _embedded_in_process(pieces: list[Piece], embedder, batch_size: int, rejected: list[dict]) -> Iterator[Embedded]:
    images = first_of_each(image for piece in pieces for image in read_piece(piece))
    for batch in _batches(images, batch_size):
        vectors, kept = _embed_batch(embedder, batch, rejected)
        yield vectors, kept, len(batch)


class _PieceEmbedder:
    """A Ray Data actor: the model loaded once, then whole pieces of the gallery embedded on its GPU
    (or CPU). Rejected images come back as rows with a reason and a zero vector."""

    def __init__(self, model: str, tracking_uri: str | None, batch_size: int, backend: str):
        self.embedder = load_embedder(model, tracking_uri, backend)
        self.dim, self.batch_size = embedder_dim(self.embedder), batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows: list[tuple[GalleryImage, str]] = []
        vectors = [np.zeros((0, self.dim), np.float32)]
        for piece in batch["piece"]:
            for images in _batches(first_of_each(read_piece(piece)), self.batch_size):
                rejected: list[dict] = []
                embedded, kept = _embed_batch(self.embedder, images, rejected)
                reasons = {entry["id"]: entry["reason"] for entry in rejected}
                rows += [(image, "") for image in kept] + [
                    (image, reasons[image.id]) for image in images if image.id in reasons
                ]
                vectors += [embedded, np.zeros((len(reasons), self.dim), np.float32)]
        return {
            "vector": np.concatenate(vectors),
            **{
                name: np.array(values, dtype=object)
                for name, values in (
                    ("id", [image.id for image, _ in rows]),
                    ("location", [image.location for image, _ in rows]),
                    ("caption", [image.caption for image, _ in rows]),
                    ("reason", [reason for _, reason in rows]),
                )
            },
        }


def _embedded_by_ray_data(
    pieces: list[Piece], model: str, tracking_uri: str | None, config: IndexConfig, rejected: list[dict]
) -> Iterator[Embedded]:
    """Pieces spread over `config.workers` actors (one GPU each when the cluster has GPUs), results
    streamed back in whatever order they finish; each image id is kept once."""
    import logging

    import ray
    import ray.data

    from zhclip.components.core.cluster import ray_runtime

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its per-dataset notices are not the step's output
    with ray_runtime():
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        dataset = ray.data.from_items(
            [{"piece": piece} for piece in pieces], override_num_blocks=len(pieces)
        ).map_batches(
            _PieceEmbedder,
            batch_size=1,
            batch_format="numpy",
            num_gpus=gpus,
            num_cpus=0 if gpus else 1,
            fn_constructor_args=(model, tracking_uri, config.batch_size, config.backend),
            compute=ray.data.ActorPoolStrategy(size=config.workers),
        )
        seen: set[str] = set()
        # batch_format="numpy": dicts of arrays (Ray types the batches of every format alike)
        batches = cast(Iterator[dict[str, np.ndarray]], dataset.iter_batches(batch_size=None, batch_format="numpy"))
        for batch in batches:
            keep, images = [], []
            rows = zip(batch["id"], batch["location"], batch["caption"], batch["reason"])
            for row, (image_id, location, caption, reason) in enumerate(rows):
                if image_id in seen:
                    continue
                seen.add(image_id)
                if reason:
                    rejected.append({"id": image_id, "location": location, "reason": reason})
                else:
                    keep.append(row)
                    images.append(GalleryImage(image_id, location, b"", caption))
            yield batch["vector"][keep], images, len(batch["id"])


def _text_embedder(embedder):
    return lambda texts: np.asarray(embedder.predict(pd.DataFrame({"text": texts})), dtype=np.float32)


class _BuiltIndex:
    """The index just built, searchable by the canary before index.json exists: captions are read
    from items.parquet row by row group (memory bounded by a row group, not by the gallery)."""

    def __init__(self, index, folder: Folder):
        self.index, self.folder = index, folder

    def search(self, vectors: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        return search_vectors(self.index, vectors, k)

    def captions(self, rows: list[int]) -> dict[int, str]:
        import pyarrow.dataset as ds

        items = ds.dataset(self.folder.path(ITEMS_FILE), filesystem=self.folder.filesystem, format="parquet")
        taken = items.take(pa.array(rows, pa.int64()), columns=["caption"]).column("caption").to_pylist()
        return dict(zip(rows, taken))


def _fill(folder: Folder, embedded, sink: _VectorSink, sampler: CaptionSampler, progress) -> None:
    """Every embedded batch into the index (`sink`), its images' rows into the folder's items file,
    and their captions into the canary's sample."""
    with (
        folder.filesystem.open_output_stream(folder.path(ITEMS_FILE)) as items_out,
        pq.ParquetWriter(items_out, ITEM_SCHEMA) as items,
        progress,
    ):
        for vectors, kept, read in embedded:
            if kept:
                sink.add(vectors)
                sampler.add(image.caption for image in kept)
                rows = {
                    "id": [i.id for i in kept],
                    "location": [i.location for i in kept],
                    "caption": [i.caption for i in kept],
                }
                items.write_table(pa.Table.from_pydict(rows, schema=ITEM_SCHEMA))
            progress.update(read)
        sink.flush()


def build_index(
    gallery: str | Path,
    out: str | Path | None,
    model: str,
    config: IndexConfig | None = None,
    tracking_uri: str | None = None,
    summary_path: str | Path | None = None,
    catalog: str | None = None,
) -> dict[str, Any]:
    """Embed every image of `gallery` with `model` (a folder or models:/ URI) into an index folder at
    `out`, or into the index catalog `catalog` under the model's weights (`index_store.find_index`)."""
    config = config or IndexConfig()
    identity = model_identity(model, tracking_uri)
    gallery = str(gallery)
    out = str(out) if out else f"{str(catalog).rstrip('/')}/{weights_folder_name(identity['weights_hash'])}"
    embedder = load_embedder(model, tracking_uri, config.backend)
    dim = embedder_dim(embedder)
    index = new_index(config.factory, dim)
    search_params = config.search_params or fitting_search_params(config.factory)
    set_search_params(index, search_params)
    pieces, total = gallery_pieces(gallery)
    folder = Folder(out)
    folder.filesystem.create_dir(folder.root, recursive=True)
    uncommit(folder)
    summary: dict[str, Any] = {
        "gallery": gallery,
        "index": out,
        "model": identity,
        "factory": config.factory,
        "search_params": search_params,
        "dim": dim,
    }
    rejected: list[dict] = []
    sink = _VectorSink(index, config.train_size)
    sampler = CaptionSampler(config.canary_size)
    spread = config.workers > 0 and len(pieces) > 1  # a single piece (a tsv) is read in order, here
    embedded = (
        _embedded_by_ray_data(pieces, model, tracking_uri, config, rejected)
        if spread
        else _embedded_in_process(pieces, embedder, config.batch_size, rejected)
    )
    with timed(summary):
        _fill(
            folder,
            embedded,
            sink,
            sampler,
            progress_bar(total=total, desc=f"index {gallery}", unit="images", leave=False),
        )
    if index.ntotal == 0:
        raise ZhclipError(
            f"gallery {gallery}: no image could be indexed ({len(rejected)} rejected, e.g. "
            f"{rejected[0]['reason'] if rejected else 'none found'})"
        )
    captions = sampler.captions()
    recall = canary_recall(_text_embedder(embedder), _BuiltIndex(index, folder), captions)
    summary.update(
        canary={"captions": captions, "recall_at_10": recall},
        images=int(index.ntotal),
        rejected=len(rejected),
        rejected_examples=rejected[:REJECTED_SHOWN],
        config=asdict(config),
    )
    save_index(out, index, summary)
    if summary_path:
        write_summary(summary_path, summary)
    return summary
