"""Search quality and speed: the FAISS index `zhclip index` builds, alone and behind `zhclip serve`.

    python -m bench.search ann --vectors 1000000 --data uniform --factory HNSW32 \
        --search efSearch=128 --search efSearch=512
    python -m bench.search http --vectors 1000000 --concurrency 1 --concurrency 8 --seconds 30

`ann`: random 512-d unit vectors, indexed with a FAISS factory string; for each search setting, the
recall@10 against exact search (FAISS Flat) over `--queries` queries, the latency of one query at a
time (as the service sends them) and the throughput of batched queries; plus build time and memory.
Two kinds of data, queries drawn like the gallery: `uniform` (i.i.d. on the sphere, the worst case:
every point is about as far from a query as any other, so no index can skip much of the gallery)
and `lowdim` (points near a random 32-dimensional subspace, plus noise: embeddings of real images
vary along far fewer directions than their width, which is what makes graph indexes work).

`http`: a gallery of `--vectors` random vectors served by `zhclip serve` with a random model of
`--preset` (tiny, or ViT-B-16 whose text tower is RoBERTa-base) embedding 512 wide, under `--concurrency`
clients sending Chinese queries, with each `--backend` in turn (torch and onnx by default, the same
index and model); latency p50/p99 and queries/s as the clients see them (both on this machine, so
they share its cores).

`swap`: two random models of `--preset` registered (in a scratch MLflow registry) with an index
each in a catalog, `zhclip serve --follow` on the champion, `--concurrency` clients (default 8)
for `--seconds`; a third of the way in the alias moves to the other version. Queries/s and p50/p99
before the move, while the new pair loads and after the swap; failed answers, answers without a
version, and answers from the old version after the first from the new one.

    python -m bench.search swap --vectors 100000 --preset ViT-B-16 --seconds 60

`soak`: the same server (first `--backend`, default torch) under `--concurrency` clients (default 8)
for `--seconds` (600 for the 10-minute soak), measured in windows of `--window` seconds (10): queries/s, p99,
non-200 answers and the server's resident memory after each window; the last line gives the memory
growth from the end of the first minute to the end, and the total of failed answers.

    python -m bench.search soak --vectors 100000 --preset ViT-B-16 --seconds 600

One JSON line per measurement on stdout (and appended to `--out`).
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.measure import emit, resident_mb
from zhclip.components.search.index_build import IndexConfig, new_index
from zhclip.components.search.index_store import fitting_search_params, set_search_params

K = 10
LOW_DIM, LOW_DIM_NOISE = 32, 0.1


def unit_rows(rows: int, dim: int, rng: np.random.Generator, basis: np.ndarray | None = None) -> np.ndarray:
    """`rows` unit vectors made 50k at a time: uniform, or in the span of `basis` plus noise of norm LOW_DIM_NOISE."""
    out = np.empty((rows, dim), dtype=np.float32)
    for start in range(0, rows, 50_000):
        count = min(50_000, rows - start)
        block = rng.standard_normal((count, dim), dtype=np.float32)
        if basis is not None:
            inside = rng.standard_normal((count, basis.shape[0]), dtype=np.float32) @ basis / np.sqrt(basis.shape[0])
            block = inside + LOW_DIM_NOISE * block / np.sqrt(dim)
        out[start : start + count] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def dataset(kind: str, vectors: int, queries: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((dim, LOW_DIM)))[0].T.astype(np.float32) if kind == "lowdim" else None
    return unit_rows(vectors, dim, rng, basis), unit_rows(queries, dim, rng, basis)


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2)}


def bench_ann(args) -> None:
    import faiss

    gallery, queries = dataset(args.data, args.vectors, args.queries, args.dim)
    started = time.perf_counter()
    exact = faiss.IndexFlatIP(args.dim)
    exact.add(gallery)
    _, truth = exact.search(queries, K)
    exact_s = time.perf_counter() - started
    del exact
    before = resident_mb()
    started = time.perf_counter()
    index = new_index(args.factory, args.dim)
    if not index.is_trained:
        index.train(gallery[: IndexConfig.train_size])
    index.add(gallery)
    build_s = time.perf_counter() - started
    memory = {
        "index_mb": round(faiss.serialize_index(index).nbytes / 2**20, 1),
        "rss_growth_mb": round(resident_mb() - before, 1),
    }
    common = {
        "bench": "ann",
        "data": args.data,
        "vectors": args.vectors,
        "dim": args.dim,
        "queries": args.queries,
        "factory": args.factory,
        "build_s": round(build_s, 1),
        **memory,
        "threads": faiss.omp_get_max_threads(),
        "exact_ms_per_query_batched": round(exact_s / args.queries * 1000, 2),
        "machine": args.machine,
    }
    for params in args.search or [fitting_search_params(args.factory)]:
        set_search_params(index, params)
        started = time.perf_counter()
        _, found = index.search(queries, K)
        batched_qps = args.queries / (time.perf_counter() - started)
        recall = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(truth, found)]))
        single = []
        for query in queries[: args.single_queries]:
            started = time.perf_counter()
            index.search(query[None], K)
            single.append(time.perf_counter() - started)
        emit(
            {
                **common,
                "search": params,
                "recall_at_10": round(recall, 4),
                "batched_qps": round(batched_qps, 1),
                **{f"single_{key}": value for key, value in percentiles(single).items()},
            },
            args.out,
        )


def random_model(root: Path, preset: str, dim: int, name: str = "model") -> Path:
    """A random model of `preset` whose embeddings are `dim` wide (its text tower is what a query costs)."""
    from transformers import AutoModel

    from zhclip.model.presets import PRESETS, build_processor, default_vocab_path, make_config, save_model

    spec = {**PRESETS[preset], "projection_dim": dim}
    processor = build_processor(default_vocab_path(), spec["vision"]["image_size"], 52)
    return save_model(
        AutoModel.from_config(make_config(spec, vocab_size=len(processor.tokenizer))), processor, root / name
    )


def synthetic_index(
    root: Path, model_dir: Path, vectors: int, dim: int, factory: str, search: str, name: str = "index"
) -> tuple[Path, float]:
    """An index folder of random vectors that `zhclip serve` accepts for `model_dir`; returns it and its build time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from zhclip.components.registry.embed import model_identity
    from zhclip.components.search.index_store import ITEM_SCHEMA, ITEMS_FILE, save_index

    gallery, _ = dataset("lowdim", vectors, 1, dim)
    started = time.perf_counter()
    index = new_index(factory, gallery.shape[1])
    if not index.is_trained:
        index.train(gallery[: IndexConfig.train_size])
    index.add(gallery)
    build_s = time.perf_counter() - started
    out = root / name
    out.mkdir()
    ids = [f"img{row}" for row in range(vectors)]
    pq.write_table(
        pa.table({"id": ids, "location": ["synthetic"] * vectors, "caption": [""] * vectors}, schema=ITEM_SCHEMA),
        out / ITEMS_FILE,
    )
    save_index(
        str(out),
        index,
        {
            "gallery": "synthetic",
            "model": model_identity(str(model_dir)),
            "factory": factory,
            "search_params": search,
            "dim": gallery.shape[1],
            "images": vectors,
        },
    )
    return out, build_s


QUERIES = [
    "红色的圆形",
    "一只小狗在草地上奔跑",
    "蓝色背景上的黄色三角形",
    "手写的数字七",
    "城市夜景",
    "穿着汉服的女孩",
    "一碗热腾腾的面条",
    "海边的日落",
    "绿色的正方形",
    "白色的猫",
]


@dataclass
class Answer:
    """One request as a client saw it: when it finished (seconds from the start), how long it took,
    its HTTP status and the model version the answer names."""

    at_s: float
    seconds: float
    status: int
    version: str | None


def answers(port: int, concurrency: int, seconds: float, during=None) -> list[Answer]:
    """`concurrency` clients, each on its own keep-alive connection, querying for `seconds`;
    `during()`, when given, runs on this thread meanwhile (e.g. moving the registry's alias)."""
    found: list[Answer] = []
    lock = threading.Lock()
    start = time.monotonic()
    deadline = start + seconds

    def client(number: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        done = 0
        while time.monotonic() < deadline:
            query = urllib.parse.quote(QUERIES[(number + done) % len(QUERIES)] + str(done % 97))
            started = time.perf_counter()
            connection.request("GET", f"/api/search?q={query}&k={K}")
            response = connection.getresponse()
            body = response.read()
            elapsed = time.perf_counter() - started
            version = json.loads(body).get("model", {}).get("version") if response.status == 200 else None
            with lock:
                found.append(Answer(time.monotonic() - start, elapsed, response.status, version))
            done += 1
        connection.close()

    threads = [threading.Thread(target=client, args=(number,)) for number in range(concurrency)]
    for thread in threads:
        thread.start()
    if during:
        during()
    for thread in threads:
        thread.join()
    return found


def summary(found: list[Answer], wall_s: float) -> dict:
    served = [answer.seconds for answer in found if answer.status == 200]
    return {
        "requests": len(served),
        "errors": len(found) - len(served),
        "qps": round(len(served) / wall_s, 1),
        **(percentiles(served) if served else {}),
    }


def load(port: int, concurrency: int, seconds: float) -> dict:
    """Queries/s, p50 and p99 of `concurrency` clients querying for `seconds`, and the mean number
    of texts per model call the server reports meanwhile."""
    calls_before, texts_before = _batching(port)
    started = time.perf_counter()
    found = answers(port, concurrency, seconds)
    wall_s = time.perf_counter() - started
    calls, texts = _batching(port)
    mean_batch = round((texts - texts_before) / max(calls - calls_before, 1), 2)
    return {"concurrency": concurrency, **summary(found, wall_s), "texts_per_model_call": mean_batch}


def _batching(port: int) -> tuple[float, float]:
    """The server's model calls and texts embedded so far (its embed batch size histogram)."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        samples = {
            sample.name: sample.value
            for family in text_string_to_metric_families(response.read().decode())
            for sample in family.samples
            if sample.name.startswith("zhclip_search_embed_batch_size_")
        }
    return samples.get("zhclip_search_embed_batch_size_count", 0.0), samples.get(
        "zhclip_search_embed_batch_size_sum", 0.0
    )


def serving(
    root: Path, index: Path, model_dir: Path, port: int, text_batch: int, backend: str, batch_wait_ms: float = 10.0
):
    """`zhclip serve` over `index` with `backend`, started and ready (or SystemExit with its log)."""
    params = root / f"params-{backend}.yaml"
    serve = {"text_batch": text_batch, "backend": backend, "batch_wait_ms": batch_wait_ms}
    params.write_text(json.dumps({"serve": serve}))  # JSON is YAML
    command = ["serve", "--index", str(index), "--model", str(model_dir), "--port", str(port), "--params", str(params)]
    return _started(command, root / f"serve-{backend}.log", port)


def _started(command: list[str], log_path: Path, port: int):
    """`zhclip <command>` in the background, once its /readyz answers 200 (or SystemExit with its log)."""
    from urllib.request import urlopen

    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [str(Path(sys.executable).parent / "zhclip"), *command], stdout=log, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + 900  # the onnx backend exports the encoders on its first start
    while True:
        try:
            if urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2).status == 200:
                return server
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise SystemExit(f"zhclip serve did not become ready:\n{log_path.read_text()[-3000:]}")
        time.sleep(1)


def bench_http(args) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        model_dir = random_model(root, args.preset, args.dim)
        search = args.search[0] if args.search else fitting_search_params(args.factory)
        index, build_s = synthetic_index(root, model_dir, args.vectors, args.dim, args.factory, search)
        configurations = list(itertools.product(args.backend or ["torch", "onnx"], args.batch_wait_ms or [10.0]))
        for round_number, (backend, wait_ms) in itertools.product(range(args.rounds), configurations):
            server = serving(root, index, model_dir, int(args.port), args.text_batch, backend, wait_ms)
            try:
                load(int(args.port), 1, 3)  # warm-up
                server_mb = resident_mb(pid=server.pid)
                for concurrency in args.concurrency or [1, 8]:
                    emit(
                        {
                            "bench": "http",
                            "backend": backend,
                            "preset": args.preset,
                            "text_batch": args.text_batch,
                            "batch_wait_ms": wait_ms,
                            "round": round_number,
                            "vectors": args.vectors,
                            "factory": args.factory,
                            "search": search,
                            "index_build_s": round(build_s, 1),
                            "server_rss_mb": server_mb,
                            "seconds": args.seconds,
                            "machine": args.machine,
                            **load(int(args.port), concurrency, args.seconds),
                        },
                        args.out,
                    )
            finally:
                server.terminate()
                server.wait(timeout=30)


SWAP_MODEL = "bench-swap"


def _registered_pair(root: Path, args) -> tuple[str, dict[str, str], Path]:
    """Two random models registered as versions 1 (champion) and 2 of SWAP_MODEL, each with a
    synthetic index published in a catalog; returns the tracking URI, version -> weights, the catalog."""
    from zhclip.components.core.lineage import dvc_hash
    from zhclip.components.registry.register import RegisterConfig, register
    from zhclip.components.search.index_store import publish_index

    tracking, catalog = f"sqlite:///{root / 'mlflow.db'}", root / "catalog"
    weights = {}
    for number, figure in ((1, 0.5), (2, 0.1)):  # version 2 is not promoted: the bench moves the alias itself
        model_dir = random_model(root, args.preset, args.dim, f"model{number}")
        search = fitting_search_params(args.factory)
        index, _ = synthetic_index(root, model_dir, args.vectors, args.dim, args.factory, search, f"index{number}")
        figures = root / f"evaluation{number}.json"
        figures.write_text(json.dumps({"mean_recall": figure}))
        register(model_dir, figures, RegisterConfig(model_name=SWAP_MODEL, tracking_uri=tracking))
        weights[str(number)] = dvc_hash(model_dir)
        publish_index(index, str(catalog), weights[str(number)])
    return tracking, weights, catalog


def bench_swap(args) -> None:
    """The champion moved from version 1 to 2 while `--concurrency` clients query `zhclip serve --follow`."""
    import mlflow

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        tracking, _, catalog = _registered_pair(root, args)
        clients, port = (args.concurrency or [8])[0], int(args.port)
        command = ["serve", "--follow", f"models:/{SWAP_MODEL}@champion", "--index", f"swap={catalog}"]
        command += ["--tracking-uri", tracking, "--follow-seconds", "1", "--port", str(port)]
        server = _started(command, root / "serve-swap.log", port)
        moved: list[float] = []
        try:
            load(port, 1, 3)  # warm-up
            start = time.monotonic()

            def move_alias() -> None:
                time.sleep(args.seconds / 3)
                moved.append(time.monotonic() - start)
                mlflow.MlflowClient(tracking).set_registered_model_alias(SWAP_MODEL, "champion", "2")

            found = answers(port, clients, args.seconds, during=move_alias)
            server_mb = resident_mb(pid=server.pid)
        finally:
            server.terminate()
            server.wait(timeout=30)
        first_new = min(answer.at_s for answer in found if answer.version == "2")
        last_old = max(answer.at_s for answer in found if answer.version == "1")
        phases = {
            "before": [a for a in found if a.at_s < moved[0]],
            "loading": [a for a in found if moved[0] <= a.at_s < first_new],
            "after": [a for a in found if a.at_s >= first_new],
        }
        for phase, chosen in phases.items():
            span = {"before": moved[0], "loading": first_new - moved[0], "after": args.seconds - first_new}[phase]
            emit({"bench": "swap", "phase": phase, "seconds": round(span, 1), **summary(chosen, span)}, args.out)
        emit(
            {
                "bench": "swap-summary",
                "preset": args.preset,
                "vectors": args.vectors,
                "concurrency": clients,
                "requests": len(found),
                "failed": sum(answer.status != 200 for answer in found),
                "unnamed": sum(answer.status == 200 and not answer.version for answer in found),
                "alias_moved_at_s": round(moved[0], 2),
                "first_new_answer_s": round(first_new - moved[0], 2),
                "old_answers_after_first_new": sum(a.version == "1" and a.at_s > first_new for a in found),
                "last_old_answer_s": round(last_old - moved[0], 2),
                "server_rss_mb": server_mb,
                "machine": args.machine,
            },
            args.out,
        )


def bench_soak(args) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        model_dir = random_model(root, args.preset, args.dim)
        search = args.search[0] if args.search else fitting_search_params(args.factory)
        index, _ = synthetic_index(root, model_dir, args.vectors, args.dim, args.factory, search)
        backend, clients = (args.backend or ["torch"])[0], (args.concurrency or [8])[0]
        server = serving(root, index, model_dir, int(args.port), args.text_batch, backend)
        try:
            load(int(args.port), 1, 3)  # warm-up
            windows = []
            for window in range(max(1, round(args.seconds / args.window))):
                measured = load(int(args.port), clients, args.window)
                windows.append({"window": window, "elapsed_s": (window + 1) * args.window, **measured})
                windows[-1]["server_rss_mb"] = resident_mb(pid=server.pid)
                emit({"bench": "soak", **windows[-1]}, args.out)
        finally:
            server.terminate()
            server.wait(timeout=30)
        after_minute = next((w for w in windows if w["elapsed_s"] >= 60), windows[0])["server_rss_mb"]
        emit(
            {
                "bench": "soak-summary",
                "backend": backend,
                "preset": args.preset,
                "vectors": args.vectors,
                "concurrency": clients,
                "seconds": len(windows) * args.window,
                "requests": sum(w["requests"] for w in windows),
                "failed": sum(w["errors"] for w in windows),
                "rss_after_first_minute_mb": after_minute,
                "rss_end_mb": windows[-1]["server_rss_mb"],
                "rss_max_mb": max(w["server_rss_mb"] for w in windows),
                "growth_after_first_minute_pct": round(100 * (windows[-1]["server_rss_mb"] / after_minute - 1), 2),
                "machine": args.machine,
            },
            args.out,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["ann", "http", "swap", "soak"])
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--data", choices=["uniform", "lowdim"], default="uniform")
    parser.add_argument("--factory", default=IndexConfig.factory, help="FAISS index_factory string")
    parser.add_argument(
        "--search",
        action="append",
        help="a FAISS search setting, e.g. efSearch=128 (repeatable; default: what zhclip index uses for the factory)",
    )
    parser.add_argument("--queries", type=int, default=1000, help="queries scored against exact search")
    parser.add_argument("--single-queries", type=int, default=200, help="of them, timed one at a time")
    parser.add_argument("--concurrency", type=int, action="append", help="http: concurrent clients (repeatable)")
    parser.add_argument(
        "--seconds", type=float, default=30, help="http: load duration per concurrency; soak: the whole soak"
    )
    parser.add_argument("--window", type=float, default=10, help="soak: seconds per measured window")
    parser.add_argument(
        "--preset", default="tiny", help="http: the model's shape (tiny, or ViT-B-16: a RoBERTa-base text tower)"
    )
    parser.add_argument("--text-batch", type=int, default=32, help="http: serve.text_batch (1: no batching of queries)")
    parser.add_argument(
        "--backend",
        action="append",
        choices=["torch", "onnx", "onnx-int8"],
        help="http: serve.backend (repeatable; default torch and onnx)",
    )
    parser.add_argument(
        "--batch-wait-ms",
        type=float,
        action="append",
        help="http: serve.batch_wait_ms (repeatable; 0 is the batching before it existed; default 10)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="http: run every backend and wait in turn this many times (A B A B ...), so slow spells of a "
        "shared machine fall on all of them",
    )
    parser.add_argument("--port", default="8765")
    parser.add_argument("--machine", default=f"{os.cpu_count()} CPU cores, no GPU")
    parser.add_argument("--out", type=Path, help="append the JSON lines to this file")
    args = parser.parse_args()
    {"ann": bench_ann, "http": bench_http, "swap": bench_swap, "soak": bench_soak}[args.part](args)


if __name__ == "__main__":
    main()
