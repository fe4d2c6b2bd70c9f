"""Decoding raw images into the bytes ingest stores: each checked against the configured bounds and
re-encoded (PNG or JPEG), in Ray tasks on any CPU of the cluster, results in input order.

A decode returns (image_id, re-encoded image, None) or (image_id, None, the reason): it runs in Ray
tasks, so it returns rather than raises, and a reason is quarantined by ingest.
"""

from __future__ import annotations

import io
import itertools
from collections import deque
from collections.abc import Iterator
from typing import Protocol

from PIL import Image

from zhclip.components.core.cluster import ordered_map, ordered_streams
from zhclip.components.core.storage import Folder
from zhclip.components.data.captions import int64
from zhclip.components.data.img2dataset import Row, read_shard
from zhclip.components.data.schema import decode_base64


class ImageBounds(Protocol):
    """What decoding reads of ingest's settings (IngestConfig has them): named here, so that decoding
    does not import ingest, which imports it."""

    max_image_pixels: int
    max_image_side: int
    image_format: str
    batch_lines: int
    workers: int


def reencode(blob: bytes, config: ImageBounds) -> bytes:
    image = Image.open(io.BytesIO(blob))  # reads the header only
    pixels = image.width * image.height
    if pixels > config.max_image_pixels:
        raise Rejected(
            f"image is {image.width}x{image.height} = {pixels / 1e6:.1f} megapixels, "
            f"above max_image_pixels {config.max_image_pixels / 1e6:.1f} (raise it in params.yaml ingest)"
        )
    image = image.convert("RGB")
    if config.max_image_side and max(image.size) > config.max_image_side:
        image.thumbnail((config.max_image_side, config.max_image_side))
    buffer = io.BytesIO()
    image.save(
        buffer, format=config.image_format.upper(), **({"quality": 95} if config.image_format.upper() == "JPEG" else {})
    )
    return buffer.getvalue()


class Rejected(Exception):
    """An image that decodes but breaks a configured bound."""


def decode_line(line: str, config: ImageBounds, raw: Folder) -> tuple[int | None, bytes | None, str | None]:
    """One `image_id<TAB>base64` line -> (image_id, re-encoded image, None), or a reason in place of
    the image. Runs in Ray tasks, so it returns rather than raises."""
    try:
        id_field, b64 = line.rstrip("\n").split("\t")
        image_id = int(id_field)
    except ValueError as err:
        return None, None, f"expected 'image_id<TAB>base64 image' ({err})"
    if not int64(image_id):
        return None, None, f"image_id {id_field} does not fit in 64 bits"
    try:
        blob = decode_base64(b64)
    except ValueError as err:
        return image_id, None, f"image does not decode ({err})"
    return reencoded(image_id, blob, config)


def reencoded(image_id: int, blob: bytes, config: ImageBounds) -> tuple[int, bytes | None, str | None]:
    try:
        return image_id, reencode(blob, config), None
    except Rejected as err:
        return image_id, None, f"image rejected: {err}"
    except Image.UnidentifiedImageError:  # its message names the buffer's address: not the same twice
        return image_id, None, "image does not decode (no image format Pillow reads)"
    except (ValueError, OSError, Image.DecompressionBombError) as err:
        return image_id, None, f"image does not decode ({err})"


def decode_file_line(line: str, config: ImageBounds, raw: Folder) -> tuple[int | None, bytes | None, str | None]:
    """`image_id<TAB>path` (built from a captions CSV, the path relative to the raw folder) -> the same result
    as `decode_line`."""
    id_field, path = line.split("\t", 1)
    try:
        blob = raw.read_bytes(path)
    except OSError as err:
        return int(id_field), None, f"image file cannot be read ({err}: {raw.name(path)})"
    return reencoded(int(id_field), blob, config)


def decode_batch(lines: list[str], config: ImageBounds, raw: Folder, decode) -> list[tuple]:
    return [decode(line, config, raw) for line in lines]


def decoded_lines(
    lines: Iterator[tuple[int, str]], config: ImageBounds, raw: Folder, decode
) -> Iterator[tuple[int, str, tuple]]:
    """(line number, line, decode result) in input order, `batch_lines` lines per Ray task (in this process
    for `workers: 1`)."""
    batches = iter(lambda: list(itertools.islice(lines, config.batch_lines)), [])
    if config.workers == 1:
        for batch in batches:
            decoded = decode_batch([line for _, line in batch], config, raw, decode)
            yield from ((number, line, result) for (number, line), result in zip(batch, decoded))
        return
    in_flight: deque[list[tuple[int, str]]] = deque()  # the batches whose results ordered_map has yet to yield

    def calls() -> Iterator[tuple]:
        for batch in batches:
            in_flight.append(batch)
            yield [line for _, line in batch], config, raw, decode

    for decoded in ordered_map(decode_batch, calls()):
        yield from ((number, line, result) for (number, line), result in zip(in_flight.popleft(), decoded))


def decode_shard(raw: Folder, shard: str, kind: str, config: ImageBounds) -> Iterator[list[tuple]]:
    """Every row of one img2dataset shard, `batch_lines` rows at a time: (key, caption, re-encoded image
    or None, reason or None, whether img2dataset fetched it). A Ray task per shard, streaming."""
    rows = read_shard(raw, shard, kind)
    for batch in iter(lambda: list(itertools.islice(rows, config.batch_lines)), []):
        yield [_decoded_row(row, config) for row in batch]


def _decoded_row(row: Row, config: ImageBounds) -> tuple:
    if row.problem:
        return row.key, row.caption, None, row.problem, row.fetched
    assert row.image is not None  # a row without a problem has its image
    _, blob, problem = reencoded(0, row.image, config)
    return row.key, row.caption, blob, problem, True


def decoded_shards(raw: Folder, shards: list[str], kind: str, config: ImageBounds) -> Iterator[tuple[str, Iterator]]:
    """(shard, its rows as `decode_shard` gives them) in shard order, a Ray task per shard (in this
    process for `workers: 1`): memory holds three batches of `batch_lines` re-encoded images per task,
    two tasks per CPU, however large a shard is."""
    calls = ((raw, shard, kind, config) for shard in shards)
    if config.workers == 1:
        batches = (decode_shard(*call) for call in calls)
    else:
        batches = ordered_streams(decode_shard, calls)
    for shard, shard_batches in zip(shards, batches):
        yield shard, itertools.chain.from_iterable(shard_batches)
