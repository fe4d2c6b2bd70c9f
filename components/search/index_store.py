"""An index folder on disk (local or s3://): how `zhclip index` writes it and how search loads it.

- `index.faiss`: the vectors (inner product of L2-normalised embeddings, i.e. cosine);
- `items.parquet`: row i of the index -> image id, location (see `search.gallery`), caption;
- `index.json`: the model that built it (URI, registered name and version, weights hash), the
  gallery, the FAISS settings, counts and the canary (`search.canary`). Search refuses a model whose
  weights differ. It is written last: a folder without it is an index still being written, never read.

An index *catalog* is a folder of index folders named by the building model's weights
(`<catalog>/<weights>/`, `weights_folder_name`): `zhclip index --publish <catalog>` and the pipeline's
index task write there, and `zhclip serve --follow` finds the index of each new champion in it.
"""

from __future__ import annotations

import itertools
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from zhclip.components.core.errors import ZhclipError
from zhclip.components.core.storage import Folder

INDEX_FILE, ITEMS_FILE, META_FILE = "index.faiss", "items.parquet", "index.json"
ITEM_SCHEMA = pa.schema([("id", pa.string()), ("location", pa.string()), ("caption", pa.string())])


# What an index searches with when index.search_params is empty, by the kind of index its factory
# string builds (bench/search.py: HNSW32 at efSearch=256 reaches recall@10 0.978 on 1M vectors; an
# IVF index visits 64 of its lists, all of them when it has fewer). A Flat or SQ/PQ scan has none.
HNSW_EF_SEARCH = 256
IVF_NPROBE = 64


def fitting_search_params(factory: str) -> str:
    """The search settings that fit the index `factory` builds: efSearch for a graph (HNSW), nprobe
    for inverted lists (IVF), none for a scan (Flat, SQ8, PQ)."""
    first = factory.split(",")[0].strip()  # the coarse structure; the rest says how vectors are stored
    if first.startswith("IVF"):
        lists = int("".join(itertools.takewhile(str.isdigit, first[3:])) or 0)
        return f"nprobe={min(IVF_NPROBE, lists) if lists else IVF_NPROBE}"
    if first.startswith("HNSW"):
        return f"efSearch={HNSW_EF_SEARCH}"
    return ""


def set_search_params(index, params: str) -> None:
    import faiss

    if params:
        try:
            faiss.ParameterSpace().set_index_parameters(index, params)
        except RuntimeError as err:
            raise ZhclipError(
                f"search params {params!r} do not fit this index ({str(err).strip().splitlines()[-1]})"
            ) from err


def weights_folder_name(weights_hash: str) -> str:
    """The catalog folder of the index built by these weights: the first 16 hex digits of their hash."""
    return weights_hash.removesuffix(".dir")[:16]


class IndexNotFound(ZhclipError):
    """No index of these weights (yet): `zhclip serve --follow` waits for the index task instead of failing."""


def find_index(uri: str, identity: dict[str, Any]) -> str:
    """The index folder for the model `identity`: `uri` itself when it is an index folder that model
    built, else the catalog entry `uri/<weights>`; IndexNotFound when neither exists (yet)."""
    folder = Folder(uri)
    if folder.kind(META_FILE).name == "File":
        meta = json.loads(folder.read_bytes(META_FILE))
        if meta["model"]["weights_hash"] != identity["weights_hash"]:
            raise IndexNotFound(_other_model(uri, meta, identity))
        return uri
    entry = f"{uri.rstrip('/')}/{weights_folder_name(identity['weights_hash'])}"
    if Folder(entry).kind(META_FILE).name == "File":
        return entry
    raise IndexNotFound(
        f"no index for {describe_model(identity)} at {uri}: neither an index folder nor a catalog holding "
        f"{entry}; build it with `zhclip index --gallery <gallery> --model {identity['uri']} --publish {uri}`"
    )


def publish_index(local: str | Path, catalog: str, weights_hash: str) -> str:
    """Copy the index folder `local` into `catalog` under its weights' name (local or s3://), the
    index file and items first and index.json last, so a reader never takes a half-copied index."""
    target = Folder(f"{catalog.rstrip('/')}/{weights_folder_name(weights_hash)}")
    target.filesystem.create_dir(target.root, recursive=True)
    uncommit(target)
    source = Folder(local)
    for name in (ITEMS_FILE, INDEX_FILE, META_FILE):
        with target.filesystem.open_output_stream(target.path(name)) as stream:
            stream.write(source.read_bytes(name))
    return target.uri


def uncommit(folder: Folder) -> None:
    """Remove index.json before an index folder is written again, so no reader takes the old
    index.json with the new files half-written."""
    if folder.kind(META_FILE).name == "File":
        folder.filesystem.delete_file(folder.path(META_FILE))


def save_index(out: str, index, meta: dict[str, Any]) -> None:
    """Write the FAISS index and `meta` (with the build time added) into the index folder `out` (local or s3://)."""
    import faiss

    folder = Folder(out)
    meta["built_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    with folder.filesystem.open_output_stream(folder.path(INDEX_FILE)) as stream:
        stream.write(faiss.serialize_index(index).tobytes())
    with folder.filesystem.open_output_stream(folder.path(META_FILE)) as stream:
        stream.write(json.dumps(meta, indent=2, ensure_ascii=False).encode("utf-8"))


def search_vectors(index, vectors: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
    """For each query vector, up to `k` (row, cosine) pairs of the FAISS `index`, best first."""
    scores, rows = index.search(np.ascontiguousarray(vectors, dtype=np.float32), min(k, int(index.ntotal)))
    return [
        [(int(row), float(score)) for row, score in zip(row_list, score_list) if row >= 0]
        for row_list, score_list in zip(rows, scores)
    ]


class SearchIndex:
    """A built index folder, loaded for search: the FAISS index, its items and how it was built."""

    def __init__(self, uri: str | Path):
        import faiss

        self.uri = str(uri)
        folder = Folder(self.uri)
        missing = [name for name in (META_FILE, ITEMS_FILE, INDEX_FILE) if folder.kind(name).name != "File"]
        if missing:
            raise ZhclipError(
                f"{self.uri} is not an index folder (no {', '.join(missing)}); build one with `zhclip index`"
            )
        self.meta = json.loads(folder.read_bytes(META_FILE))
        started = time.perf_counter()
        self.index = faiss.deserialize_index(np.frombuffer(folder.read_bytes(INDEX_FILE), dtype=np.uint8))
        set_search_params(self.index, self.meta.get("search_params", ""))
        with folder.filesystem.open_input_file(folder.path(ITEMS_FILE)) as handle:
            # One chunk: `zhclip index` writes a row group per batch, and looking a row up across
            # thousands of chunks took 0.76 ms per result at 1M images (0.004 ms in one chunk).
            self.items = pq.read_table(handle).combine_chunks()
        self.load_s = round(time.perf_counter() - started, 3)
        if self.items.num_rows != self.index.ntotal:
            raise ZhclipError(
                f"{self.uri}: {self.items.num_rows} items for {self.index.ntotal} vectors; rebuild the index"
            )

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    def search(self, vectors: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        return search_vectors(self.index, vectors, k)

    @property
    def canary(self) -> dict[str, Any]:
        """The captions and recall@10 recorded at build time (`search.canary`); empty for older indexes."""
        return self.meta.get("canary") or {}

    def captions(self, rows: list[int]) -> dict[int, str]:
        column = self.items.column("caption")
        return {row: column[row].as_py() for row in rows}

    def item(self, row: int) -> dict[str, str]:
        return {name: self.items.column(name)[row].as_py() for name in ITEM_SCHEMA.names}

    def check_model(self, identity: dict[str, Any]) -> None:
        """Fail when `identity` (from `model_identity`) is not the model that built this index."""
        if self.meta["model"]["weights_hash"] != identity["weights_hash"]:
            raise ZhclipError(_other_model(self.uri, self.meta, identity))


def _other_model(uri: str, meta: dict[str, Any], identity: dict[str, Any]) -> str:
    return (
        f"index {uri} was built by {describe_model(meta['model'])}, but the model given is "
        f"{describe_model(identity)}: their embeddings do not compare. Re-index with "
        f"`zhclip index --gallery {meta['gallery']} --model {identity['uri']} --out {uri}` "
        "(or `dvc repro index`), or serve the model that built it"
    )


def describe_model(identity: dict[str, Any]) -> str:
    version = f" ({identity['name']} version {identity['version']})" if identity.get("version") else ""
    return f"{identity['uri']}{version}, weights {identity['weights_hash'][:12]}"
