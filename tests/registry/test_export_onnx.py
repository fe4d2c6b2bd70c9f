"""ONNX export: both encoders, dynamic batch, outputs within 1e-3 of PyTorch under onnxruntime."""

import json

import numpy as np
import onnxruntime
import torch
from transformers import ChineseCLIPModel

from zhclip.components.registry.export_onnx import export
from zhclip.model import build_model, embed_texts, load_model, save_model

from conftest import run_cli


def test_rn_onnx_encoders_match_pytorch(tmp_path):
    model, processor = build_model("tiny-rn")
    save_model(model, processor, tmp_path / "model")
    summary = export(tmp_path / "model", tmp_path / "onnx")
    assert summary["image_max_abs_diff"] <= 1e-3 and summary["text_max_abs_diff"] <= 1e-3


def test_onnx_encoders_match_pytorch_at_any_batch_size(tmp_path):
    model, processor = build_model("tiny")
    save_model(model, processor, tmp_path / "model")
    summary = export(tmp_path / "model", tmp_path / "onnx")
    assert summary["image_max_abs_diff"] <= 1e-3 and summary["text_max_abs_diff"] <= 1e-3
    session = onnxruntime.InferenceSession(summary["text_encoder"], providers=["CPUExecutionProvider"])
    texts = ["红色的圆形", "蓝色十字在右下角", "一只猫", "狗", "图片", "画面", "绿色", "黄色三角形", "白色", "紫色"]
    tokens = processor.tokenizer(texts, padding="max_length", truncation=True, max_length=52, return_tensors="np")
    onnx_features = session.run(None, {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]})[0]
    onnx_features /= np.linalg.norm(onnx_features, axis=1, keepdims=True)
    reloaded, reloaded_processor = load_model(tmp_path / "model")
    np.testing.assert_allclose(onnx_features, embed_texts(reloaded, reloaded_processor, texts), atol=1e-3)


def test_plain_transformers_load_gives_the_same_embeddings_as_zhclip(tmp_path):
    model, processor = build_model("tiny", seed=3)
    save_model(model, processor, tmp_path)
    plain = ChineseCLIPModel.from_pretrained(tmp_path).eval()
    ours, our_processor = load_model(tmp_path)
    tokens = processor.tokenizer(["红色的圆形"], padding="max_length", max_length=52, return_tensors="pt")
    with torch.no_grad():
        expected = plain.get_text_features(**tokens).pooler_output
    expected = torch.nn.functional.normalize(expected, dim=-1).numpy()
    np.testing.assert_allclose(embed_texts(ours, our_processor, ["红色的圆形"]), expected, atol=1e-6)


def test_export_from_the_command_line(tmp_path):
    model, processor = build_model("tiny")
    save_model(model, processor, tmp_path / "model")
    result = run_cli("model", "export-onnx", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "onnx"))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["image_max_abs_diff"] <= 1e-3
    missing = run_cli("model", "export-onnx", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert missing.returncode == 2 and "cannot load model" in missing.stderr
