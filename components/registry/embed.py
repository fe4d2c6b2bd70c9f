"""Embed: texts and images through a model folder or a registry pull (models:/<name>@<alias>)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from zhclip.components.core.errors import ZhclipError
from zhclip.components.core.tracking import resolve_tracking_uri, using_tracking_uri


def load_embedder(model: str, tracking_uri: str | None = None, backend: str = "torch"):
    """A pyfunc-style embedder from a local model folder or any MLflow model URI, embedding with
    `backend` ("torch" or "onnx", see zhclip.model.pyfunc)."""
    # Versions registered before the onnx backend existed ship code that knows no `backend` key.
    config = {"backend": backend} if backend != "torch" else None
    if Path(model).is_dir():
        from zhclip.model.pyfunc import load_embedder as load_folder

        try:
            return load_folder(model, config)
        except ValueError as err:
            raise ZhclipError(str(err)) from err
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        with using_tracking_uri(resolve_tracking_uri(tracking_uri or "")):
            return mlflow.pyfunc.load_model(model, model_config=config)
    except (MlflowException, OSError) as err:
        raise ZhclipError(f"cannot load model {model!r}: {err}") from err


def _checked_text(text: str) -> str:
    if not text.strip():
        raise ZhclipError("--text must not be empty")
    return text


def _checked_image(path: Path) -> bytes:
    from zhclip.model import decode_image

    if not Path(path).is_file():
        raise ZhclipError(f"image file {path} not found")
    blob = Path(path).read_bytes()
    try:
        decode_image(blob)
    except ValueError as err:
        raise ZhclipError(f"{path}: {err}") from err
    return blob


def embed(model: str, texts: list[str], images: list[Path], tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """One record per input with its embedding, then one per (text, image) pair with their cosine."""
    if not texts and not images:
        raise ZhclipError("nothing to embed: pass --text and/or --image")
    frame = pd.DataFrame(
        {
            "text": [_checked_text(t) for t in texts] + [None] * len(images),
            "image": [None] * len(texts) + [_checked_image(p) for p in images],
        }
    )
    from mlflow.exceptions import MlflowException

    try:  # a model folder raises ValueError on bad input, a registry model MlflowException
        vectors = np.asarray(load_embedder(model, tracking_uri).predict(frame))
    except (ValueError, MlflowException) as err:
        raise ZhclipError(str(err)) from err
    labels = [("text", t) for t in texts] + [("image", str(p)) for p in images]
    records = [
        {kind: label, "embedding": np.round(vector, 6).tolist()} for (kind, label), vector in zip(labels, vectors)
    ]
    text_vectors, image_vectors = vectors[: len(texts)], vectors[len(texts) :]
    for i, text in enumerate(texts):
        for j, path in enumerate(images):
            records.append(
                {"text": text, "image": str(path), "cosine": round(float(text_vectors[i] @ image_vectors[j]), 4)}
            )
    return records


def model_identity(model: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """What an index records of the model that built it: the URI as given, the registered name and
    version behind a models:/ URI, and the weights hash (the folder's DVC hash, which `zhclip
    register` tags every version with as `model_dvc_hash`). Two URIs of the same weights match."""
    from zhclip.components.core.lineage import dvc_hash

    if Path(model).is_dir():
        return {"uri": str(Path(model).resolve()), "name": None, "version": None, "weights_hash": dvc_hash(model)}
    if not model.startswith("models:/"):
        raise ZhclipError(
            f"model {model!r}: give a model folder or a registry URI "
            "(models:/<name>@<alias> or models:/<name>/<version>)"
        )
    import mlflow
    from mlflow.exceptions import MlflowException

    name, _, which = model.removeprefix("models:/").partition("@")
    try:
        with using_tracking_uri(resolve_tracking_uri(tracking_uri or "")):
            client = mlflow.MlflowClient()
            if which:
                version = client.get_model_version_by_alias(name, which)
            else:
                name, _, number = name.partition("/")
                version = client.get_model_version(name, number)
    except MlflowException as err:
        hint = (
            f"; no version of {name} has alias {which!r} yet (the gate promoted none, see `zhclip results`)"
            if which and "alias" in err.message.lower()
            else ""
        )
        raise ZhclipError(f"cannot resolve {model!r} in the registry: {err.message}{hint}") from err
    weights = version.tags.get("model_dvc_hash")
    if not weights:
        raise ZhclipError(
            f"{model!r} (version {version.version}) has no model_dvc_hash tag; register it with `zhclip register`"
        )
    return {"uri": model, "name": name, "version": str(version.version), "weights_hash": weights}
