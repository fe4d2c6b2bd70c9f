"""Serve: the search service (service.py) as an HTTP API and a page, and the server that runs it.

The model comes from a folder or the registry (`models:/zhclip-demo@champion`) and embeds queries
through the same pyfunc code as any registry pull. Each index must have been built by those weights:
an index folder that model built, or its entry in an index catalog (`index_store.find_index`). With
`follow` the server moves to each new version the alias names, after a canary (`search.live`).

Endpoints (all answers JSON except the page and the thumbnails):

- `GET /healthz`: the process answers (liveness);
- `GET /readyz`: 200 once a model and its indexes answer, 503 before (readiness); the body says
  which, and the last registry check (a refused new version and why);
- `POST /admin/reload` with `Authorization: Bearer <token>`: check the model URI now (the token is
  $ZHCLIP_ADMIN_TOKEN, from a Kubernetes Secret; without it the endpoint is off);
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

import threading
import time
from pathlib import Path

from fastapi import FastAPI, Header, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from zhclip.components.core.errors import ZhclipError
from zhclip.components.core.fonts import CSS_FONT_STACK
from zhclip.components.search.service import Refused, SearchService, ServeConfig, index_names

PAGE = Path(__file__).with_name("page.html")


def _observe(service: SearchService, request: Request, status: int, seconds: float) -> None:
    """Count and time the request under its route's template (bounded labels), and log it."""
    route = request.scope.get("route")
    endpoint = getattr(route, "path", None) or "unmatched"
    service.metrics.requests.labels(endpoint, str(status)).inc()
    service.metrics.latency.labels(endpoint).observe(seconds)
    searched = endpoint.startswith("/api/search")
    pair = service.pair
    entry = {
        "method": request.method,
        "endpoint": endpoint,
        "status": status,
        "duration_ms": round(seconds * 1000, 2),
    }
    if searched and pair is not None:
        entry |= {
            "model_version": pair.identity.get("version"),
            "index": request.query_params.get("index") or next(iter(pair.indexes)),
        }
    service.access_log.write(entry, request.query_params.get("q") if searched else None)


ADMIN_TOKEN_ENV = "ZHCLIP_ADMIN_TOKEN"


def _check_admin(authorization: str | None) -> None:
    """Operators' endpoints need `Authorization: Bearer $ZHCLIP_ADMIN_TOKEN`; without the variable they are off."""
    import hmac
    import os

    token = os.environ.get(ADMIN_TOKEN_ENV, "")
    if not token:
        raise Refused(403, f"admin endpoints are off: start the server with ${ADMIN_TOKEN_ENV} set (a Secret)")
    given = (authorization or "").removeprefix("Bearer ").strip()
    if not hmac.compare_digest(given.encode(), token.encode()):  # constant time: the token is not guessed byte by byte
        raise Refused(401, f"send the header `Authorization: Bearer <token>` with the token in ${ADMIN_TOKEN_ENV}")


def create_app(service: SearchService):
    """The FastAPI application over `service` (loaded by the caller or at startup)."""
    app = FastAPI(title="zhclip search", description=__doc__ or "")  # "": FastAPI's default, for python -OO
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
        status, body = service.readiness()
        return JSONResponse(body, status_code=status)

    @app.post("/admin/reload")
    def reload(authorization: str | None = Header(None)) -> JSONResponse:
        _check_admin(authorization)
        outcome = service.live.check(force=True)
        return JSONResponse(outcome, status_code=409 if outcome["outcome"] in ("refused", "waiting", "error") else 200)

    @app.get("/api/indexes")
    def indexes() -> dict:
        pair, _, _ = service._index(None)
        return service.info(pair)

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
    index_uris: list[str],
    model: str,
    config: ServeConfig | None = None,
    tracking_uri: str | None = None,
    follow: bool = False,
) -> None:
    """Load in the background (so /healthz answers at once and /readyz once ready) and serve until stopped.

    Without `follow`, a model that did not build an index, or an index that cannot be read, stops the
    server with that error. With it, the server asks the registry every `follow_seconds` which version
    `model`'s alias names and moves to it after a canary, waiting (not ready) until a first pair loads.
    """
    import uvicorn

    config = config or ServeConfig()
    service = SearchService(index_names(index_uris), model, config, tracking_uri)
    server = uvicorn.Server(
        uvicorn.Config(create_app(service), host=config.host, port=config.port, log_level="warning", access_log=False)
    )
    stop = threading.Event()

    def load_then_follow() -> None:
        outcome = service.live.check()
        if service.pair is None and not follow:
            service.error = outcome["detail"]
            server.should_exit = True
            return
        if service.pair is not None:
            sizes = ", ".join(f"{name} ({index.size} images)" for name, index in service.pair.indexes.items())
            print(f"zhclip search on http://{config.host}:{config.port}/ : {sizes}", flush=True)
        if follow:
            service.live.follow(config.follow_seconds, stop)

    followed = f", then every {config.follow_seconds:g} s whether it moved" if follow else ""
    print(
        f"loading {model} and {', '.join(service.index_uris.values())}{followed} "
        "(/healthz answers now, /readyz once loaded) ...",
        flush=True,
    )
    threading.Thread(target=load_then_follow, daemon=True, name="load-and-follow").start()
    try:
        server.run()
    finally:
        stop.set()
    if service.error:
        raise ZhclipError(service.error)
