"""Stage-1 initialisation from local OpenAI-CLIP and Chinese RoBERTa-wwm folders."""

import pytest
import torch
from builders import pretrained_clip, pretrained_roberta

from zhclip.model import PRESETS, build_model
from zhclip.model.pretrained import init_from_pretrained

TINY = PRESETS["tiny"]


def test_towers_come_from_the_pretrained_folders(tmp_path):
    clip, bert = pretrained_clip(tmp_path / "clip"), pretrained_roberta(tmp_path / "roberta")
    model, _ = build_model("tiny")
    loaded = init_from_pretrained(model, tmp_path / "clip", tmp_path / "roberta")
    assert loaded["vision"] == len(
        [k for k in clip.state_dict() if k.startswith(("vision_model.", "visual_projection."))]
    )
    for module in (model, clip, bert):
        module.eval()
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.randint(106, 21128, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(
            model.get_image_features(pixel_values=pixels).pooler_output,
            clip.get_image_features(pixel_values=pixels).pooler_output,
        )
        ours = model.text_model(input_ids=ids).last_hidden_state
        theirs = bert.bert(input_ids=ids).last_hidden_state
    torch.testing.assert_close(ours, theirs)


def test_vision_only_checkpoint_keeps_the_random_projection(tmp_path):
    clip = pretrained_clip(tmp_path / "vision", vision_only=True)
    model, _ = build_model("tiny")
    projection = model.visual_projection.weight.clone()
    init_from_pretrained(model, vision_dir=tmp_path / "vision")
    torch.testing.assert_close(model.visual_projection.weight, projection)
    torch.testing.assert_close(
        model.vision_model.embeddings.patch_embedding.weight, clip.state_dict()["embeddings.patch_embedding.weight"]
    )


def test_mismatched_and_missing_checkpoints_are_named(tmp_path):
    pretrained_clip(tmp_path / "wide", hidden=128)
    model, _ = build_model("tiny")
    with pytest.raises(
        ValueError,
        match=r"shape mismatches .*vision_model.embeddings.class_embedding: checkpoint \(128,\) vs model \(64,\)",
    ):
        init_from_pretrained(model, vision_dir=tmp_path / "wide")
    with pytest.raises(FileNotFoundError, match="nowhere not found"):
        init_from_pretrained(model, text_dir=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        init_from_pretrained(model, text_dir=tmp_path / "empty")
    with pytest.raises(ValueError, match="not a BertModel checkpoint"):
        init_from_pretrained(model, text_dir=tmp_path / "wide")


def test_resnet_models_refuse_hugging_face_clip_towers(tmp_path):
    pretrained_clip(tmp_path / "clip")
    model, _ = build_model("tiny-rn")
    with pytest.raises(ValueError, match="ViT towers only.*--init"):
        init_from_pretrained(model, vision_dir=tmp_path / "clip")
