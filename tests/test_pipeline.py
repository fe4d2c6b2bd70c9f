"""The Kubeflow pipeline: compiles to valid v2 YAML with params.yaml defaults, and runs with kfp.local."""

import json

import pytest
import yaml
from mlflow import MlflowClient

from components.common import load_params
from workflows.pipeline import compile_pipeline, run_local, step_configs


def test_compiled_pipeline_chains_the_steps_with_params_defaults(tmp_path):
    params = load_params("params.yaml")
    spec = yaml.safe_load(compile_pipeline(tmp_path / "pipeline.yaml", params).read_text())
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"importer", "ingest-op", "validate-op", "train-op", "train-op-2", "evaluate-op", "register-op"}
    assert tasks["train-op"]["inputs"]["artifacts"]["prepared"]["taskOutputArtifact"] == {
        "outputArtifactKey": "validated", "producerTask": "validate-op"}
    assert tasks["train-op-2"]["inputs"]["artifacts"]["init_model"]["taskOutputArtifact"]["producerTask"] == "train-op"
    assert tasks["register-op"]["inputs"]["artifacts"]["scores"]["taskOutputArtifact"]["producerTask"] == "evaluate-op"
    defaults = {name: p.get("defaultValue") for name, p in spec["root"]["inputDefinitions"]["parameters"].items()}
    assert defaults["stage1_config"]["lr"] == params["stage1"]["lr"]
    assert defaults["stage2_config"]["epochs"] == params["stage2"]["epochs"]
    assert defaults["register_config"]["model_name"] == params["register"]["model_name"]
    assert spec["deploymentSpec"]["executors"]["exec-train-op"]["container"]["image"]
    evaluate_outputs = spec["components"]["comp-evaluate-op"]["outputDefinitions"]["artifacts"]
    assert evaluate_outputs["report"]["artifactType"]["schemaTitle"] == "system.HTML"
    assert evaluate_outputs["summary"]["artifactType"]["schemaTitle"] == "system.Markdown"


@pytest.mark.slow
def test_pipeline_runs_locally_end_to_end(raw_dir, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = {"stage1": {"epochs": 1}, "stage2": {"epochs": 1}, "train": {"batch_size": 32, "storage_path": str(tmp_path / "ray")},
              "register": {"tracking_uri": uri, "model_name": "zhclip-kfp"}}
    outputs = run_local(raw_dir, tmp_path / "root", params)
    assert set(outputs["scores"]) >= {"t2i_r1", "i2t_r10", "mean_recall", "chance_mean_recall"}
    assert outputs["register"] == {"version": 1, "champion_version": 1}
    client = MlflowClient(uri, uri)
    version = client.get_model_version_by_alias("zhclip-kfp", "champion")
    assert float(version.tags["mean_recall"]) == outputs["scores"]["mean_recall"]
    assert json.loads(next((tmp_path / "root").glob("zhclip-*/evaluate-op/scores")).read_text())["texts"] == 48
    html = next((tmp_path / "root").glob("zhclip-*/evaluate-op/report")).read_text(encoding="utf-8")
    assert "<table" in html and "data:image/png;base64," in html


def test_step_configs_are_plain_json():
    configs = step_configs(load_params("params.yaml"))
    assert json.loads(json.dumps(configs)) == configs
