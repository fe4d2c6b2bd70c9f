"""Fidelity to the reference implementation (the `cn-clip` wheel): tokens and converted checkpoints."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import reference_model, save_as_released
from PIL import Image

from zhclip.model import build_model, decode_image, load_model
from zhclip.model.convert import convert_checkpoint, load_reference_checkpoint, reference_spec
from zhclip.model.presets import build_processor, default_vocab_path

from reference import reference

TEXTS = [
    "一个红色的圆形在左上角",
    "Hello WORLD, 你好！",
    "“引号”和‘单引号’ \"ascii\" 'quotes'",
    "Café naïve résumé ÀÉÎ",
    "emoji 😀 and tabs\tand\nnewlines",
    "ｆｕｌｌ　ｗｉｄｔｈ　ＡＢＣ１２３",
    "很长" * 40,
    "",
    "   ",
    "unaffable running",
    "数字123和english混合mixed",
    "\u200b零宽\u00a0空格",
    "𠀀罕见字",
    "iPhone 15 Pro Max 价格",
]


@pytest.mark.parametrize("context_length", [52, 16])
def test_token_ids_match_the_reference_tokenize(context_length):
    _, processor = build_model("tiny", context_length=context_length)
    ours = processor.tokenizer(
        TEXTS, padding="max_length", truncation=True, max_length=context_length, return_tensors="pt"
    )["input_ids"]
    theirs = reference().tokenize(TEXTS, context_length=context_length)
    for text, a, b in zip(TEXTS, ours, theirs):
        assert torch.equal(a, b), text


def _reference_resnet(**overrides):
    """A small reference RN CLIP (RBT3-style text) with every tensor and batch-norm statistic perturbed."""
    model = reference_model(vision_layers=(1, 2, 1, 1), vision_width=8, image_resolution=64, embed_dim=32, **overrides)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
    return model


def test_converted_rn_checkpoint_reproduces_reference_embeddings(tmp_path):
    ref_model = _reference_resnet()
    save_as_released(ref_model, tmp_path / "rn.pt")
    spec = reference_spec(load_reference_checkpoint(tmp_path / "rn.pt"))
    assert spec["vision"] == {"resnet_layers": [1, 2, 1, 1], "width": 8, "heads": 4, "image_size": 64}
    convert_checkpoint(tmp_path / "rn.pt", tmp_path / "hf")
    _compare(ref_model, tmp_path / "hf", 64)


@pytest.mark.slow
def test_rn50_checkpoint_converts_with_its_released_shape(tmp_path):
    vision = json.loads((reference().configs / "RN50.json").read_text())
    vision["vision_layers"] = tuple(
        json.loads(vision["vision_layers"])
    )  # stored as a string, as the reference reads it
    text = json.loads((reference().configs / "RBT3-chinese.json").read_text())
    ref_model = reference_model(**vision, **text)
    save_as_released(ref_model, tmp_path / "rn50.pt")
    convert_checkpoint(tmp_path / "rn50.pt", tmp_path / "hf", preset="RN50")
    _compare(ref_model, tmp_path / "hf", 224)


def _compare(ref_model, model_dir, resolution):
    ours, processor = load_model(model_dir)
    texts = [t for t in TEXTS if t.strip()]
    tokens = processor.tokenizer(texts, padding="max_length", truncation=True, max_length=52, return_tensors="pt")
    pixels = torch.randn(3, 3, resolution, resolution)
    with torch.no_grad():
        text_ours = ours.get_text_features(**tokens).pooler_output
        text_ref = ref_model.encode_text(reference().tokenize(texts))
        image_ours = ours.get_image_features(pixel_values=pixels).pooler_output
        image_ref = ref_model.encode_image(pixels)
    assert (text_ours - text_ref).abs().max().item() <= 1e-4
    assert (image_ours - image_ref).abs().max().item() <= 1e-4
    torch.testing.assert_close(ours.logit_scale, ref_model.logit_scale)


def test_converted_checkpoint_reproduces_reference_embeddings(tmp_path):
    ref_model = reference_model()
    save_as_released(ref_model, tmp_path / "epoch3.pt")
    convert_checkpoint(tmp_path / "epoch3.pt", tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    _compare(ref_model, tmp_path / "hf", 32)


@pytest.mark.slow
def test_vit_b_16_checkpoint_converts_with_its_released_shape(tmp_path):
    vision = json.loads((reference().configs / "ViT-B-16.json").read_text())
    text = json.loads((reference().configs / "RoBERTa-wwm-ext-base-chinese.json").read_text())
    ref_model = reference_model(**vision, **text)
    save_as_released(ref_model, tmp_path / "vit-b-16.pt")
    spec = reference_spec(load_reference_checkpoint(tmp_path / "vit-b-16.pt"))
    assert spec["vision"]["num_attention_heads"] == 12 and spec["vision"]["image_size"] == 224
    convert_checkpoint(tmp_path / "vit-b-16.pt", tmp_path / "hf")
    _compare(ref_model, tmp_path / "hf", 224)


def test_bad_checkpoints_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt not found"):
        load_reference_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt is not a loadable PyTorch checkpoint"):
        load_reference_checkpoint(tmp_path / "junk.pt")
    state = {k: v for k, v in reference_model().state_dict().items() if k != "bert.encoder.layer.1.output.dense.bias"}
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="missing \\['text_model.encoder.layer.1.output.dense.bias'\\]"):
        convert_checkpoint(tmp_path / "partial.pt", tmp_path / "out")


def test_convert_from_the_command_line(tmp_path):
    from conftest import run_cli

    save_as_released(reference_model(), tmp_path / "ref.pt")
    result = run_cli("model", "convert", "--checkpoint", str(tmp_path / "ref.pt"), "--out", str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["architecture"], summary["projection_dim"], summary["image_size"]) == ("chinese_clip", 32, 32)
    mismatch = run_cli(
        "model",
        "convert",
        "--checkpoint",
        str(tmp_path / "ref.pt"),
        "--out",
        str(tmp_path / "b"),
        "--preset",
        "ViT-B-16",
    )
    assert mismatch.returncode == 2 and "Traceback" not in mismatch.stderr
    assert "shape mismatches" in mismatch.stderr and "visual_projection.weight" in mismatch.stderr


REFERENCE_PYTHON = Path(__file__).resolve().parents[2] / ".venv-reference" / "bin" / "python"
REFERENCE_PIXELS = """
import sys, numpy, torch
from PIL import Image
from cn_clip.clip import image_transform
resolution, out, *paths = sys.argv[1:]
transform = image_transform(int(resolution))
numpy.save(out, torch.stack([transform(Image.open(p)) for p in paths]).numpy())
"""


@pytest.mark.slow
@pytest.mark.parametrize("resolution", [224, 32])
def test_pixels_match_the_reference_image_transform(tmp_path, resolution):
    """cn-clip's own `image_transform` (real torchvision, in the reference environment) against ours."""
    if not REFERENCE_PYTHON.is_file():
        pytest.fail("the reference environment is missing: run `make reference-env` (make test does)")
    rng = np.random.default_rng(0)
    paths = []
    for index, (size, mode, fmt) in enumerate(
        [
            ((64, 64), "RGB", "PNG"),
            ((300, 200), "RGB", "JPEG"),
            ((17, 93), "L", "PNG"),
            ((224, 224), "RGB", "PNG"),
            ((500, 333), "RGB", "JPEG"),
        ]
    ):
        channels = 3 if mode == "RGB" else 1
        pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8).squeeze()
        path = tmp_path / f"image{index}.{fmt.lower()}"
        Image.fromarray(pixels, mode).save(path, format=fmt)
        paths.append(path)
    result = subprocess.run(
        [str(REFERENCE_PYTHON), "-c", REFERENCE_PIXELS, str(resolution), str(tmp_path / "ref.npy"), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = np.load(tmp_path / "ref.npy")
    processor = build_processor(default_vocab_path(), resolution, 52)
    ours = processor.image_processor(images=[decode_image(p.read_bytes()) for p in paths], return_tensors="np")[
        "pixel_values"
    ]
    assert ours.shape == theirs.shape == (len(paths), 3, resolution, resolution)
    assert np.abs(ours - theirs).max() <= 1e-5
