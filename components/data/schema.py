"""The prepared pair: what ingest writes, validation checks and training reads, and the base64 every
Chinese-CLIP image file uses."""

from __future__ import annotations

import base64

import pyarrow as pa

SPLITS = ("train", "valid", "test")
PAIR_SCHEMA = pa.schema(
    [("text_id", pa.int64()), ("text", pa.string()), ("image_id", pa.int64()), ("image", pa.binary())]
)


def decode_base64(text: str) -> bytes:
    """Accept both the urlsafe base64 Chinese-CLIP writes and standard base64."""
    return base64.b64decode(text.strip().translate(str.maketrans("-_", "+/")), validate=True)
