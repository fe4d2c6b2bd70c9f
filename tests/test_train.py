"""Training: the plain PyTorch loop (Ray-free) and both stages through Ray Train."""

import csv
import json
import math
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file
from transformers import ChineseCLIPModel, ChineseCLIPProcessor

from components.common import ZhclipError, load_params
from components.train import TrainConfig, parameter_groups, train, train_worker_loop, warmup_cosine
from model import build_model, load_model, save_model


def _loop(prepared_dir, tmp_path, init_dir=None, **overrides):
    saved = {}

    def report(metrics, checkpoint_dir):
        if checkpoint_dir:
            model, _ = load_model(checkpoint_dir)
            saved["state"] = {k: v.clone() for k, v in model.state_dict().items()}

    config = {**asdict(TrainConfig(**{"batch_size": 32, "warmup_steps": 2, **overrides})),
              "prepared_dir": str(prepared_dir), "init_dir": init_dir}
    return train_worker_loop(config, report=report), saved["state"]


def test_stage1_learns_the_text_tower_and_keeps_the_image_tower(prepared_dir, tmp_path):
    history, state = _loop(prepared_dir, tmp_path, stage=1, epochs=12, lr=2e-3)
    initial, _ = build_model("tiny", seed=0)
    for name, tensor in initial.state_dict().items():
        if name.startswith(("vision_model.", "visual_projection.")):
            assert torch.equal(state[name], tensor), f"{name} changed in stage 1"
    assert not torch.equal(state["text_projection.weight"], initial.state_dict()["text_projection.weight"])
    steps_per_epoch = 192 // 32
    assert len(history) == 12 * steps_per_epoch
    first = sum(h["loss"] for h in history[:steps_per_epoch]) / steps_per_epoch
    last = sum(h["loss"] for h in history[-steps_per_epoch:]) / steps_per_epoch
    assert last < first - 0.1, f"mean epoch loss did not fall: {first:.3f} -> {last:.3f}"


def test_same_seed_same_trajectory(prepared_dir, tmp_path):
    a, _ = _loop(prepared_dir, tmp_path, stage=2, epochs=1, lr=1e-3)
    b, _ = _loop(prepared_dir, tmp_path, stage=2, epochs=1, lr=1e-3)
    assert [round(h["loss"], 5) for h in a] == [round(h["loss"], 5) for h in b]


def test_warmup_then_cosine_schedule():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = warmup_cosine(optimizer, warmup_steps=4, total_steps=12)
    rates = []
    for _ in range(12):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert rates[8] == pytest.approx(0.5)
    assert rates == sorted(rates[:4]) + sorted(rates[4:], reverse=True)


def test_no_weight_decay_on_biases_norms_embeddings_and_logit_scale():
    model, _ = build_model("tiny")
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert "logit_scale" in exempt and "text_model.embeddings.word_embeddings.weight" in exempt
    assert all(n.endswith("bias") or "norm" in n.lower() or "embed" in n or n == "logit_scale" for n in exempt)
    assert "text_model.encoder.layer.0.attention.self.query.weight" in {names[id(p)] for p in decay["params"]}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1


def test_config_merges_params_sections_and_rejects_typos():
    params = {"model": {"preset": "tiny"}, "train": {"lr": 0.1, "epochs": 3}, "stage2": {"lr": 0.01}}
    assert TrainConfig.from_params(params, 2).lr == 0.01
    assert TrainConfig.from_params(params, 1).lr == 0.1
    assert TrainConfig.from_params(params, 1, epochs=7).epochs == 7
    with pytest.raises(ZhclipError, match="unknown keys \\['epochz'\\]"):
        TrainConfig.from_params({"stage1": {"epochz": 3}}, 1)
    with pytest.raises(ZhclipError, match="epochs must be at least 1"):
        TrainConfig.from_params({"stage1": {"epochs": 0}}, 1)


def test_repository_params_are_valid_for_both_stages():
    params = load_params("params.yaml")
    assert TrainConfig.from_params(params, 1).stage == 1
    assert TrainConfig.from_params(params, 2).lr < TrainConfig.from_params(params, 1).lr


def test_ray_train_writes_hugging_face_models_for_both_stages(trained):
    root = trained["root"]
    for stage in ("stage1", "stage2"):
        model_dir = root / stage
        ChineseCLIPModel.from_pretrained(model_dir)
        ChineseCLIPProcessor.from_pretrained(model_dir)
        assert load_file(model_dir / "model.safetensors")
        summary = json.loads((root / f"{stage}.json").read_text())
        assert summary["steps"] == 2 * (192 // 32) and summary["final_loss"] > 0
    stage1 = load_file(root / "stage1" / "model.safetensors")
    stage2 = load_file(root / "stage2" / "model.safetensors")
    assert not torch.equal(stage1["visual_projection.weight"], stage2["visual_projection.weight"]), "stage 2 unlocks the image tower"
    with open(root / "stage1.csv") as rows:
        history = list(csv.DictReader(rows))
    assert [int(r["step"]) for r in history] == list(range(1, 13)) and float(history[0]["lr"]) > 0


def test_stage2_requires_stage1_model(prepared_dir, tmp_path):
    with pytest.raises(ZhclipError, match="stage 2 starts from stage 1"):
        train(prepared_dir, tmp_path / "out", TrainConfig(stage=2))
    with pytest.raises(ZhclipError, match="not a model folder"):
        train(prepared_dir, tmp_path / "out", TrainConfig(stage=2), init_dir=tmp_path)


def test_a_failing_worker_stops_the_stage_with_a_clear_error(prepared_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    config = TrainConfig(stage=2, epochs=1, storage_path=str(tmp_path / "ray"))
    with pytest.raises(ZhclipError, match="training stage 2 failed"):
        train(prepared_dir, tmp_path / "out", config, init_dir=broken)


def test_logit_scale_is_clamped_to_ln_100_after_each_step(prepared_dir, tmp_path):
    model, processor = build_model("tiny")
    with torch.no_grad():
        model.logit_scale.fill_(9.0)
    save_model(model, processor, tmp_path / "hot")
    history, state = _loop(prepared_dir, tmp_path, init_dir=str(tmp_path / "hot"), stage=2, epochs=1, lr=1e-4)
    # Without the clamp it would stay near 9 at this learning rate; with it, steps start from ln 100.
    assert math.log(100) - 0.01 < state["logit_scale"].item() <= math.log(100) + 1e-6


def test_stage1_starts_from_pretrained_towers_and_keeps_the_image_tower(prepared_dir, tmp_path):
    from test_pretrained import _clip, _roberta

    clip, bert = _clip(tmp_path / "clip"), _roberta(tmp_path / "roberta")
    _, state = _loop(prepared_dir, tmp_path, stage=1, epochs=1, lr=1e-3,
                     pretrained_vision=str(tmp_path / "clip"), pretrained_text=str(tmp_path / "roberta"))
    for name, tensor in clip.state_dict().items():
        if name.startswith(("vision_model.", "visual_projection.")):
            torch.testing.assert_close(state[name], tensor, msg=name)
    word = "text_model.embeddings.word_embeddings.weight"
    assert not torch.equal(state[word], bert.state_dict()["bert.embeddings.word_embeddings.weight"])


def test_rn_stage1_trains_the_text_side_only(prepared_dir, tmp_path):
    history, state = _loop(prepared_dir, tmp_path, stage=1, epochs=1, lr=1e-3, preset="tiny-rn")
    initial, _ = build_model("tiny-rn", seed=0)
    for name, tensor in initial.state_dict().items():
        if name.startswith("visual."):
            assert torch.equal(state[name], tensor), f"{name} changed in stage 1"
    assert not torch.equal(state["text_projection.weight"], initial.state_dict()["text_projection.weight"])
    assert len(history) == 192 // 32
