"""The towers on ONNX Runtime: the same embeddings as `embed_texts` / `embed_images`, faster on CPU.

The encoders are exported from the loaded weights once (`export.export_onnx`: dynamic batch and
sequence axes) and cached under the weights' SHA-256, so every later load of the same weights, in
any process, starts from the cached graphs. ONNX Runtime then fuses and plans the whole graph once
per session, which eager PyTorch cannot: that is where a query's time goes on CPU.

onnxruntime is imported only when this backend is chosen: the torch backend needs nothing more.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import ChineseCLIPProcessor

from .export import export_onnx
from .presets import ClipModel

CACHE_ENV = "ZHCLIP_ONNX_CACHE"  # where exported graphs are kept; default ~/.cache/zhclip/onnx
WEIGHTS_FILE = "model.safetensors"


def weights_sha256(model_dir: str | Path) -> str:
    """The SHA-256 of a model folder's weights file, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(Path(model_dir) / WEIGHTS_FILE, "rb") as weights:
        while block := weights.read(16 * 2**20):
            digest.update(block)
    return digest.hexdigest()


def cached_encoders(
    model: ClipModel, model_dir: str | Path, context_length: int, int8: bool = False
) -> dict[str, Path]:
    """The image and text encoder graphs of these weights (`int8`: their weights quantised to int8),
    exported now unless already cached.

    An export goes to a scratch folder beside its final place and is renamed into it, so a process
    that finds the folder finds it whole (two processes exporting at once both succeed)."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "zhclip" / "onnx")
    folder = root / f"{weights_sha256(model_dir)[:32]}-ctx{context_length}"
    paths = {"image": folder / "image_encoder.onnx", "text": folder / "text_encoder.onnx"}
    if not all(path.is_file() for path in paths.values()):
        _export_into(folder, model, context_length)
    return {name: _quantised(path) for name, path in paths.items()} if int8 else paths


def _export_into(folder: Path, model: ClipModel, context_length: int) -> None:
    scratch = folder.with_name(f".{folder.name}.{os.getpid()}")
    # the exporter's progress notes, warnings (about axis names) and log lines (about torchvision's
    # operators, which these encoders do not use) are not the caller's business
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_onnx(model, scratch, context_length)
    finally:
        exporter_log.setLevel(level)
    try:
        scratch.rename(folder)
    except OSError:  # another process put it there first
        for path in scratch.iterdir():
            path.unlink()
        scratch.rmdir()


def _quantised(path: Path) -> Path:
    """`path`'s graph with its MatMul weights quantised to int8 (activations quantised on the fly:
    ONNX Runtime's dynamic quantisation), made once beside it."""
    target = path.with_name(path.stem + "_int8.onnx")
    if target.is_file():
        return target
    from onnxruntime.quantization import QuantType, quantize_dynamic

    scratch = target.with_name(f".{target.name}.{os.getpid()}")
    logging.disable(logging.WARNING)  # its advice to pre-process the graph first, once per call
    try:
        quantize_dynamic(path, scratch, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
    finally:
        logging.disable(logging.NOTSET)
    scratch.replace(target)
    return target


class OnnxTowers:
    """Unit-norm text and image embeddings through ONNX Runtime sessions of the exported encoders."""

    def __init__(self, model: ClipModel, processor: ChineseCLIPProcessor, model_dir: str | Path, int8: bool = False):
        import onnxruntime

        self.processor = processor
        self.context_length = processor.tokenizer.model_max_length
        self.paths = cached_encoders(model, model_dir, self.context_length, int8)
        self.options = onnxruntime.SessionOptions()
        self.options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.options.log_severity_level = 3  # errors only: notes about unused initializers are not the user's business
        # Idle pool threads sleep instead of spinning: a server's request threads share these cores
        self.options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sessions: dict = {}

    def session(self, tower: str):
        """The tower's session, made on first use: a server asked only texts never loads the image graph."""
        if tower not in self.sessions:
            import onnxruntime

            self.sessions[tower] = onnxruntime.InferenceSession(
                str(self.paths[tower]), self.options, providers=["CPUExecutionProvider"]
            )
        return self.sessions[tower]

    def texts(self, texts: Sequence[str], batch_size: int) -> np.ndarray:
        chunks = []
        for start in range(0, len(texts), batch_size):
            tokens = self.processor.tokenizer(
                list(texts[start : start + batch_size]),
                padding="longest",  # the sequence axis is dynamic: a short query pays for its own tokens
                truncation=True,
                max_length=self.context_length,
                return_tensors="np",
            )
            feeds = {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
            chunks.append(self.session("text").run(None, feeds)[0])
        return _normalised(chunks)

    def images(self, images: Sequence[Image.Image], batch_size: int) -> np.ndarray:
        chunks = []
        for start in range(0, len(images), batch_size):
            pixels = self.processor.image_processor(
                images=list(images[start : start + batch_size]), return_tensors="np"
            )
            chunks.append(self.session("image").run(None, {"pixel_values": pixels["pixel_values"]})[0])
        return _normalised(chunks)


def _normalised(chunks: list[np.ndarray]) -> np.ndarray:
    vectors = np.concatenate(chunks).astype(np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
