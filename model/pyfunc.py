"""The inference side of a zhclip model as MLflow serves it, kept free of mlflow imports.

`components/registry/served_model.py` wraps `ZhclipEmbedder` in an `mlflow.pyfunc.PythonModel` ("models from
code"); this package travels with the model as its code, so a pull needs no zhclip repository.

Input: a DataFrame with a `text` column (strings) and/or an `image` column (encoded image bytes, or
base64 strings as sent over REST). Params (`predict(..., params=...)`, or `"params"` in a REST
request) choose the output:

- `output="embedding"` (default): each row fills exactly one of `text` / `image`; an array of
  L2-normalised embeddings, one row per input row, in input order;
- `output="similarity"`: each row fills both; the cosine similarity of its text and image;
- `output="zeroshot"`: each row fills `image`; with `labels` (class names) and `template` (the
  prompt, `{}` standing for the label), one `{"label", "probability"}` per row.

Rows are embedded `batch_size` at a time, so only one chunk of decoded images is ever in memory.
Bad input raises ValueError naming the row (its 0-based position) and the column.
"""

from __future__ import annotations

import base64
import binascii

import numpy as np
import torch

from .embedding import decode_image, embed_images, embed_texts, projection_dim
from .loss import MAX_LOGIT_SCALE
from .presets import ClipModel, load_model

# Recorded as the logged model's `model_config`; `mlflow.pyfunc.load_model(uri, model_config=...)` overrides.
# `device`: "auto" is the first GPU when there is one (indexing a gallery, serving), else the CPU.
# `backend`: "torch" (eager PyTorch, on `device`), "onnx" (ONNX Runtime on the CPU: see onnx_towers) or
# "onnx-int8" (the same with int8 weights: faster, embeddings within a cosine of about 0.999).
DEFAULT_CONFIG = {"batch_size": 64, "max_image_pixels": 25_000_000, "device": "auto", "backend": "torch"}
BACKENDS = ("torch", "onnx", "onnx-int8")
DEFAULT_TEMPLATE = "一张{}的照片。"  # Chinese-CLIP's first zero-shot prompt
# Per output: the columns the input must have, the combinations of filled columns a row may have,
# and that rule in words.
ROW_RULES = {
    "embedding": (set(), {("text",), ("image",)}, "fill exactly one of 'text' or 'image'"),
    "similarity": ({"text", "image"}, {("text", "image")}, "fill both 'text' and 'image'"),
    "zeroshot": ({"image"}, {("image",)}, "fill 'image' only"),
}
COLUMNS = ("text", "image")


def _options(params: dict | None) -> tuple[str, list[str], str]:
    params = params or {}
    unknown = set(params) - {"output", "labels", "template"}
    if unknown:
        raise ValueError(f"unknown params {sorted(unknown)}; known: output, labels, template")
    output = params.get("output") or "embedding"
    if output not in ROW_RULES:
        raise ValueError(f"params: output must be one of {sorted(ROW_RULES)}, got {output!r}")
    labels = [] if params.get("labels") is None else list(params["labels"])
    template = params.get("template") or DEFAULT_TEMPLATE
    if output == "zeroshot":
        if len(labels) < 2 or not all(isinstance(label, str) and label.strip() for label in labels):
            raise ValueError(f"params: output 'zeroshot' needs labels, two or more non-empty class names; got {labels}")
        if "{}" not in template:
            raise ValueError(f"params: template must contain {{}} where the label goes, got {template!r}")
    return output, labels, template


def _column(frame, name: str) -> list:
    """The column's values with every kind of missing value (None, NaN, pd.NA) as None."""
    if name not in frame.columns:
        return [None] * len(frame)
    values = frame[name]
    return [None if missing else value for value, missing in zip(values.tolist(), values.isna().tolist())]


def _checked_rows(frame, output: str) -> tuple[list, list]:
    """(texts, images) with None where a row leaves the column empty; raises on the first bad row."""
    needed, allowed, rule = ROW_RULES[output]
    present = [name for name in COLUMNS if name in frame.columns]
    if not present or needed - set(present):
        wanted = sorted(needed) if needed else "a 'text' and/or an 'image' column"
        raise ValueError(f"output {output!r} needs {wanted}; the input has columns {list(frame.columns)}")
    texts, images = _column(frame, "text"), _column(frame, "image")
    for row, (text, image) in enumerate(zip(texts, images)):
        filled = tuple(name for name, value in zip(COLUMNS, (text, image)) if value is not None)
        if filled not in allowed:
            raise ValueError(f"row {row}: {rule} (filled: {', '.join(filled) or 'none'})")
        if text is not None and (not isinstance(text, str) or not text.strip()):
            raise ValueError(f"row {row}: column 'text' must be a non-empty string, got {text!r:.60}")
        if image is not None and not isinstance(image, (bytes, bytearray, str)):
            raise ValueError(
                f"row {row}: column 'image' must be image bytes or base64 text, got {type(image).__name__}"
            )
    return texts, images


def _image_bytes(value: bytes | bytearray | str) -> bytes:
    if isinstance(value, str):
        try:  # whitespace is dropped: MIME-style base64 breaks lines every 76 characters
            return base64.b64decode("".join(value.split()), validate=True)
        except binascii.Error as err:
            raise ValueError(f"a string but not valid base64 ({err})") from err
    return bytes(value)


class ZhclipEmbedder:
    """Embeds, compares or classifies the texts and images of a DataFrame with one Chinese CLIP model."""

    def __init__(
        self,
        model_dir: str,
        batch_size: int = DEFAULT_CONFIG["batch_size"],
        max_image_pixels: int = DEFAULT_CONFIG["max_image_pixels"],
        device: str = DEFAULT_CONFIG["device"],
        backend: str = DEFAULT_CONFIG["backend"],
    ):
        if backend not in BACKENDS:
            raise ValueError(f"model_config backend must be one of {list(BACKENDS)}, got {backend!r}")
        model, self.processor = load_model(model_dir)
        self.model: ClipModel | None = model  # None once the ONNX towers replace it
        self.dim = projection_dim(model)
        self.logit_scale = float(model.logit_scale.detach().clamp(max=MAX_LOGIT_SCALE).exp())
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        # transformers wraps PreTrainedModel.to with functools.wraps(nn.Module.to), which types it as
        # the unbound nn.Module.to: the checker takes `device` for `self`
        model.to(device)  # pyright: ignore[reportArgumentType]
        self.onnx = None
        if backend.startswith("onnx"):
            from .onnx_towers import OnnxTowers

            self.onnx = OnnxTowers(model.cpu(), self.processor, model_dir, int8=backend == "onnx-int8")
            self.model = None  # the graphs are exported: the torch weights would only hold memory
        self.batch_size = batch_size
        self.max_image_pixels = max_image_pixels

    def predict(self, model_input, params: dict | None = None) -> np.ndarray | list[dict]:
        output, labels, template = _options(params)
        texts, images = _checked_rows(model_input, output)
        prompts = self._text_vectors([template.format(label) for label in labels]) if output == "zeroshot" else None
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            text_vectors = self._text_vectors(texts[start : start + self.batch_size])
            image_vectors = self._image_vectors(images[start : start + self.batch_size], start)
            if output == "embedding":  # exactly one of the two is filled per row, the other is zero
                chunks.append(text_vectors + image_vectors)
            elif output == "similarity":
                chunks.append((text_vectors * image_vectors).sum(axis=1))
            else:
                assert prompts is not None  # output is "zeroshot"
                probabilities = torch.softmax(
                    torch.from_numpy(self.logit_scale * image_vectors @ prompts.T), dim=1
                ).numpy()
                chunks.extend(
                    {"label": labels[best], "probability": float(p[best])}
                    for p, best in zip(probabilities, probabilities.argmax(axis=1))
                )
        if output == "zeroshot":
            return chunks
        empty = np.zeros((0, self.dim) if output == "embedding" else (0,), dtype=np.float32)
        return np.concatenate(chunks) if chunks else empty

    def _text_vectors(self, texts: list) -> np.ndarray:
        vectors = np.zeros((len(texts), self.dim), dtype=np.float32)
        rows = [i for i, text in enumerate(texts) if text is not None]
        if rows:
            chosen = [texts[i] for i in rows]
            vectors[rows] = (
                self.onnx.texts(chosen, self.batch_size)
                if self.onnx
                else embed_texts(self._torch_model(), self.processor, chosen, self.batch_size)
            )
        return vectors

    def _image_vectors(self, images: list, first_row: int) -> np.ndarray:
        vectors = np.zeros((len(images), self.dim), dtype=np.float32)
        rows = [i for i, image in enumerate(images) if image is not None]
        decoded = []
        for i in rows:
            try:
                decoded.append(decode_image(_image_bytes(images[i]), self.max_image_pixels))
            except ValueError as err:
                raise ValueError(f"row {first_row + i}: column 'image': {err}") from err
        if rows:
            vectors[rows] = (
                self.onnx.images(decoded, self.batch_size)
                if self.onnx
                else embed_images(self._torch_model(), self.processor, decoded, self.batch_size)
            )
        return vectors

    def _torch_model(self) -> ClipModel:
        assert self.model is not None  # dropped only when the ONNX towers replace it
        return self.model


def load_embedder(model_dir: str, model_config: dict | None = None) -> ZhclipEmbedder:
    """The embedder of a model folder, with `model_config` (see DEFAULT_CONFIG) over the defaults."""
    config = {**DEFAULT_CONFIG, **(model_config or {})}
    unknown = set(config) - set(DEFAULT_CONFIG)
    if unknown:
        raise ValueError(f"unknown model_config keys {sorted(unknown)}; known: {sorted(DEFAULT_CONFIG)}")
    return ZhclipEmbedder(model_dir, **config)
