"""Registry: versions, the champion gate, and pulls in a process that has never seen the repo."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mlflow import MlflowClient

from components.common import ZhclipError
from components.register import RegisterConfig, register


@pytest.fixture
def registry(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    yield RegisterConfig(model_name="zhclip-test", tracking_uri=uri)


def _metrics(tmp_path, name, mean_recall):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"mean_recall": mean_recall, "t2i_r1": 1.0, "split": "test"}))
    return path


def test_champion_moves_only_to_a_model_that_is_no_worse(trained, registry, tmp_path):
    model_dir = trained["root"] / "stage2"
    first = register(model_dir, _metrics(tmp_path, "a", 40.0), registry, {"train": {"lr": 0.1}}, tmp_path / "r1.json",
                     step_summaries=[trained["root"] / "stage1.json"])
    worse = register(model_dir, _metrics(tmp_path, "b", 30.0), registry)
    better = register(model_dir, _metrics(tmp_path, "c", 45.0), registry)
    client = MlflowClient(registry.tracking_uri, registry.tracking_uri)
    assert (first["version"], worse["version"], better["version"]) == (1, 2, 3)
    assert first["promoted"] and not worse["promoted"] and better["promoted"]
    assert worse["previous_champion_value"] == 40.0 and worse["champion_version"] == 1
    assert int(client.get_model_version_by_alias("zhclip-test", "champion").version) == 3
    assert int(client.get_model_version_by_alias("zhclip-test", "challenger").version) == 3
    assert len(client.search_model_versions("name='zhclip-test'")) == 3
    assert "kept current champion: 30.0 vs champion 40.0" in client.get_model_version("zhclip-test", "2").tags["promotion"]
    run = client.get_run(first["run_id"])
    assert run.data.metrics["mean_recall"] == 40.0 and run.data.params["train.lr"] == "0.1"
    assert [a.path for a in client.list_artifacts(first["run_id"], "step_summaries")] == ["step_summaries/stage1.json"]
    assert json.loads((tmp_path / "r1.json").read_text())["version"] == 1


def test_register_rejects_missing_metric_and_non_model(trained, registry, tmp_path):
    bad = tmp_path / "m.json"
    bad.write_text(json.dumps({"recall": 1.0}))
    with pytest.raises(ZhclipError, match="no metric 'mean_recall'"):
        register(trained["root"] / "stage2", bad, registry)
    with pytest.raises(ZhclipError, match="not a trained model folder"):
        register(tmp_path, bad, registry)


REPO = Path(__file__).resolve().parents[1]
PULL = textwrap.dedent("""
    import base64, io, json, sys
    import mlflow, numpy as np, pandas as pd
    from PIL import Image
    assert "{repo}" not in sys.path, sys.path
    model = mlflow.pyfunc.load_model("models:/zhclip-test@champion")
    texts = model.predict(pd.DataFrame({{"text": ["红色的圆形在左上角", "蓝色十字在右下角"]}}))
    buffer = io.BytesIO(); Image.new("RGB", (64, 64), "red").save(buffer, format="PNG")
    images = model.predict(pd.DataFrame({{"image": [buffer.getvalue(), base64.b64encode(buffer.getvalue()).decode()]}}))
    code = sys.modules["model"].__file__
    print(json.dumps({{"texts": np.asarray(texts).tolist(), "images": np.asarray(images).tolist(), "code": code}}))
""")


def test_champion_pull_in_a_fresh_process_outside_the_repo(trained, registry, tmp_path):
    register(trained["root"] / "stage2", _metrics(tmp_path, "a", 40.0), registry)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", PULL.format(repo=REPO)], cwd=outside, capture_output=True, text=True,
                            timeout=300, env={**env, "MLFLOW_TRACKING_URI": registry.tracking_uri})
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    import numpy as np

    texts, images = np.array(out["texts"]), np.array(out["images"])
    assert texts.shape == (2, 64) and images.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(images[0], images[1], atol=1e-6)  # raw bytes and base64 agree
    assert not out["code"].startswith(str(REPO / "model")), "the model code must come from the MLflow artifact"
