"""The real img2dataset (pinned in requirements-img2dataset.lock, installed in `.venv-img2dataset` by
`make img2dataset-env`), downloading from a web server on 127.0.0.1 that this module starts.

`faulty_urls` makes the corpus of a real crawl: good images, 404s, HTML pages named `.jpg`, JPEGs cut
short and empty captions. `download` writes the URL list and runs img2dataset on it with several
threads and small shards, in any of its output formats; what it writes is img2dataset's own output,
in the order its downloads finished (a different order on every run).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from conftest import REPO

IMG2DATASET = REPO / ".venv-img2dataset" / "bin" / "img2dataset"
FAULTS = ("good", "missing", "html", "truncated", "empty caption")


@dataclass(frozen=True)
class Url:
    """One URL of the list: its path on the server, the bytes served (None: 404), its caption and
    what it is."""

    path: str
    body: bytes | None
    caption: str
    fault: str


def _jpeg(seed: int, size: int = 24) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def faulty_urls(count: int) -> list[Url]:
    """`count` URLs cycling through FAULTS: each fault about count/5 times."""
    urls = []
    for number in range(count):
        fault = FAULTS[number % len(FAULTS)]
        body = {
            "good": _jpeg(number),
            "missing": None,
            "html": b"<html><body>not found, but 200</body></html>",
            "truncated": _jpeg(number)[:-40],
            "empty caption": _jpeg(number),
        }[fault]
        caption = "" if fault == "empty caption" else f"第{number}张图片:一只小猫"
        urls.append(Url(f"/{number}.jpg", body, caption, fault))
    return urls


@contextmanager
def web_server(files: dict[str, bytes]) -> Iterator[str]:
    """Serves `files` (path -> bytes) on 127.0.0.1, 404 for any other path; yields the base URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            body = files.get(self.path)
            if body is None:
                self.send_error(404, "File not found")
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # the test's output, not one line per request
            pass

    class Server(ThreadingHTTPServer):
        # http.server listens with a backlog of 5: img2dataset's defaults (16 processes of 256 threads,
        # the own-data guide's command) overflow it, the kernel drops their connections, and on a busy
        # 2-core runner the retries outlast img2dataset's 10 s timeout. Web servers listen with more.
        request_queue_size = 1024

    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def download(
    urls: list[Url],
    out: Path,
    output_format: str,
    shard_size: int = 10,
    threads: int = 4,
    extra: tuple[str, ...] = (),
) -> None:
    """img2dataset fetches `urls` from a server on 127.0.0.1 into `out` (a split's folder) in
    `output_format` (webdataset, parquet or files), `shard_size` URLs a shard, `threads` threads."""
    served = {url.path: url.body for url in urls if url.body is not None}
    out.parent.mkdir(parents=True, exist_ok=True)
    listing = out.parent / f"{out.name}-urls.parquet"
    with web_server(served) as base:
        table = pa.table({"url": [base + url.path for url in urls], "caption": [url.caption for url in urls]})
        pq.write_table(table, listing)
        subprocess.run(
            [
                str(IMG2DATASET),
                f"--url_list={listing}",
                "--input_format=parquet",
                "--url_col=url",
                "--caption_col=caption",
                f"--output_format={output_format}",
                f"--output_folder={out}",
                f"--number_sample_per_shard={shard_size}",
                "--processes_count=1",
                f"--thread_count={threads}",
                "--distributor=multiprocessing",
                "--resize_mode=no",
                "--retries=0",
                "--timeout=10",
                *extra,
            ],
            check=True,
            capture_output=True,
            timeout=300,
            env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"},
        )
    listing.unlink()


def tried(out: Path) -> dict[str, dict]:
    """Every row img2dataset wrote in the Parquet of each shard of `out` (one per URL it tried), by
    URL path: its key, status, error and caption."""
    columns = ["key", "url", "status", "error_message", "caption"]
    rows = [row for shard in sorted(out.glob("*.parquet")) for row in pq.read_table(shard, columns=columns).to_pylist()]
    return {"/" + row["url"].rsplit("/", 1)[-1]: row for row in rows}


def pair_urls(raw: Path, split: str, missing_every: int = 13) -> list[Url]:
    """A URL for each (caption, image) pair of a Chinese-CLIP raw split, serving the image's bytes;
    every `missing_every`-th one is not served (a 404)."""
    from zhclip.components.data.schema import decode_base64

    images = {}
    for line in (raw / f"{split}_imgs.tsv").read_text().splitlines():
        image_id, b64 = line.split("\t")
        images[image_id] = decode_base64(b64)
    urls = []
    for line in (raw / f"{split}_texts.jsonl").read_text(encoding="utf-8").splitlines():
        text = json.loads(line)
        for image_id in text["image_ids"]:
            missing = len(urls) % missing_every == missing_every - 1
            body = None if missing else images[str(image_id)]
            urls.append(Url(f"/{len(urls)}.png", body, text["text"], "missing" if missing else "good"))
    return urls
