"""The starting point: scratch, pretrained towers or a released checkpoint, the demo's own pretrained
towers, and a fine-tuning run from a converted reference checkpoint through `dvc repro`."""

import json

import pytest
import torch
from safetensors.torch import load_file

from zhclip.components.core.errors import ZhclipError
from zhclip.components.core.settings import config_from
from zhclip.components.training.start import StartConfig, prepare_start
from zhclip.model import build_model

from conftest import copy_of, run_tool, update_params


def test_scratch_start_is_the_seeded_random_model(tmp_path):
    summary = prepare_start(tmp_path / "start", StartConfig(source="scratch", seed=3), tmp_path / "start.json")
    expected, _ = build_model("tiny", seed=3)
    weights = load_file(tmp_path / "start" / "model.safetensors")
    assert all(torch.equal(weights[name], tensor) for name, tensor in expected.state_dict().items() if name in weights)
    assert summary["weights"] == {} and json.loads((tmp_path / "start.json").read_text())["source"] == "scratch"


def test_towers_start_carries_both_pretrained_towers(tmp_path):
    from builders import pretrained_clip, pretrained_roberta

    clip, bert = pretrained_clip(tmp_path / "clip"), pretrained_roberta(tmp_path / "roberta")
    config = StartConfig(source="towers", vision=str(tmp_path / "clip"), text=str(tmp_path / "roberta"))
    summary = prepare_start(tmp_path / "start", config)
    weights = load_file(tmp_path / "start" / "model.safetensors")
    torch.testing.assert_close(
        weights["vision_model.encoder.layers.1.mlp.fc2.weight"],
        clip.state_dict()["vision_model.encoder.layers.1.mlp.fc2.weight"],
    )
    torch.testing.assert_close(
        weights["text_model.encoder.layer.0.attention.self.query.weight"],
        bert.state_dict()["bert.encoder.layer.0.attention.self.query.weight"],
    )
    assert summary["weights_dvc_hash"]["vision"].endswith(".dir") and summary["tensors_loaded"]["text"] > 0


def test_checkpoint_start_converts_a_reference_pt_or_copies_a_model_folder(tmp_path, tiny_models):
    from builders import reference_model, save_as_released

    reference = reference_model()
    save_as_released(reference, tmp_path / "ref.pt")
    summary = prepare_start(tmp_path / "start", StartConfig(source="checkpoint", checkpoint=str(tmp_path / "ref.pt")))
    assert summary["converted"] and summary["projection_dim"] == 32
    weights = load_file(tmp_path / "start" / "model.safetensors")
    torch.testing.assert_close(weights["text_projection.weight"], reference.state_dict()["text_projection"].T)

    copied = prepare_start(tmp_path / "copy", StartConfig(source="checkpoint", checkpoint=str(tiny_models[1])))
    assert not copied["converted"]
    original = load_file(tiny_models[1] / "model.safetensors")
    assert all(torch.equal(load_file(tmp_path / "copy" / "model.safetensors")[k], v) for k, v in original.items())


@pytest.mark.parametrize(
    "values, message",
    [
        ({"source": "pretrained"}, "source must be one of"),
        ({"source": "towers"}, "needs start.vision"),
        ({"source": "checkpoint"}, "needs start.checkpoint"),
        ({"stages": {"stage1": "start"}}, "is not a recipe zhclip runs"),
    ],
)
def test_bad_start_settings_are_refused_by_name(values, message):
    with pytest.raises(ZhclipError, match=message):
        config_from(StartConfig, {"start": values}, "start")


def test_missing_starting_weights_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(ZhclipError, match=r"weights/nope.pt not found; `dvc add` or `dvc import`"):
        prepare_start(tmp_path / "start", StartConfig(source="checkpoint", checkpoint="weights/nope.pt"))


def test_demo_towers_learn_and_load_as_the_start(raw_dir, tmp_path):
    from transformers import BertForMaskedLM, CLIPModel

    from zhclip.components.demo.data import DemoDataConfig, generate_demo_data
    from zhclip.components.demo.towers import DemoTowersConfig, pretrain_demo_towers

    generate_demo_data(
        tmp_path / "raw",
        DemoDataConfig(
            train_images=20,
            valid_images=2,
            test_images=2,
            train_digits=20,
            valid_digits=0,
            test_digits=0,
            zeroshot_per_class=1,
            pretrain_images=60,
        ),
    )
    summary = pretrain_demo_towers(
        tmp_path / "raw" / "pretrain",
        tmp_path / "weights",
        DemoTowersConfig(clip_steps=60, mlm_steps=60, batch_size=32, lr=2e-3),
    )
    for tower in ("vision", "text"):
        assert summary[tower]["final_loss"] < 0.9 * summary[tower]["first_loss"], summary[tower]
    assert isinstance(CLIPModel.from_pretrained(tmp_path / "weights" / "vision"), CLIPModel)
    assert BertForMaskedLM.from_pretrained(tmp_path / "weights" / "text").config.vocab_size == 21128
    started = prepare_start(
        tmp_path / "start",
        StartConfig(
            source="towers", vision=str(tmp_path / "weights" / "vision"), text=str(tmp_path / "weights" / "text")
        ),
    )
    assert started["tensors_loaded"]["vision"] > 0 and started["tensors_loaded"]["text"] > 0


@pytest.mark.slow
def test_fine_tuning_a_converted_reference_checkpoint_through_dvc_repro(small_project, tmp_path):
    """stages {stage2: start}: no stage 1, the converted checkpoint evaluated as the baseline, the gain and
    the gate's decision in `dvc metrics show` and in MLflow. An existing project switches to it: only
    what depends on the start re-runs, as far as the registration (the zero-shot and index stages after
    it are the small project's)."""
    from builders import reference_model, save_as_released
    from mlflow import MlflowClient

    project = copy_of(small_project, tmp_path)
    (project / "weights" / "released").mkdir(parents=True)
    save_as_released(reference_model(), project / "weights" / "released" / "clip_cn_tiny.pt")
    update_params(
        project,
        {
            "start": {
                "source": "checkpoint",
                "checkpoint": "weights/released/clip_cn_tiny.pt",
                "stages": {"stage2": "start"},
            },
            "stage2": {"epochs": 2},
            "train": {"warmup_steps": 2},
            "register": {"model_name": "zhclip-finetuned"},  # a model of its own: its first version
        },
    )
    run_tool("dvc", "add", "weights/released/clip_cn_tiny.pt", cwd=project)
    out = run_tool("dvc", "repro", "register", cwd=project, timeout=1200)
    assert "Running stage 'train@stage2'" in out and "train@stage1" not in out
    assert not any(f"Running stage '{stage}'" in out for stage in ("demo_data", "ingest", "validate", "demo_towers"))

    final = json.loads((project / "metrics" / "evaluate_stage2.json").read_text())
    start = json.loads((project / "metrics" / "evaluate_start.json").read_text())
    assert [entry["model"] for entry in final["chain"]] == ["start", "stage2"]
    assert final["gain_over_start"] == pytest.approx(final["mean_recall"] - start["mean_recall"], abs=1e-3)
    assert json.loads((project / "metrics" / "start.json").read_text())["converted"]

    shown = json.loads(run_tool("dvc", "metrics", "show", "--json", cwd=project))
    metrics = next(iter(shown.values()))["data"]
    assert metrics["metrics/evaluate_start.json"]["data"]["mean_recall"] == start["mean_recall"]
    assert metrics["metrics/evaluate_stage2.json"]["data"]["gain_over_start"] == final["gain_over_start"]
    registered = json.loads((project / "metrics" / "register.json").read_text())
    assert metrics["metrics/register.json"]["data"]["start_value"] == start["mean_recall"]
    assert registered["promoted"] == (final["gain_over_start"] >= 0)
    assert registered["rule"] == ("first" if registered["promoted"] else "start")

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    version = client.get_model_version("zhclip-finetuned", str(registered["version"]))
    assert version.tags["promotion.rule"] == registered["rule"]
    assert float(version.tags["promotion.start_value"]) == start["mean_recall"]
    assert "| start |" in version.description and "| stage2 |" in version.description
    logged = client.get_run(version.run_id).data.metrics
    assert logged["start.mean_recall"] == start["mean_recall"] and logged["gain_over_start"] == final["gain_over_start"]
