"""The onnx backend: the same embeddings as PyTorch, at any batch and text length, exported once per weights."""

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from zhclip.model import build_model, save_model
from zhclip.model.pyfunc import load_embedder

TEXTS = [
    "圆",  # 3 tokens with [CLS] and [SEP]
    "红色的圆形在左上角",
    "一张包含蓝色十字和绿色三角形的照片，背景是白色的，右下角还有一个黄色的小方块" * 3,  # past the context length
]


def _png(colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model, processor = build_model("tiny", seed=5)
    return save_model(model, processor, tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture
def onnx_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZHCLIP_ONNX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_onnx_backend_embeds_texts_and_images_as_pytorch_does(model_dir, onnx_cache):
    torch_backend = load_embedder(str(model_dir))
    onnx_backend = load_embedder(str(model_dir), {"backend": "onnx"})
    frame = pd.DataFrame({"text": TEXTS + [None, None], "image": [None] * 3 + [_png((255, 0, 0)), _png((0, 0, 255))]})
    expected, got = torch_backend.predict(frame), onnx_backend.predict(frame)
    assert got.shape == expected.shape == (5, torch_backend.dim)
    assert _cosines(got, expected).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    for text, vector in zip(TEXTS, expected):  # alone (no padding) as in a batch of mixed lengths
        alone = onnx_backend.predict(pd.DataFrame({"text": [text]}))
        assert _cosines(alone, vector[None])[0] >= 0.9999
    zeroshot = {"output": "zeroshot", "labels": ["红色", "蓝色"]}
    images = frame[3:][["image"]].reset_index(drop=True)
    assert [p["label"] for p in onnx_backend.predict(images, zeroshot)] == [
        p["label"] for p in torch_backend.predict(images, zeroshot)
    ]


def test_graphs_are_exported_once_per_weights_and_reused(model_dir, onnx_cache, monkeypatch):
    load_embedder(str(model_dir), {"backend": "onnx"})
    (folder,) = onnx_cache.iterdir()
    assert sorted(path.name for path in folder.iterdir()) == ["image_encoder.onnx", "text_encoder.onnx"]
    import zhclip.model.onnx_towers as onnx_towers

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(onnx_towers, "export_onnx", no_export)
    again = load_embedder(str(model_dir), {"backend": "onnx"})
    assert again.predict(pd.DataFrame({"text": ["圆"]})).shape == (1, again.dim)
    other, processor = build_model("tiny", seed=6)  # other weights: their own graphs
    monkeypatch.undo()
    monkeypatch.setenv("ZHCLIP_ONNX_CACHE", str(onnx_cache))
    load_embedder(str(save_model(other, processor, model_dir.parent / "other")), {"backend": "onnx"})
    assert len(list(onnx_cache.iterdir())) == 2


def test_int8_weights_embed_close_to_pytorch_and_are_made_once(model_dir, onnx_cache):
    frame = pd.DataFrame({"text": TEXTS + [None], "image": [None] * 3 + [_png((0, 200, 0))]})
    expected = load_embedder(str(model_dir)).predict(frame)
    got = load_embedder(str(model_dir), {"backend": "onnx-int8"}).predict(frame)
    assert _cosines(got, expected).min() >= 0.99
    (folder,) = onnx_cache.iterdir()
    assert sorted(path.name for path in folder.iterdir()) == [
        "image_encoder.onnx",
        "image_encoder_int8.onnx",
        "text_encoder.onnx",
        "text_encoder_int8.onnx",
    ]


def test_an_unknown_backend_is_a_clear_error(model_dir):
    with pytest.raises(ValueError, match=r"backend must be one of \['torch', 'onnx', 'onnx-int8'\], got 'tensorrt'"):
        load_embedder(str(model_dir), {"backend": "tensorrt"})
