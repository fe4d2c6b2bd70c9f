"""Training: the plain PyTorch loop (Ray-free) and both stages through Ray Train."""

import csv
import json
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import ChineseCLIPModel, ChineseCLIPProcessor

from zhclip.components.core.errors import ZhclipError
from zhclip.components.core.lineage import dvc_hash, weights_hash
from zhclip.components.core.settings import load_params
from zhclip.components.training.config import TrainConfig, stage_config
from zhclip.components.training.loop import WorkerContext, train_worker_loop
from zhclip.components.training.runner import train
from zhclip.model import build_model, load_model, save_model


def _loop(prepared_dir, tmp_path, init_dir=None, **overrides):
    saved = {}

    def report(metrics, checkpoint_dir):
        if checkpoint_dir:
            model, _ = load_model(checkpoint_dir)
            saved["state"] = {k: v.clone() for k, v in model.state_dict().items()}

    config = {
        **asdict(TrainConfig(**{"batch_size": 32, "warmup_steps": 2, **overrides})),
        "prepared_dir": str(prepared_dir),
        "init_dir": init_dir,
    }
    return train_worker_loop(config, WorkerContext(report=report)), saved["state"]


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


def test_a_finished_stage_run_again_trains_again_to_the_same_weights(trained, prepared_dir, tmp_path):
    """As `dvc repro -f` runs it: the trained fixture's stage 1 again, with its settings and Ray storage
    (another MLflow store, to leave the fixture's runs as they are). The finished run is not resumed
    (it would train nothing) but trained again in the next run folder, from step 0, and writes the same
    model.safetensors byte for byte (docs/training.md#reproducibility); the folders differ only in the
    run's own records, so the registry sees the same weights."""
    first = trained["stage1"]
    config = {**first["config"], "tracking_uri": f"sqlite:///{tmp_path}/m.db"}
    again = train(prepared_dir, tmp_path / "stage1", TrainConfig(**config))
    assert again["ray_run"] == f"{first['ray_run']}-2" and again["resumed_at_steps"] == []
    assert again["steps"] == first["steps"]
    folders = (trained["root"] / "stage1", tmp_path / "stage1")
    assert (
        folders[0].joinpath("model.safetensors").read_bytes() == folders[1].joinpath("model.safetensors").read_bytes()
    )
    assert weights_hash(folders[0]) == weights_hash(folders[1]) and dvc_hash(folders[0]) != dvc_hash(folders[1])


def test_config_merges_params_sections_and_rejects_typos():
    params = {"model": {"preset": "tiny"}, "train": {"lr": 0.1, "epochs": 3}, "stage2": {"lr": 0.01}}
    assert stage_config(params, 2).lr == 0.01
    assert stage_config(params, 1).lr == 0.1
    assert stage_config(params, 1, epochs=7).epochs == 7
    with pytest.raises(ZhclipError, match="unknown keys \\['epochz'\\]"):
        stage_config({"stage1": {"epochz": 3}}, 1)
    with pytest.raises(ZhclipError, match="epochs must be at least 1"):
        stage_config({"stage1": {"epochs": 0}}, 1)


def test_repository_params_are_valid_for_both_stages():
    params = load_params("params.yaml")
    assert stage_config(params, 1).stage == 1
    assert stage_config(params, 2).lr < stage_config(params, 1).lr  # params.yaml's stage2 section lowers it


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
    assert not torch.equal(stage1["visual_projection.weight"], stage2["visual_projection.weight"]), (
        "stage 2 unlocks the image tower"
    )
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
    from builders import pretrained_clip, pretrained_roberta

    from zhclip.components.training.start import StartConfig, prepare_start

    clip, bert = pretrained_clip(tmp_path / "clip"), pretrained_roberta(tmp_path / "roberta")
    prepare_start(
        tmp_path / "start", StartConfig(source="towers", vision=str(tmp_path / "clip"), text=str(tmp_path / "roberta"))
    )
    _, state = _loop(prepared_dir, tmp_path, init_dir=str(tmp_path / "start"), stage=1, epochs=1, lr=1e-3)
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


def test_training_is_tracked_as_one_parent_run_with_a_run_per_stage(trained):
    from mlflow import MlflowClient

    ids = trained["stage1"]["mlflow"]
    assert trained["stage2"]["mlflow"]["parent_run_id"] == ids["parent_run_id"]
    client = MlflowClient(ids["tracking_uri"])
    runs = client.search_runs([ids["experiment_id"]])
    assert len(runs) == 3, "one parent and one run per stage; no other rank created runs"
    stages = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == ids["parent_run_id"]]
    assert sorted(r.data.tags["zhclip.stage"] for r in stages) == ["1", "2"]
    for run in stages:
        assert run.info.status == "FINISHED"
        assert run.data.tags["data_dvc_hash"].endswith(".dir") and run.data.tags["git_commit"] != "unknown"
        assert run.data.params["batch_size"] == "32" and run.data.params["accum_steps"] == "1"
        losses = client.get_metric_history(run.info.run_id, "loss")
        assert [m.step for m in losses] == list(range(1, 13))
        for name in ("lr", "logit_scale", "samples_per_s", "data_wait_s"):
            assert len(client.get_metric_history(run.info.run_id, name)) == 12, name
        recall = client.get_metric_history(run.info.run_id, "valid_mean_recall")
        assert [m.step for m in recall] == [6, 12] and all(0 <= m.value <= 100 for m in recall)
        assert client.get_metric_history(run.info.run_id, "valid_inbatch_accuracy")
        best = trained[f"stage{run.data.tags['zhclip.stage']}"]["best_valid_mean_recall"]
        assert best == max(m.value for m in recall)


def test_summary_says_where_the_checkpoint_is_and_how_fast_it_ran(trained):
    summary = trained["stage2"]
    assert summary["steps"] == 12 and summary["resumed_at_steps"] == []
    assert summary["checkpoint"].startswith(str(trained["root"] / "ray")) and summary["samples_per_s"] > 0
    assert 0 <= summary["data_wait_share"] < 1
    assert not (trained["root"] / "stage2" / "training_state.pt").exists(), "the model folder has no optimizer state"


def test_speed_switches_keep_the_loss_trajectory(prepared_dir, tmp_path):
    model, processor = build_model("tiny")
    model.config.text_config.hidden_dropout_prob = model.config.text_config.attention_probs_dropout_prob = 0.0
    save_model(model, processor, tmp_path / "no-dropout")  # dropout draws differ between attention kernels
    start = str(tmp_path / "no-dropout")
    plain, _ = _loop(prepared_dir, tmp_path, init_dir=start, stage=2, max_steps=4, lr=1e-3)
    fast, state = _loop(
        prepared_dir,
        tmp_path,
        init_dir=start,
        stage=2,
        max_steps=4,
        lr=1e-3,
        fused_qkv=True,
        padding_free=True,
        channels_last=True,
    )
    assert [h["loss"] for h in fast] == pytest.approx([h["loss"] for h in plain], abs=1e-4)
    assert "text_model.encoder.layer.0.attention.self.query.weight" in state, "saved in the standard layout"


def test_decoding_processes_and_augmentation_keep_the_run_reproducible(prepared_dir, tmp_path):
    """Augmentation draws per pair from (seed, epoch, pair), so loader processes change nothing."""
    inline, _ = _loop(prepared_dir, tmp_path, stage=2, max_steps=3, augment=True, loader_workers=0)
    parallel, _ = _loop(prepared_dir, tmp_path, stage=2, max_steps=3, augment=True, loader_workers=2)
    eight_bit, _ = _loop(
        prepared_dir, tmp_path, stage=2, max_steps=3, augment=True, loader_workers=2, normalize_on_device=True
    )
    plain, _ = _loop(prepared_dir, tmp_path, stage=2, max_steps=3, augment=False)
    assert [h["loss"] for h in parallel] == pytest.approx([h["loss"] for h in inline], abs=1e-6)
    assert [h["loss"] for h in eight_bit] == pytest.approx([h["loss"] for h in inline], abs=1e-6)
    assert [h["loss"] for h in plain] != pytest.approx([h["loss"] for h in inline], abs=1e-6)


def test_jpegs_decoded_on_the_device_train_as_the_loaders_pixels(raw_dir, tmp_path, monkeypatch):
    """train.decode_on_device through the training loop, on JPEG shards: the losses of the 8-bit
    loader path within the one-level difference of the two resizes (torchvision is not installable
    here: PIL stands in for its decoder, which the reference environment checks against PIL)."""
    from builders import pil_decode_jpegs

    from zhclip.components.data.ingest import IngestConfig, ingest

    ingest(raw_dir, tmp_path / "jpeg", IngestConfig(shard_rows=50, image_format="JPEG"))
    monkeypatch.setattr("zhclip.components.training.config.torchvision_installed", lambda: True)
    decoded = []
    monkeypatch.setattr(
        "zhclip.components.training.batch_decoder.decode_jpegs",
        lambda encoded, boxes, device: decoded.append(len(encoded)) or pil_decode_jpegs(encoded, boxes, device),
    )
    loaders, _ = _loop(
        tmp_path / "jpeg", tmp_path, stage=2, max_steps=3, augment=True, loader_workers=2, normalize_on_device=True
    )
    on_device, _ = _loop(
        tmp_path / "jpeg", tmp_path, stage=2, max_steps=3, augment=True, loader_workers=2, decode_on_device=True
    )
    assert decoded == [32, 32, 32], "every image of every batch decoded on the device"
    assert [h["pairs"] for h in on_device] == [h["pairs"] for h in loaders]
    assert [h["loss"] for h in on_device] == pytest.approx([h["loss"] for h in loaders], abs=2e-3)


def test_compile_mode_reaches_torch_compile(prepared_dir, tmp_path, monkeypatch):
    """train.compile_mode goes to torch.compile with the scope (compiled here without it: CPU autotuning is slow)."""
    import zhclip.components.training.loop as train_module

    seen = {}
    real = train_module.apply_speedups

    def recording(model, **switches):
        seen.update(switches)
        return real(model, **{**switches, "compile_scope": "none", "compile_options": None})

    monkeypatch.setattr(train_module, "apply_speedups", recording)
    _loop(prepared_dir, tmp_path, stage=2, max_steps=1, compile="regional", compile_mode="max-autotune-no-cudagraphs")
    assert (seen["compile_scope"], seen["compile_options"]) == ("regional", {"mode": "max-autotune-no-cudagraphs"})


def test_config_rejects_settings_that_cannot_work():
    with pytest.raises(ValueError, match="accum_steps=3"):
        TrainConfig(batch_size=32, accum_steps=3)
    with pytest.raises(ValueError, match="needs a ViT preset"):
        TrainConfig(preset="tiny-rn", mask_ratio=0.5)
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match="compile"):
        TrainConfig(compile="everything")
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        TrainConfig(compile="regional", compile_mode="fastest")
    with pytest.raises(ValueError, match="needs compile: regional or model"):
        TrainConfig(compile_mode="reduce-overhead")
    with pytest.raises(ValueError, match="needs fused_qkv"):
        TrainConfig(sdpa_backend="flash")
    with pytest.raises(ValueError, match="padding_free needs fused_qkv"):
        TrainConfig(padding_free=True)


# The fine-tuning switches under DDP: SigLIP (its bias a parameter DDP averages), false-negative
# keys gathered across workers, LoRA on the text tower.
SWITCHES = {"loss": "siglip", "false_negatives": True, "lora": "text"}


@pytest.mark.slow
@pytest.mark.parametrize("switches", [{}, SWITCHES], ids=["infonce", "siglip-false-negatives-lora"])
def test_two_workers_train_with_ddp_and_the_loss_falls(prepared_dir, tmp_path, switches):
    config = TrainConfig(
        stage=1,
        epochs=12,
        batch_size=16,
        lr=2e-3,
        warmup_steps=2,
        num_workers=2,
        cpus_per_worker=1,
        storage_path=str(tmp_path / "ray"),
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        **switches,
    )
    summary = train(prepared_dir, tmp_path / "out", config, history_csv=tmp_path / "history.csv")
    with open(tmp_path / "history.csv") as rows:
        losses = [float(r["loss"]) for r in csv.DictReader(rows)]
    per_epoch = (192 // 2) // 16
    assert summary["steps"] == len(losses) == 12 * per_epoch
    first, last = sum(losses[:per_epoch]) / per_epoch, sum(losses[-per_epoch:]) / per_epoch
    assert last < first - 0.1, f"mean epoch loss did not fall with 2 workers: {first:.3f} -> {last:.3f}"
    assert summary["captions_seen"] == 12 * per_epoch * 16 * 2  # both workers' captions, summed
    weights = load_file(f"{tmp_path / 'out'}/model.safetensors")
    assert "logit_bias" not in weights and not any("lora_" in key for key in weights)  # a plain folder
    if switches:
        assert summary["trainable_params"] < 0.2 * sum(tensor.numel() for tensor in weights.values())


def test_random_resized_crop_keeps_90_to_100_percent_of_the_image():
    import random

    from PIL import Image

    from zhclip.components.training.batch_decoder import random_resized_crop

    image = Image.new("RGB", (200, 160))
    areas = [c.size[0] * c.size[1] / 32000 for c in (random_resized_crop(image, random.Random(i)) for i in range(200))]
    assert min(areas) >= 0.88 and max(areas) <= 1.0 and len(set(areas)) > 20
    assert random_resized_crop(Image.new("RGB", (400, 100)), random.Random(0)).size == (133, 100), "centre crop at 4:3"


@pytest.mark.parametrize("augment", [False, True])
def test_eight_bit_loading_normalised_on_the_device_gives_the_processors_pixels(prepared_dir, augment):
    from zhclip.components.data.shards import PreparedSplit
    from zhclip.components.training.batch_decoder import BatchDecoder
    from zhclip.components.training.epoch_plan import EpochPlan, Window, read_window

    plan = EpochPlan(PreparedSplit.open(str(prepared_dir), "train"), batch_size=6, rank=0, world_size=1, seed=0)
    window = read_window(plan, Window(epoch=1, index=0, skip=0, take=6))
    rows = {name: window.column(name).to_numpy(zero_copy_only=False) for name in window.column_names}
    _, processor = build_model("tiny")
    float_pixels = BatchDecoder(processor, 52, augment=augment)(rows)
    eight_bit = BatchDecoder(processor, 52, augment=augment, eight_bit=True)
    batch = eight_bit(rows)
    assert batch["pixel_values"].dtype == np.uint8 and batch["pixel_values"].shape == (6, 3, 32, 32)
    got = eight_bit.to_device(batch, torch.device("cpu"))
    torch.testing.assert_close(got["pixel_values"], torch.from_numpy(float_pixels["pixel_values"]), atol=1e-6, rtol=0)
    assert torch.equal(got["input_ids"], torch.from_numpy(float_pixels["input_ids"]))


def test_evaluation_is_logged_into_the_run_that_trained_the_model(trained, prepared_dir):
    from mlflow import MlflowClient

    from zhclip.components.evaluation.evaluate import EvaluateConfig, evaluate

    scores = evaluate(trained["root"] / "stage2", prepared_dir, EvaluateConfig())
    ids = trained["stage2"]["mlflow"]
    logged = MlflowClient(ids["tracking_uri"]).get_run(ids["run_id"]).data.metrics
    assert logged["mean_recall"] == scores["mean_recall"]


def test_validation_recall_is_the_evaluate_steps_recall_on_the_valid_split(prepared_dir, tmp_path):
    from zhclip.components.evaluation.evaluate import EvaluateConfig, evaluate
    from zhclip.components.training.loop import validation_metrics

    model, processor = build_model("tiny", seed=3)
    save_model(model, processor, tmp_path / "model")
    scores = validation_metrics(model, processor, str(prepared_dir), batch_size=16)
    evaluated = evaluate(tmp_path / "model", prepared_dir, EvaluateConfig(split="valid", batch_size=16))
    assert scores["valid_mean_recall"] == pytest.approx(evaluated["mean_recall"], abs=1e-3)
    assert 0 <= scores["valid_inbatch_accuracy"] <= 100


def test_training_warnings_name_the_known_failures_and_the_sweep():
    from zhclip.components.training.runner import training_warnings

    falling = [{"loss": 4.0 - i * 0.1} for i in range(20)]
    flat = [{"loss": 4.0} for _ in range(20)]
    improved = [{"step": 0, "valid_mean_recall": 30.0}, {"step": 20, "valid_mean_recall": 40.0}]
    worse = [{"step": 0, "valid_mean_recall": 30.0}, {"step": 20, "valid_mean_recall": 25.0}]
    assert training_warnings(falling, improved, 2) == []
    (loss,) = training_warnings(flat, improved, 2)
    assert "stage 2: the loss has not fallen (4.0000" in loss and "dvc exp run --queue -S 'stage2.lr=" in loss
    (below,) = training_warnings(falling, worse, 1)
    assert "ended below its start (valid mean recall 30.00 at step 0, 25.00 at the end)" in below
    assert "learning rate" in below and "warm-up" in below and "batch" in below
    assert training_warnings(falling, [{"step": 20, "valid_mean_recall": 1.0}], 1) == []  # resumed: no start measured


def test_a_stage_that_does_not_learn_says_so_in_its_summary_and_mlflow_run(prepared_dir, trained, tmp_path):
    from mlflow import MlflowClient

    assert trained["stage1"]["start_valid_mean_recall"] is not None  # the start is measured before the first step
    config = TrainConfig(
        stage=2,
        lr=1e-9,
        epochs=1,
        batch_size=32,
        warmup_steps=0,
        storage_path=str(tmp_path / "ray"),
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )
    summary = train(prepared_dir, tmp_path / "stuck", config, init_dir=trained["root"] / "stage2")
    assert any("the loss has not fallen" in warning for warning in summary["warnings"]), summary["warnings"]
    run = MlflowClient(config.tracking_uri).get_run(summary["mlflow"]["run_id"])
    assert "the loss has not fallen" in run.data.tags["zhclip.warnings"]
    assert run.data.tags["mlflow.note.content"].startswith("**Warning:** stage 2: the loss has not fallen")
