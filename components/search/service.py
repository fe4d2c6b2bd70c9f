"""Serve: text-to-image and image-to-image search over `zhclip index` folders, as an HTTP API and a page.

The model comes from a folder or the registry (`models:/zhclip-demo@champion`) and embeds queries
through the same pyfunc code as any registry pull. Each index must have been built by those weights
(`SearchIndex.check_model`): the server refuses to start otherwise.

Endpoints (all answers JSON except the page and the thumbnails):

- `GET /healthz`: the process answers (liveness);
- `GET /readyz`: 200 once the model and every index are loaded, 503 before (readiness);
- `GET /api/indexes`: each index's size and the model that built it;
- `GET /api/search?q=<text>&k=10&offset=0&index=<name>`: the top-k images for a Chinese text;
- `POST /api/search/image?k=10&offset=0&index=<name>` with the image's bytes as the body: similar images;
- `GET /api/images/<index>/<row>`: a JPEG thumbnail of a result;
- `GET /metrics`: Prometheus metrics (requests, latency, batching, the live model);
- `GET /`: the search page.

Every search answer names the model (registered name, version, weights) and the index it came from.

Bad input is answered 4xx with `{"error": "<what is wrong and what to send>"}`; nothing a client
sends takes the server down.
"""

from __future__ import annotations

import functools
import io
import queue
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from zhclip.components.core.errors import ZhclipError
from zhclip.components.core.settings import setting
from zhclip.components.evaluation.report import CSS_FONT_STACK
from zhclip.components.search.observability import AccessLog, ServiceMetrics

PAGE = Path(__file__).with_name("page.html")


@dataclass
class SearchConfig:
    """Section `search`: which model the search indexes and serves, and the galleries `dvc repro` indexes."""

    galleries: dict[str, str] = setting(
        {},
        "name: a gallery the champion indexes into indexes/<name> (dvc.yaml's index "
        "stages; `zhclip serve` serves them); {} leaves the stage out",
    )
    alias: str = setting("champion", "the registry alias (of register.model_name) that builds and serves the indexes")
    model_name: str = setting("zhclip-demo", "registered model name in the MLflow registry", shared_from="register")

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
    backend: str = setting(
        "torch",
        "embeds queries: torch (eager PyTorch), onnx (ONNX Runtime on CPU, exported once per weights) "
        "or onnx-int8 (the same, int8 weights)",
    )
    access_log: str = setting("-", "one JSON line per request: - (stdout), a file path, or empty for none")
    log_queries: bool = setting(False, "include each query's text in the access log (queries can be personal data)")

    def __post_init__(self):
        for name in ("max_k", "max_results", "max_query_chars", "max_image_pixels", "thumbnail_px", "text_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


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
    that fails is retried text by text, so one bad query fails only itself.
    """

    def __init__(self, embed: Callable[[pd.DataFrame], np.ndarray], max_batch: int, metrics: ServiceMetrics):
        self.embed, self.max_batch, self.metrics = embed, max_batch, metrics
        self.pending: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, daemon=True, name="text-batcher").start()

    def __call__(self, text: str) -> np.ndarray:
        future: Future = Future()
        self.pending.put((text, future, time.perf_counter()))
        return future.result()

    def _run(self) -> None:
        while True:
            batch = [self.pending.get()]
            while len(batch) < self.max_batch and not self.pending.empty():
                batch.append(self.pending.get_nowait())
            started = time.perf_counter()
            for _, _, queued in batch:
                self.metrics.queue_wait.observe(started - queued)
            self.metrics.batch_size.observe(len(batch))
            batch = [(text, future) for text, future, _ in batch]
            try:
                vectors = self.embed(pd.DataFrame({"text": [text for text, _ in batch]}))
                for (_, future), vector in zip(batch, vectors):
                    future.set_result(vector[None])
            except Exception:  # any failure: each text again on its own, so an error reaches only its own request
                for text, future in batch:
                    try:
                        future.set_result(self.embed(pd.DataFrame({"text": [text]})))
                    except Exception as err:  # handed to the request that sent it, which answers it
                        future.set_exception(err)


class SearchService:
    """The loaded model and indexes, and every check a query passes before it reaches them."""

    def __init__(self, index_uris: dict[str, str], model: str, config: ServeConfig, tracking_uri: str | None = None):
        self.index_uris, self.model, self.config, self.tracking_uri = index_uris, model, config, tracking_uri
        self.indexes: dict[str, Any] = {}
        self.error: str | None = None
        self.ready = threading.Event()
        # One call into the model at a time: torch spreads each over the cores already, and text
        # queries that arrive meanwhile wait in the batcher to go through together.
        self.model_lock = threading.Lock()
        self.metrics = ServiceMetrics()
        self.access_log = AccessLog(config.access_log, config.log_queries)

    def load(self) -> None:
        """Load the model and the indexes; an index built by other weights fails naming both."""
        from zhclip.components.registry.embed import load_embedder, model_identity
        from zhclip.components.search.index_store import SearchIndex

        try:
            self.identity = model_identity(self.model, self.tracking_uri)
            indexes = {name: SearchIndex(uri) for name, uri in self.index_uris.items()}
            for index in indexes.values():
                index.check_model(self.identity)
            self.embedder = load_embedder(self.model, self.tracking_uri, self.config.backend)
            self.indexes = indexes
            self._embed(pd.DataFrame({"text": ["预热"]}))  # the first call pays for lazy initialisation, not a user
            self.embed_text = _TextBatcher(self._embed, self.config.text_batch, self.metrics)
            self.metrics.live(self.identity, self.config.backend, self.index_uris)
            self.ready.set()
        except ZhclipError as err:
            self.error = str(err)
        except Exception as err:  # the loading thread must end in a state /readyz reports, never silently
            traceback.print_exc()
            self.error = f"loading failed: {type(err).__name__}: {err}"

    def answered_by(self) -> dict[str, Any]:
        """The model behind every answer: registered name and version (None for a folder), weights."""
        return {
            "name": self.identity.get("name"),
            "version": self.identity.get("version"),
            "weights_hash": self.identity["weights_hash"][:12],
        }

    def info(self) -> dict[str, Any]:
        return {
            "model": self.identity,
            "indexes": {
                name: {
                    "images": index.size,
                    "uri": index.uri,
                    "built_at": index.meta.get("built_at"),
                    "gallery": index.meta.get("gallery"),
                    "factory": index.meta.get("factory"),
                }
                for name, index in self.indexes.items()
            },
        }

    def _index(self, name: str | None):
        if not self.ready.is_set():
            raise Refused(503, self.error or "still loading the model and the index; retry when /readyz answers 200")
        name = name or next(iter(self.indexes))
        if name not in self.indexes:
            raise Refused(404, f"no index named {name!r}; this server has: {', '.join(self.indexes)}")
        return name, self.indexes[name]

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

    def _embed(self, frame: pd.DataFrame) -> np.ndarray:
        from mlflow.exceptions import MlflowException

        try:
            with self.model_lock:
                return np.asarray(self.embedder.predict(frame), dtype=np.float32)
        except (ValueError, MlflowException) as err:
            raise Refused(
                415 if "image" in frame else 400, str(getattr(err, "message", err)).removeprefix("row 0: ")
            ) from err

    def _results(self, name: str, index, vector: np.ndarray, k: int, offset: int, query: dict) -> dict[str, Any]:
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
            "model": self.answered_by(),
            "index": name,
            "k": k,
            "offset": offset,
            "total": index.size,
            "results": results,
            "search_ms": round((time.perf_counter() - started) * 1000, 2),
        }

    def search_text(self, q: str | None, k: str | None, offset: str | None, index: str | None) -> dict[str, Any]:
        name, found = self._index(index)
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
        return self._results(name, found, self.embed_text(text), k_value, offset_value, {"query": text})

    def search_image(self, body: bytes, k: str | None, offset: str | None, index: str | None) -> dict[str, Any]:
        name, found = self._index(index)
        k_value, offset_value = self._page(k, offset)
        if not body:
            raise Refused(400, "the upload is empty: send the image file's bytes as the request body")
        self._check_image(body)
        vector = self._embed(pd.DataFrame({"image": [body]}))
        return self._results(name, found, vector, k_value, offset_value, {"query": f"image ({len(body)} bytes)"})

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
        name, found = self._index(index)
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
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.NEAREST)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


def _observe(service: SearchService, request: Request, status: int, seconds: float) -> None:
    """Count and time the request under its route's template (bounded labels), and log it."""
    route = request.scope.get("route")
    endpoint = getattr(route, "path", None) or "unmatched"
    service.metrics.requests.labels(endpoint, str(status)).inc()
    service.metrics.latency.labels(endpoint).observe(seconds)
    searched = endpoint.startswith("/api/search")
    entry = {
        "method": request.method,
        "endpoint": endpoint,
        "status": status,
        "duration_ms": round(seconds * 1000, 2),
    }
    if searched and service.ready.is_set():
        entry |= {
            "model_version": service.identity.get("version"),
            "index": request.query_params.get("index") or next(iter(service.indexes)),
        }
    service.access_log.write(entry, request.query_params.get("q") if searched else None)


def create_app(service: SearchService):
    """The FastAPI application over `service` (loaded by the caller or at startup)."""
    app = FastAPI(title="zhclip search", description=__doc__)
    page = PAGE.read_text(encoding="utf-8").replace("{{ fonts }}", CSS_FONT_STACK)

    @app.exception_handler(Refused)
    async def refused(request: Request, err: Refused) -> JSONResponse:
        return JSONResponse({"error": err.message}, status_code=err.status)

    @app.middleware("http")
    async def observed(request: Request, call_next):
        started = time.perf_counter()
        status = 500  # what the client gets when the handler raises past every exception handler
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            _observe(service, request, status, time.perf_counter() - started)

    @app.get("/metrics")
    def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "alive"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        if service.ready.is_set():
            return JSONResponse({"status": "ready", **service.info()})
        return JSONResponse(
            {"status": "failed" if service.error else "loading", "error": service.error}, status_code=503
        )

    @app.get("/api/indexes")
    def indexes() -> dict:
        service._index(None)
        return service.info()

    @app.get("/api/search")
    def search(q: str | None = None, k: str | None = None, offset: str | None = None, index: str | None = None) -> dict:
        return service.search_text(q, k, offset, index)

    @app.post("/api/search/image")
    async def search_image(request: Request, k: str | None = None, offset: str | None = None, index: str | None = None):
        limit = service.max_upload_bytes()
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise Refused(
                413, f"the upload is {int(declared) / 2**20:.1f} MB; at most {service.config.max_upload_mb:g} MB"
            )
        body = bytearray()
        async for chunk in request.stream():  # counted as it arrives: a body without Content-Length is bounded too
            body += chunk
            if len(body) > limit:
                raise Refused(413, f"the upload is over {service.config.max_upload_mb:g} MB")
        return await run_in_threadpool(service.search_image, bytes(body), k, offset, index)

    @app.get("/api/images/{index}/{row}")
    def image(index: str, row: str) -> Response:
        return Response(
            service.thumbnail(index, row), media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"}
        )

    @app.get("/", response_class=HTMLResponse)
    def home() -> str:
        return page

    return app


def serve(
    index_uris: list[str], model: str, config: ServeConfig | None = None, tracking_uri: str | None = None
) -> None:
    """Load in the background (so /healthz answers at once and /readyz once ready) and serve until stopped.

    A model that did not build an index, or an index that cannot be read, stops the server with that error.
    """
    import uvicorn

    config = config or ServeConfig()
    service = SearchService(index_names(index_uris), model, config, tracking_uri)
    server = uvicorn.Server(
        uvicorn.Config(create_app(service), host=config.host, port=config.port, log_level="warning", access_log=False)
    )

    def load_then_announce() -> None:
        service.load()
        if service.error:
            server.should_exit = True
        else:
            sizes = ", ".join(f"{name} ({index.size} images)" for name, index in service.indexes.items())
            print(
                f"zhclip search on http://{config.host}:{config.port}/ : {sizes}, model {service.identity['uri']}",
                flush=True,
            )

    print(
        f"loading {model} and {', '.join(service.index_uris.values())} (/healthz answers now, /readyz once loaded) ...",
        flush=True,
    )
    threading.Thread(target=load_then_announce, daemon=True).start()
    server.run()
    if service.error:
        raise ZhclipError(service.error)
