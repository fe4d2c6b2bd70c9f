"""model/: presets, the Hugging Face directory contract, loss, locking, embeddings, independence."""

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ChineseCLIPModel, ChineseCLIPProcessor

from zhclip.components.training.step import parameter_groups
from zhclip.model import (
    build_model,
    contrastive_loss,
    embed_images,
    embed_texts,
    load_model,
    lock_image_tower,
    save_model,
)

MODEL_DIR = Path(__file__).resolve().parents[2] / "model"


def test_the_package_and_its_presets_import_without_torch_or_transformers():
    """Commands that only check settings against the presets (training's driver, `zhclip suite`) start
    without torch's and transformers' imports; the rest loads on first use, ResNet's registration too."""
    import subprocess
    import sys

    code = (
        "import sys, zhclip.model as m; from zhclip.model import CONTEXT_LENGTH, PRESETS; "
        "print(sorted({'torch', 'transformers'} & set(sys.modules)), CONTEXT_LENGTH, 'tiny' in PRESETS); "
        "m.load_model; from transformers.models.auto.configuration_auto import CONFIG_MAPPING; "
        "print('zhclip_chinese_clip_resnet' in CONFIG_MAPPING, sorted(set(dir(m)) - set(m.__all__)))"
    )
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert shown.stdout.splitlines() == ["[] 52 True", "True []"]


def test_model_package_imports_nothing_else_from_the_repo():
    # and itself, by relative imports; onnxruntime only for the onnx backend, which a pull installs too;
    # peft only for training with LoRA (model/lora.py, which serving never imports)
    allowed_roots = {"torch", "transformers", "numpy", "PIL", "onnxruntime", "peft", "__future__"}
    import sys

    for source in MODEL_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module]
                if isinstance(node, ast.ImportFrom) and node.module and not node.level
                else []
            )
            for name in names:
                root = name.split(".")[0]
                assert root in allowed_roots or root in sys.stdlib_module_names, f"{source.name} imports {name}"


def test_tokenizer_uses_the_chinese_roberta_vocab():
    _, processor = build_model("tiny", context_length=16)
    ids = processor.tokenizer("红色的圆形", padding="max_length", max_length=16)["input_ids"]
    # [CLS]=101, 红=5273, 色=5682, 的=4638, 圆=1749, 形=2501, [SEP]=102, then [PAD]=0
    assert ids[:7] == [101, 5273, 5682, 4638, 1749, 2501, 102]
    assert ids[7:] == [0] * 9
    assert len(processor.tokenizer) == 21128


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown preset 'huge'.*tiny"):
        build_model("huge")


def test_saved_directory_loads_with_plain_transformers(tmp_path):
    model, processor = build_model("tiny")
    save_model(model, processor, tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin")), "no pickle weights"
    reloaded = ChineseCLIPModel.from_pretrained(tmp_path)
    ChineseCLIPProcessor.from_pretrained(tmp_path)
    assert load_model(tmp_path)[0].config._attn_implementation == "sdpa"
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], tensor)


def test_embeddings_are_unit_norm_and_batch_independent():
    model, processor = build_model("tiny")
    model.eval()
    texts = ["红色的圆形在左上角", "蓝色十字", "一个黄色三角形"]
    together = embed_texts(model, processor, texts, batch_size=3)
    one_by_one = embed_texts(model, processor, texts, batch_size=1)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)
    images = embed_images(model, processor, [Image.new("RGB", (50, 40), c) for c in ("red", "blue")])
    assert images.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1, atol=1e-5)


def test_contrastive_loss_matches_the_definition():
    torch.manual_seed(0)
    image, text = torch.randn(4, 8), torch.randn(4, 8)
    scale = torch.tensor(np.log(10.0))
    i, t = torch.nn.functional.normalize(image, dim=-1), torch.nn.functional.normalize(text, dim=-1)
    logits = 10 * i @ t.T
    expected = -(torch.log_softmax(logits, 1).diag().mean() + torch.log_softmax(logits, 0).diag().mean()) / 2
    torch.testing.assert_close(contrastive_loss(image, text, scale), expected)
    # Perfectly aligned, well-separated pairs give a near-zero loss; the scale is clamped at 100.
    eye = torch.eye(4)
    assert contrastive_loss(eye, eye, torch.tensor(10.0)).item() < 1e-3


def test_locked_image_tower_does_not_change_in_a_step():
    model, processor = build_model("tiny")
    model.train()
    frozen = lock_image_tower(model)
    assert frozen == sum(p.numel() for p in model.vision_model.parameters()) + model.visual_projection.weight.numel()
    vision_before = {k: v.clone() for k, v in model.vision_model.state_dict().items()}
    text_before = model.text_model.embeddings.word_embeddings.weight.clone()
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.1), lr=1e-2)
    tokens = processor.tokenizer(["红色圆形", "蓝色方形"], padding="max_length", max_length=8, return_tensors="pt")
    out = model(
        input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=torch.randn(2, 3, 32, 32)
    )
    contrastive_loss(out.image_embeds, out.text_embeds, model.logit_scale).backward()
    optimizer.step()
    for name, tensor in model.vision_model.state_dict().items():
        assert torch.equal(tensor, vision_before[name]), name
    assert not torch.equal(model.text_model.embeddings.word_embeddings.weight, text_before)
    vision_params = {id(p) for p in [*model.vision_model.parameters(), *model.visual_projection.parameters()]}
    assert optimizer.state and not vision_params & {id(p) for p in optimizer.state}, (
        "no optimizer state for the locked tower"
    )


def test_load_model_names_a_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)


def test_unlocked_groups_leave_the_last_image_tower_groups_trainable():
    model, _ = build_model("tiny")
    lock_image_tower(model, unlocked_groups=2)
    trainable = {
        name for name, p in model.named_parameters() if p.requires_grad and name.startswith(("vision", "visual"))
    }
    assert trainable == {
        n
        for n, _ in model.named_parameters()
        if n.startswith(("vision_model.encoder.layers.1.", "vision_model.post_layernorm.", "visual_projection."))
    }
    assert not model.vision_model.encoder.layers[0].training and model.vision_model.encoder.layers[1].training
    with pytest.raises(ValueError, match="unlocked_groups must be 0..4"):
        lock_image_tower(build_model("tiny")[0], unlocked_groups=5)


def test_rn_preset_saves_loads_and_locks_batch_norm_statistics(tmp_path):
    model, processor = build_model("tiny-rn")
    save_model(model, processor, tmp_path)
    reloaded, _ = load_model(tmp_path)
    assert type(reloaded).__name__ == "ChineseCLIPResNetModel"
    images = [Image.new("RGB", (40, 50), c) for c in ("red", "blue")]
    np.testing.assert_allclose(
        embed_images(model.eval(), processor, images), embed_images(reloaded, processor, images), atol=1e-6
    )
    model.train()
    lock_image_tower(model)
    stats = model.visual.layer1[0].bn1.running_mean.clone()
    out = model(
        input_ids=torch.randint(106, 21128, (4, 8)),
        attention_mask=torch.ones(4, 8, dtype=torch.long),
        pixel_values=torch.randn(4, 3, 32, 32),
    )
    contrastive_loss(out.image_embeds, out.text_embeds, model.logit_scale).backward()
    assert torch.equal(model.visual.layer1[0].bn1.running_mean, stats), "locked batch norms must not update"
    assert all(p.grad is None for p in model.visual.parameters())
    assert model.text_projection.weight.grad is not None
