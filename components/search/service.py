"""Search: text-to-image and image-to-image search over `zhclip index` folders, with the model that
built them, and the settings of the search service (`search`, `serve`).

The model comes from a folder or the registry (`models:/zhclip-demo@champion`) and embeds queries
through the same pyfunc code as any registry pull. Each index must have been built by those weights:
an index folder that model built, or its entry in an index catalog (`index_store.find_index`). With
`follow` the service moves to each new version the alias names, after a canary (`search.live`).
Concurrent text queries share model calls (`_TextBatcher`). Bad input raises `Refused` with the HTTP
status and what to send; the HTTP layer (http_app.py) answers it.
"""

from __future__ import annotations

import functools
import io
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from zhclip.components.core.errors import ZhclipError
from zhclip.components.core.settings import setting, shared
from zhclip.components.registry.register import RegisterConfig
from zhclip.components.search.live import Embed, LiveModel, LivePair
from zhclip.components.search.observability import AccessLog, ServiceMetrics


@dataclass
class SearchConfig:
    """Section `search`: which model the search indexes and serves, and the galleries `dvc repro` indexes."""

    galleries: dict[str, str] = setting(
        {},
        "name: a gallery the champion indexes into indexes/<name> (dvc.yaml's index "
        "stages; `zhclip serve` serves them); {} leaves the stage out",
    )
    alias: str = setting("champion", "the registry alias (of register.model_name) that builds and serves the indexes")
    model_name: str = shared(RegisterConfig, "model_name")

    def model_uri(self) -> str:
        """The registry URI the indexes are built and served with, e.g. models:/zhclip-demo@champion."""
        return f"models:/{self.model_name}@{self.alias}"


@dataclass
class ServeConfig:
    """Section `serve`: where `zhclip serve` listens and what it accepts."""

    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0 in a container)")
    port: int = setting(8000, "port to listen on")
    max_k: int = setting(100, "results per page")
    max_results: int = setting(1000, "offset + k: how deep paging goes")
    max_query_chars: int = setting(200, "a caption is a sentence; the text tower reads about 50 tokens of it")
    max_upload_mb: float = setting(20.0, "largest image upload accepted, in MB (refused from Content-Length)")
    max_image_pixels: int = setting(25_000_000, "larger uploads are refused from their header, before decoding")
    thumbnail_px: int = setting(192, "longest side of the result thumbnails, in pixels")
    text_batch: int = setting(32, "queries embedded together when they arrive at once")
    batch_wait_ms: float = setting(
        10.0,
        "at most how long a batch of queries waits for the clients of the last batch to come back, "
        "so concurrent clients share model calls (8 clients: 4 -> 8 texts per call); one client never "
        "waits. 0: only the queries already queued",
    )
    backend: str = setting(
        "torch",
        "embeds queries: torch (eager PyTorch), onnx (ONNX Runtime on CPU, exported once per weights) "
        "or onnx-int8 (the same, int8 weights)",
    )
    follow_seconds: float = setting(
        30.0, "with --follow: how often the registry is asked whether the alias moved, in seconds"
    )
    canary_margin: float = setting(
        0.05,
        "a new model is refused when its canary recall@10 falls more than this below its index's "
        "build-time figure or the live model's",
    )
    access_log: str = setting("-", "one JSON line per request: - (stdout), a file path, or empty for none")
    log_queries: bool = setting(False, "include each query's text in the access log (queries can be personal data)")

    def __post_init__(self):
        for name in ("max_k", "max_results", "max_query_chars", "max_image_pixels", "thumbnail_px", "text_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be 0 or more, got {self.batch_wait_ms}")
        if self.follow_seconds <= 0:
            raise ValueError(f"follow_seconds must be positive, got {self.follow_seconds}")
        if not 0 <= self.canary_margin <= 1:
            raise ValueError(f"canary_margin is a recall difference from 0 to 1, got {self.canary_margin}")


class Refused(Exception):
    """A request the server answers with `status` and `message` (never a traceback)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def index_names(uris: list[str]) -> dict[str, str]:
    """name -> URI, from `name=uri` or a bare URI (named by its last folder)."""
    named = {}
    for uri in uris:
        name, _, where = uri.partition("=") if "=" in uri.split("://")[0] else ("", "", uri)
        name = name or where.rstrip("/").rsplit("/", 1)[-1]
        if name in named:
            raise ZhclipError(f"two indexes are named {name!r}; name them: --index NAME=URI")
        named[name] = where
    if not named:
        raise ZhclipError("give at least one --index (a folder `zhclip index` wrote, local or s3://)")
    return named


class _TextBatcher:
    """Texts that arrive while the model is busy go through it together in its next call.

    One text costs the text tower almost as much as a few dozen (on a GPU, or CPU cores' vector
    units), so under concurrent load this raises queries/s; alone, a query waits for nothing. A batch
    that fails is retried text by text, so one bad query fails only itself. Each text names the
    embedder it is for: across a swap, texts of the old and the new model go each through their own.

    Why a batch may wait up to `wait_s`: with one model call at a time, concurrent clients split
    into groups that take turns (8 clients on 2 vCPUs: two groups of 4, one computing while the
    other queues), and two calls of 4 cost more than one of 8 (a RoBERTa-base tower: 46 ms for one
    text, 93 ms for eight). So a batch waits for the clients of the last batch to come back when
    others queued meanwhile (the groups merge), and for as many as the last batch held otherwise.
    One client (batches of one, nothing queued meanwhile) never waits.
    """

    def __init__(self, embed: Embed, max_batch: int, wait_s: float, metrics: ServiceMetrics):
        self.embed, self.max_batch, self.wait_s, self.metrics = embed, max_batch, wait_s, metrics
        self.pending: queue.Queue = queue.Queue()
        self.last_size = 1
        threading.Thread(target=self._run, daemon=True, name="text-batcher").start()

    def __call__(self, embedder: Any, text: str) -> np.ndarray:
        future: Future = Future()
        self.pending.put((embedder, text, future, time.perf_counter()))
        return future.result()

    def _gather(self) -> list:
        queued_meanwhile = self.pending.qsize()  # arrived while the last batch was in the model
        batch = [self.pending.get()]
        expected = min(self.max_batch, self.last_size + queued_meanwhile)
        deadline = time.perf_counter() + self.wait_s
        while len(batch) < self.max_batch:
            if not self.pending.empty():
                batch.append(self.pending.get_nowait())
                continue
            left = deadline - time.perf_counter()
            if len(batch) >= expected or left <= 0:
                break
            try:
                batch.append(self.pending.get(timeout=left))
            except queue.Empty:
                break
        self.last_size = len(batch)
        return batch

    def _run(self) -> None:
        while True:
            batch = self._gather()
            started = time.perf_counter()
            by_embedder: dict[int, list] = {}
            for embedder, text, future, queued in batch:
                self.metrics.queue_wait.observe(started - queued)
                by_embedder.setdefault(id(embedder), []).append((embedder, text, future))
            for texts in by_embedder.values():
                self.metrics.batch_size.observe(len(texts))
                self._embed_together(texts[0][0], [(text, future) for _, text, future in texts])

    def _embed_together(self, embedder: Any, batch: list[tuple[str, Future]]) -> None:
        try:
            vectors = self.embed(embedder, pd.DataFrame({"text": [text for text, _ in batch]}))
            for (_, future), vector in zip(batch, vectors):
                future.set_result(vector[None])
        except Exception:  # any failure: each text again on its own, so an error reaches only its own request
            for text, future in batch:
                try:
                    future.set_result(self.embed(embedder, pd.DataFrame({"text": [text]})))
                except Exception as err:  # handed to the request that sent it, which answers it
                    future.set_exception(err)


class SearchService:
    """The live model and indexes, and every check a query passes before it reaches them."""

    def __init__(self, index_uris: dict[str, str], model: str, config: ServeConfig, tracking_uri: str | None = None):
        self.index_uris, self.model, self.config, self.tracking_uri = index_uris, model, config, tracking_uri
        # One call into a model at a time: torch spreads each over the cores already, and text
        # queries that arrive meanwhile wait in the batcher to go through together.
        self.model_lock = threading.Lock()
        self.metrics = ServiceMetrics()
        self.access_log = AccessLog(config.access_log, config.log_queries)
        self.live = LiveModel(
            model, index_uris, config.backend, config.canary_margin, tracking_uri, self.metrics, self._embed
        )
        self.embed_text = _TextBatcher(self._embed, config.text_batch, config.batch_wait_ms / 1000, self.metrics)
        self.error: str | None = None  # why the first load failed, when the server does not follow the registry

    @property
    def pair(self) -> LivePair | None:
        return self.live.pair

    def answered_by(self, pair: LivePair) -> dict[str, Any]:
        """The model behind an answer: registered name and version (None for a folder), weights."""
        return {
            "name": pair.identity.get("name"),
            "version": pair.identity.get("version"),
            "weights_hash": pair.identity["weights_hash"][:12],
        }

    def info(self, pair: LivePair) -> dict[str, Any]:
        return {
            "model": pair.identity,
            "loaded_at": pair.loaded_at,
            "indexes": {
                name: {
                    "images": index.size,
                    "uri": index.uri,
                    "built_at": index.meta.get("built_at"),
                    "gallery": index.meta.get("gallery"),
                    "factory": index.meta.get("factory"),
                    "canary_recall_at_10": pair.canary[name],
                    "canary_recall_at_build": index.canary.get("recall_at_10"),
                }
                for name, index in pair.indexes.items()
            },
        }

    def readiness(self) -> tuple[int, dict[str, Any]]:
        """/readyz: 200 with the live pair, or 503 with why none answers yet; both with the last check."""
        pair, last = self.pair, {"last_check": self.live.last, "refused": dict(self.live.refused)}
        if pair is not None:
            return 200, {"status": "ready", **self.info(pair), **last}
        state = "failed" if self.error else "loading" if not self.live.last else "waiting"
        return 503, {"status": state, "error": self.error or self.live.last.get("detail"), **last}

    def _index(self, name: str | None) -> tuple[LivePair, str, Any]:
        pair = self.pair  # read once: the whole request is answered by one pair, even across a swap
        if pair is None:
            raise Refused(503, self.error or "still loading the model and the index; retry when /readyz answers 200")
        name = name or next(iter(pair.indexes))
        if name not in pair.indexes:
            raise Refused(404, f"no index named {name!r}; this server has: {', '.join(pair.indexes)}")
        return pair, name, pair.indexes[name]

    def _page(self, k: str | None, offset: str | None) -> tuple[int, int]:
        limits = self.config
        k_value = _integer("k", k, 10, 1, limits.max_k)
        offset_value = _integer("offset", offset, 0, 0, limits.max_results - 1)
        if offset_value + k_value > limits.max_results:
            raise Refused(
                400,
                f"offset + k = {offset_value + k_value} goes past the deepest result served ({limits.max_results}); "
                "refine the query instead",
            )
        return k_value, offset_value

    def _embed(self, embedder: Any, frame: pd.DataFrame) -> np.ndarray:
        from mlflow.exceptions import MlflowException

        try:
            with self.model_lock:
                return np.asarray(embedder.predict(frame), dtype=np.float32)
        except (ValueError, MlflowException) as err:
            raise Refused(
                415 if "image" in frame else 400, str(getattr(err, "message", err)).removeprefix("row 0: ")
            ) from err

    def _results(
        self, pair: LivePair, name: str, index, vector: np.ndarray, k: int, offset: int, query: dict
    ) -> dict[str, Any]:
        started = time.perf_counter()
        hits = index.search(vector, offset + k)[0][offset:]
        results = [
            {
                "rank": offset + rank + 1,
                "row": row,
                "score": round(score, 4),
                **index.item(row),
                "image_url": f"/api/images/{name}/{row}",
            }
            for rank, (row, score) in enumerate(hits)
        ]
        for result in results:
            result.pop("location")  # where the image lives (bucket paths) is the server's business
        return {
            **query,
            "model": self.answered_by(pair),
            "index": name,
            "index_built_at": index.meta.get("built_at"),
            "k": k,
            "offset": offset,
            "total": index.size,
            "results": results,
            "search_ms": round((time.perf_counter() - started) * 1000, 2),
        }

    def search_text(self, q: str | None, k: str | None, offset: str | None, index: str | None) -> dict[str, Any]:
        pair, name, found = self._index(index)
        k_value, offset_value = self._page(k, offset)
        text = (q or "").strip()
        if not text:
            raise Refused(400, "the query is empty: pass q=<a Chinese description>, e.g. q=红色的圆形")
        if len(text) > self.config.max_query_chars:
            raise Refused(
                400,
                f"the query is {len(text)} characters long; at most {self.config.max_query_chars} "
                "(the model reads about 50 tokens of a caption)",
            )
        vector = self.embed_text(pair.embedder, text)
        return self._results(pair, name, found, vector, k_value, offset_value, {"query": text})

    def search_image(self, body: bytes, k: str | None, offset: str | None, index: str | None) -> dict[str, Any]:
        pair, name, found = self._index(index)
        k_value, offset_value = self._page(k, offset)
        if not body:
            raise Refused(400, "the upload is empty: send the image file's bytes as the request body")
        self._check_image(body)
        vector = self._embed(pair.embedder, pd.DataFrame({"image": [body]}))
        return self._results(pair, name, found, vector, k_value, offset_value, {"query": f"image ({len(body)} bytes)"})

    def _check_image(self, body: bytes) -> None:
        import warnings

        from PIL import Image, UnidentifiedImageError

        limit = self.config.max_image_pixels
        try:
            with warnings.catch_warnings():  # PIL's own bomb warning: the limit below is the one that applies
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(body))  # the header only: a huge image is refused before it is decoded
        except Image.DecompressionBombError as err:
            raise Refused(
                413, f"the image is too large to decode ({err}); at most {limit / 1e6:.1f} megapixels"
            ) from err
        except (UnidentifiedImageError, OSError) as err:
            raise Refused(
                415, f"the upload ({len(body)} bytes) is not an image PIL can read; send a JPEG, PNG or WebP file"
            ) from err
        pixels = image.width * image.height
        if pixels > limit:
            raise Refused(
                413,
                f"the image is {image.width}x{image.height} = {pixels / 1e6:.1f} megapixels, above the "
                f"limit of {limit / 1e6:.1f}; send a smaller copy",
            )

    def max_upload_bytes(self) -> int:
        return int(self.config.max_upload_mb * 2**20)

    def thumbnail(self, index: str, row: str) -> bytes:
        _, _, found = self._index(index)
        number = _integer("row", row, None, 0, found.size - 1, status=404)
        return _thumbnail(found.item(number)["location"], self.config.thumbnail_px)


def _integer(name: str, value: str | None, default: int | None, low: int, high: int, status: int = 400) -> int:
    if value is None or value == "":
        if default is None:
            raise Refused(status, f"{name} is missing")
        return default
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or not low <= number <= high:
        raise Refused(status, f"{name} must be an integer from {low} to {high}, got {value!r:.40}")
    return number


@functools.lru_cache(maxsize=2048)
def _thumbnail(location: str, size: int) -> bytes:
    from PIL import Image

    from zhclip.components.search.gallery import read_image

    image = Image.open(io.BytesIO(read_image(location))).convert("RGB")
    image.thumbnail((size, size))
    if min(image.size) < size // 2:  # the demo's images are tiny: draw them large and sharp
        scale = size / max(image.size)
        image = image.resize(
            (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.NEAREST
        )
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()
