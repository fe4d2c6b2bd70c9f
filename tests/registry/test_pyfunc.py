"""The pyfunc model itself, without MLflow: outputs, chunking and errors that name the row."""

import base64
import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from zhclip.model.pyfunc import ZhclipEmbedder, load_embedder


def _png(colour: str, size: tuple[int, int] = (32, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def embedder(tiny_models):
    return ZhclipEmbedder(str(tiny_models[0]), batch_size=2)


MIXED = pd.DataFrame(
    {
        "text": ["红色的圆形", None, "蓝色的十字", None, "绿色的方块"],
        "image": [None, _png("red"), None, base64.b64encode(_png("blue")).decode(), None],
    }
)


def test_embeddings_are_unit_norm_in_input_order_whatever_the_chunk_size(embedder, tiny_models):
    chunked = embedder.predict(MIXED)  # five rows in chunks of two
    whole = ZhclipEmbedder(str(tiny_models[0]), batch_size=64).predict(MIXED)
    assert chunked.shape == (5, 64) and chunked.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(chunked, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(chunked, whole, atol=1e-5)
    for row in range(5):
        np.testing.assert_allclose(embedder.predict(MIXED.iloc[[row]])[0], chunked[row], atol=1e-5)
    assert np.abs(chunked[0] - chunked[2]).max() > 1e-3, "different texts must embed differently"


def test_similarity_and_zero_shot_outputs(embedder):
    pairs = pd.DataFrame({"text": ["红色", "蓝色", "绿色"], "image": [_png("red"), _png("blue"), _png("green")]})
    cosines = embedder.predict(pairs, {"output": "similarity"})
    texts = embedder.predict(pairs[["text"]])
    images = embedder.predict(pairs[["image"]])
    np.testing.assert_allclose(cosines, (texts * images).sum(axis=1), atol=1e-5)

    labels = ["圆形", "十字", "方块"]
    predictions = embedder.predict(pairs[["image"]], {"output": "zeroshot", "labels": labels, "template": "{}的照片"})
    prompts = embedder.predict(pd.DataFrame({"text": [f"{label}的照片" for label in labels]}))
    assert [p["label"] for p in predictions] == [labels[i] for i in (images @ prompts.T).argmax(axis=1)]
    assert all(1 / 3 <= p["probability"] <= 1 for p in predictions)


@pytest.mark.parametrize(
    "frame, params, message",
    [
        (pd.DataFrame({"text": ["红色", " "]}), None, r"row 1: column 'text' must be a non-empty string"),
        (
            pd.DataFrame({"image": [_png("red"), b"GIF89a but not really"]}),
            None,
            r"row 1: column 'image': not a decodable image",
        ),
        (
            pd.DataFrame({"image": [_png("red"), "not base64!"]}),
            None,
            r"row 1: column 'image': a string but not valid base64",
        ),
        (
            pd.DataFrame({"image": [_png("red"), _png("red", (6000, 5000))]}),
            None,
            r"row 1: column 'image': image is 6000x5000 = 30.0 megapixels, above the limit of 25.0",
        ),
        (
            pd.DataFrame({"text": ["红色", "蓝色"], "image": [None, _png("red")]}),
            None,
            r"row 1: fill exactly one of 'text' or 'image' \(filled: text, image\)",
        ),
        (
            pd.DataFrame({"caption": ["红色"]}),
            None,
            r"needs a 'text' and/or an 'image' column; the input has columns \['caption'\]",
        ),
        (pd.DataFrame({"text": ["红色"]}), {"output": "similarity"}, r"needs \['image', 'text'\]"),
        (
            pd.DataFrame({"image": [_png("red")]}),
            {"output": "zeroshot", "labels": ["圆形"]},
            r"two or more non-empty class names",
        ),
        (pd.DataFrame({"image": [_png("red")]}), {"output": "caption"}, r"output must be one of"),
    ],
    ids=[
        "empty-text",
        "non-image",
        "bad-base64",
        "oversized",
        "both-filled",
        "wrong-column",
        "similarity-column",
        "one-label",
        "unknown-output",
    ],
)
def test_bad_input_is_named(embedder, frame, params, message):
    with pytest.raises(ValueError, match=message):
        embedder.predict(frame, params)


def test_model_config_overrides_and_rejects_unknown_keys(tiny_models):
    assert load_embedder(str(tiny_models[0]), {"batch_size": 3}).batch_size == 3
    with pytest.raises(ValueError, match=r"unknown model_config keys \['batchsize'\]"):
        load_embedder(str(tiny_models[0]), {"batchsize": 3})
