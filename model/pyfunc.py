"""MLflow pyfunc flavour of a zhclip model, as a loader module.

MLflow calls `_load_pyfunc(data_path)` with the logged Hugging Face directory. Using a loader module
instead of subclassing `mlflow.pyfunc.PythonModel` keeps this package free of an mlflow import, so
it stays a plain model library.

Input: a DataFrame with a `text` column (strings) and/or an `image` column (encoded image bytes, or
base64 strings as sent over REST). Each row must fill exactly one of the two. Output: an array of
L2-normalised embeddings, one row per input row, in input order.
"""

from __future__ import annotations

import base64
import binascii

import numpy as np

from model.embedding import decode_image, embed_images, embed_texts
from model.presets import load_model


def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _image_bytes(value: object) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error as err:
            raise ValueError(f"a string but not valid base64 ({err})") from err
    raise ValueError(f"must be bytes or base64 text, got {type(value).__name__}")


def _decode(value: object, row: int):
    try:
        return decode_image(_image_bytes(value))
    except ValueError as err:
        raise ValueError(f"row {row}: column 'image': {err}") from err


class ZhclipEmbedder:
    """Embeds the texts and images of a DataFrame with one Chinese CLIP model."""

    def __init__(self, model_dir: str, batch_size: int = 256):
        self.model, self.processor = load_model(model_dir)
        self.batch_size = batch_size

    def predict(self, model_input, params: dict | None = None) -> np.ndarray:
        columns = [c for c in ("text", "image") if c in model_input.columns]
        if not columns:
            raise ValueError(f"input needs a 'text' and/or an 'image' column; got {list(model_input.columns)}")
        texts, images = {}, {}
        for row, record in enumerate(model_input[columns].to_dict("records")):
            text, image = record.get("text"), record.get("image")
            filled = [name for name, value in (("text", text), ("image", image)) if not _is_missing(value)]
            if len(filled) != 1:
                raise ValueError(f"row {row}: fill exactly one of 'text' or 'image' (filled: {filled or 'none'})")
            if filled == ["text"]:
                if not isinstance(text, str) or not text.strip():
                    raise ValueError(f"row {row}: column 'text' must be a non-empty string")
                texts[row] = text
            else:
                images[row] = _decode(image, row)
        out = np.zeros((len(model_input), self.model.config.projection_dim), dtype=np.float32)
        if texts:
            out[list(texts)] = embed_texts(self.model, self.processor, list(texts.values()), self.batch_size)
        if images:
            out[list(images)] = embed_images(self.model, self.processor, list(images.values()), self.batch_size)
        return out


def _load_pyfunc(data_path: str) -> ZhclipEmbedder:
    return ZhclipEmbedder(data_path)
