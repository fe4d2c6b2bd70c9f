"""Fine-tuning switches end to end: LoRA and distilled stages give plain model folders (every later
step takes the LoRA one), a LoRA checkpoint resumes exactly, long captions are counted, and bad combinations are
refused with the setting named."""

import json
from dataclasses import asdict

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_cli
from zhclip.components.data.shards import read_pairs
from zhclip.components.training.checkpoint import load_checkpoint, restore_training_parameters, save_checkpoint
from zhclip.components.training.config import TrainConfig
from zhclip.components.training.loop import WorkerContext, train_worker_loop
from zhclip.components.training.runner import train
from zhclip.components.training.step import TrainStep, add_logit_bias, build_optimizer
from zhclip.components.training.teacher import load_teacher
from zhclip.model import build_model, load_model
from zhclip.model.lora import add_lora, has_lora

MODULES = {"text": ["query", "value"], "image": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def variants(trained, prepared_dir, tmp_path_factory) -> dict:
    """Stage 2 from the shared stage 1, once with LoRA on both towers, once distilled from stage 2."""
    root = tmp_path_factory.mktemp("fine_tuning")
    common = {
        "stage": 2,
        "epochs": 1,
        "batch_size": 32,
        "lr": 5e-4,
        "warmup_steps": 2,
        "storage_path": str(root / "ray"),
        "tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
    }
    init = trained["root"] / "stage1"
    settings = {
        "lora": {"lora": "both", "lora_rank": 4},
        "distill": {"teacher": str(trained["root"] / "stage2"), "distill_text_weight": 1.0},
    }
    return {
        name: train(prepared_dir, root / name, TrainConfig(**common, **changes), init_dir=init)
        for name, changes in settings.items()
    } | {"root": root, "full_params": sum(p.numel() for p in load_model(init)[0].parameters())}


def test_lora_trains_few_parameters_and_merges_into_a_plain_folder(variants, trained):
    summary = variants["lora"]
    assert 0 < summary["trainable_params"] < variants["full_params"] / 2
    assert summary["peak_memory_mb"] > 0
    weights = load_file(f"{summary['model_dir']}/model.safetensors")
    plain = load_file(f"{trained['root'] / 'stage1'}/model.safetensors")
    assert set(weights) == set(plain)  # no adapter or base_layer key: a plain ChineseCLIP checkpoint
    query = "text_model.encoder.layer.0.attention.self.query.weight"
    key = "text_model.encoder.layer.0.attention.self.key.weight"
    assert not torch.equal(weights[query], plain[query])  # the merged adapter moved it
    assert torch.equal(weights[key], plain[key])  # not adapted, frozen


def test_distilled_stage_reports_the_distillation_and_saves_a_plain_folder(variants, trained):
    summary = variants["distill"]
    assert summary["config"]["teacher"] and summary["steps"] == 192 // 32
    assert summary["trainable_params"] == variants["full_params"]
    # nothing of the teacher in the folder: the student's own keys, as a plain stage's folder has, so
    # the later steps take it as they take any (the LoRA folder, the one that differs, runs them below)
    weights = load_file(f"{summary['model_dir']}/model.safetensors")
    assert set(weights) == set(load_file(f"{trained['root'] / 'stage1'}/model.safetensors"))


def test_later_steps_take_the_folder_unchanged(variants, prepared_dir, tmp_path, variant="lora"):
    model_dir = variants[variant]["model_dir"]
    metrics = tmp_path / "metrics.json"
    evaluated = run_cli("evaluate", "--model", model_dir, "--data", str(prepared_dir), "--out", str(metrics))
    assert evaluated.returncode == 0, evaluated.stderr
    assert 0 <= json.loads(metrics.read_text())["mean_recall"] <= 100
    registry = f"sqlite:///{tmp_path / 'registry.db'}"
    registered = run_cli(
        "register", "--model", model_dir, "--metrics", str(metrics), "--model-name", f"ft-{variant}",
        "--tracking-uri", registry, "--defaults",
    )  # fmt: skip
    assert registered.returncode == 0, registered.stderr
    mlflow.set_tracking_uri(registry)
    try:
        pulled = mlflow.pyfunc.load_model(f"models:/ft-{variant}@champion")
        vectors = np.asarray(pulled.predict(pd.DataFrame({"text": ["红色的圆形"], "image": [None]})))
    finally:
        mlflow.set_tracking_uri(None)
    assert vectors.shape == (1, 64) and abs(np.linalg.norm(vectors) - 1) < 1e-4
    # the registered version can teach the next stage: a registry URI as the distillation teacher
    folder_model = load_model(model_dir)[0]
    teacher = load_teacher(f"models:/ft-{variant}@champion", registry, folder_model, 52, torch.device("cpu"))
    assert not any(param.requires_grad for param in teacher.parameters()) and not teacher.training
    for key, value in folder_model.state_dict().items():
        assert torch.equal(teacher.state_dict()[key], value), key
    exported = run_cli("model", "export-onnx", "--model", model_dir, "--out", str(tmp_path / "onnx"))
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "onnx" / "text_encoder.onnx").is_file()
    indexed = run_cli(
        "index", "--model", model_dir, "--gallery", str(prepared_dir / "test"), "--out", str(tmp_path / "index"),
        "--defaults",
    )  # fmt: skip
    assert indexed.returncode == 0, indexed.stderr
    assert json.loads((tmp_path / "index" / "index.json").read_text())["images"] > 0


def test_a_lora_checkpoint_resumes_the_unmerged_model_exactly(tmp_path):
    model, processor = build_model("tiny", seed=0)
    add_lora(model, "both", 4, 8.0, 0.0, MODULES)
    add_logit_bias(model, -10.0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or name == "logit_bias":
                param.add_(0.01 * torch.randn_like(param))
    step = TrainStep(model, build_optimizer(model, 1e-3, 0.1))
    folder = save_checkpoint(tmp_path / "ckpt", model, processor, step, {"step": 3})
    merged, _, state = load_checkpoint(folder)
    assert not has_lora(merged) and not hasattr(merged, "logit_bias")
    inputs = processor(text=["红色的圆形"], images=[np.zeros((32, 32, 3), np.uint8)], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model.eval()(**inputs).text_embeds
        torch.testing.assert_close(merged(**inputs).text_embeds, expected, atol=1e-5, rtol=1e-5)
    add_lora(merged, "both", 4, 8.0, 0.0, MODULES)
    add_logit_bias(merged, -10.0)
    restore_training_parameters(merged, state)
    original = model.state_dict()
    for key, value in merged.state_dict().items():
        assert torch.equal(value, original[key]), f"{key} differs after the resume"


def test_captions_longer_than_the_context_are_counted_in_the_summary(prepared_dir, tmp_path):
    _, processor = build_model("tiny")
    texts = list(read_pairs(prepared_dir, "train")["text"])
    lengths = [len(processor.tokenizer(text)["input_ids"]) for text in texts]  # with [CLS] and [SEP]
    context_length = sorted(lengths)[len(lengths) // 2]  # the median caption fits, the longer ones do not
    too_long = sum(length > context_length for length in lengths)
    assert 0 < too_long < len(texts)  # some, not all: the count must come from the captions themselves
    config = TrainConfig(
        stage=1,
        epochs=1,
        batch_size=32,
        context_length=context_length,
        storage_path=str(tmp_path / "ray"),
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )
    summary = train(prepared_dir, tmp_path / "out", config)
    assert summary["captions_seen"] == len(texts) == 192
    assert summary["truncated_captions"] == too_long
    assert any(f"{too_long} of 192 captions" in warning for warning in summary["warnings"])
    assert load_model(tmp_path / "out")[1].tokenizer.model_max_length == context_length


def test_losses_train_through_the_loop(prepared_dir):
    for changes in ({"loss": "siglip"}, {"false_negatives": True}, {"loss": "siglip", "false_negatives": True}):
        config = {
            **asdict(TrainConfig(stage=2, epochs=1, batch_size=32, warmup_steps=1, accum_steps=2, **changes)),
            "prepared_dir": str(prepared_dir),
            "init_dir": None,
        }
        history = train_worker_loop(config, WorkerContext())
        assert len(history) == 6 and all(np.isfinite(h["loss"]) for h in history), changes
        assert ("logit_bias" in history[-1]) == (changes.get("loss") == "siglip")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"stage": 1, "lora": "both"}, "stage1.lora: text"),
        ({"lora": "text", "fused_qkv": True}, "fused_qkv: false"),
        ({"lora": "all"}, "lora must be one of"),
        ({"loss": "hinge"}, "loss must be one of"),
        ({"loss": "siglip", "local_loss": True}, "InfoNCE's"),
        ({"teacher": "t", "distill_image_weight": 0.0}, "both distillation weights 0"),
        ({"stage": 1, "teacher": "t"}, "stage1.distill_image_weight: 0"),
    ],
)
def test_settings_that_cannot_work_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{"stage": 2, **changes})


def test_context_beyond_the_position_embeddings_is_refused(prepared_dir):
    config = {**asdict(TrainConfig(stage=2, context_length=600)), "prepared_dir": str(prepared_dir), "init_dir": None}
    with pytest.raises(Exception, match="512 position"):
        train_worker_loop(config, WorkerContext())
