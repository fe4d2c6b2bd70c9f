"""Registry: versions, lineage, the champion gate, and pulls that agree in a fresh process, over REST
and from the command line."""

import base64
import io
import json
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from zhclip.components.core.errors import ZhclipError
from zhclip.components.core.lineage import dvc_hash, git_commit
from zhclip.components.core.tracking import using_tracking_uri
from zhclip.components.registry.register import RegisterConfig, register

from conftest import BIN, free_port, run_cli, running

REPO = Path(__file__).resolve().parents[2]
NAME = "zhclip-test"


@pytest.fixture
def registry(tmp_path):
    yield RegisterConfig(model_name=NAME, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


def _metrics(tmp_path, name, mean_recall):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"mean_recall": mean_recall, "t2i_r1": 1.0, "split": "test"}))
    return path


def _aliases(client):
    return {alias: int(client.get_model_version_by_alias(NAME, alias).version) for alias in ("champion", "challenger")}


def test_worse_model_stays_challenger_better_one_takes_champion(tiny_models, registry, tmp_path):
    client = MlflowClient(registry.tracking_uri, registry.tracking_uri)
    first = register(tiny_models[0], _metrics(tmp_path, "a", 40.0), registry)
    assert first["promoted"] and _aliases(client) == {"champion": 1, "challenger": 1}

    worse = register(tiny_models[1], _metrics(tmp_path, "b", 30.0), registry)
    assert (worse["version"], worse["promoted"], worse["champion_version"]) == (2, False, 1)
    assert _aliases(client) == {"champion": 1, "challenger": 2}
    tags = client.get_model_version(NAME, "2").tags
    assert tags["promotion"] == "kept current champion: mean_recall 30.0 vs champion version 1 40.0 (tolerance 0.0)"
    assert tags["promotion.rule"] == "champion" and tags["promotion.start_value"] == "None"  # no start evaluated
    assert (tags["promotion.candidate_value"], tags["promotion.champion_value"]) == ("30.0", "40.0")

    better = register(tiny_models[2], _metrics(tmp_path, "c", 45.0), registry)
    assert (better["version"], better["promoted"], better["previous_champion_version"]) == (3, True, 1)
    assert _aliases(client) == {"champion": 3, "challenger": 3}
    assert len(client.search_model_versions(f"name='{NAME}'")) == 3


def _metrics_with_start(tmp_path, name, mean_recall, start):
    """An evaluation summary of a trained model whose chain starts at a model scoring `start`."""
    chain = [{"model": "start", "mean_recall": start}, {"model": "stage2", "mean_recall": mean_recall}]
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"mean_recall": mean_recall, "gain_over_start": mean_recall - start, "chain": chain}))
    return path


def test_a_model_worse_than_its_start_is_registered_but_never_promoted(tiny_models, registry, tmp_path):
    client = MlflowClient(registry.tracking_uri, registry.tracking_uri)
    worse = register(tiny_models[0], _metrics_with_start(tmp_path, "a", 30.0, start=35.0), registry)
    assert (worse["version"], worse["promoted"], worse["rule"], worse["champion_version"]) == (1, False, "start", None)
    model = client.get_registered_model(NAME)
    assert {k: int(v) for k, v in model.aliases.items()} == {
        "challenger": 1
    }  # registered, but no champion: it is worse than where it started
    tags = client.get_model_version(NAME, "1").tags
    assert tags["promotion.rule"] == "start" and tags["promotion.start_value"] == "35.0"
    assert "below its own start 35.0" in tags["promotion"]
    card = client.get_model_version(NAME, "1").description
    assert "| start | 35.0 |" in card and "| stage2 | 30.0 | -5.00 |" in card and "rule: start" in card

    better = register(tiny_models[1], _metrics_with_start(tmp_path, "b", 36.0, start=35.0), registry)
    assert (better["promoted"], better["rule"], better["champion_version"]) == (True, "first", 2)
    assert _aliases(client) == {"champion": 2, "challenger": 2}

    # Better than the champion but not by the required gain over its own start: the start rule decides.
    registry.min_gain_over_start = 5.0
    short = register(tiny_models[2], _metrics_with_start(tmp_path, "c", 38.0, start=35.0), registry)
    assert (short["promoted"], short["rule"]) == (False, "start")
    assert _aliases(client) == {"champion": 2, "challenger": 3}


def test_tolerance_lets_a_slightly_worse_model_through(tiny_models, registry, tmp_path):
    register(tiny_models[0], _metrics(tmp_path, "a", 40.0), registry)
    registry.tolerance = 0.5
    assert register(tiny_models[1], _metrics(tmp_path, "b", 39.6), registry)["promoted"]
    assert not register(tiny_models[2], _metrics(tmp_path, "c", 39.0), registry)["promoted"]


def test_a_champion_without_the_gate_metric_keeps_its_alias(tiny_models, registry, tmp_path):
    register(tiny_models[0], _metrics(tmp_path, "a", 40.0), registry)
    registry.metric = "i2t_r1"  # the first champion's run never recorded it
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"i2t_r1": 90.0}))
    result = register(tiny_models[1], other, registry)
    assert not result["promoted"] and "version 1 has no i2t_r1 to compare" in result["decision"]
    assert _aliases(MlflowClient(registry.tracking_uri, registry.tracking_uri)) == {"champion": 1, "challenger": 2}


def test_lineage_tags_and_the_run(tiny_models, registry, tmp_path):
    data = tmp_path / "validated"
    (data / "train").mkdir(parents=True)
    (data / "train" / "part-00000.parquet").write_bytes(b"pairs")
    client = MlflowClient(registry.tracking_uri, registry.tracking_uri)
    experiment = client.create_experiment(registry.experiment)
    parent = client.create_run(experiment, run_name="pipeline").info.run_id  # as training leaves it
    train_summary = tmp_path / "train_stage2.json"
    train_summary.write_text(
        json.dumps(
            {
                "stage": 2,
                "mlflow": {
                    "tracking_uri": registry.tracking_uri,
                    "experiment_id": experiment,
                    "parent_run_id": parent,
                    "run_id": "r456",
                },
            }
        )
    )
    stage1_summary = tmp_path / "train_stage1.json"
    stage1_summary.write_text(json.dumps({"stage": 1}))  # older summaries carry no mlflow section
    params = {"train": {"lr": 0.1}, "register": {"metric": "mean_recall"}}
    summary = register(
        tiny_models[0],
        _metrics(tmp_path, "a", 40.0),
        registry,
        params,
        tmp_path / "register.json",
        step_summaries=[stage1_summary],
        train_summary=train_summary,
        data_dir=data,
    )
    version = client.get_model_version(NAME, "1")
    assert version.run_id == summary["run_id"]
    tags = version.tags
    assert tags["git_commit"] == git_commit() and len(tags["git_commit"]) >= 40
    assert tags["model_dvc_hash"] == dvc_hash(tiny_models[0]) and tags["data_dvc_hash"] == dvc_hash(data)
    assert json.loads(tags["params"]) == params
    assert (tags["metric.mean_recall"], tags["metric.t2i_r1"]) == ("40.0", "1.0")
    assert (tags["training_parent_run_id"], tags["training_run_id"]) == (parent, "r456")
    run = client.get_run(summary["run_id"])
    assert run.data.metrics["mean_recall"] == 40.0 and run.data.params["train.lr"] == "0.1"
    assert run.data.tags["training_parent_run_id"] == run.data.tags["mlflow.parentRunId"] == parent
    assert sorted(a.path for a in client.list_artifacts(summary["run_id"], "step_summaries")) == [
        "step_summaries/train_stage1.json",
        "step_summaries/train_stage2.json",
    ]
    assert json.loads((tmp_path / "register.json").read_text())["lineage"]["data_dvc_hash"] == dvc_hash(data)
    # MLflow resolves a run's logged-model artifacts through the global tracking URI, not the client's.
    with using_tracking_uri(registry.tracking_uri):
        requirements = Path(
            client.download_artifacts(summary["run_id"], "model/requirements.txt", str(tmp_path))
        ).read_text()
    assert "torch==" in requirements and "+cpu" not in requirements
    assert "onnxruntime==" in requirements and "onnxscript==" in requirements  # for the onnx backend


def test_the_same_checkpoint_registers_once(tiny_models, registry, tmp_path):
    first = register(tiny_models[0], _metrics(tmp_path, "a", 40.0), registry)
    again = register(tiny_models[0], _metrics(tmp_path, "a", 40.0), registry)
    client = MlflowClient(registry.tracking_uri, registry.tracking_uri)
    assert (again["version"], again["run_id"], again["already_registered"]) == (1, first["run_id"], True)
    assert again["champion_version"] == 1
    assert len(client.search_model_versions(f"name='{NAME}'")) == 1
    assert len(client.search_runs([client.get_experiment_by_name(registry.experiment).experiment_id])) == 1
    assert again["promoted"] is False and again["candidate_value"] == 40.0


def test_registering_leaves_no_tracking_uri_behind(tiny_models, registry, tmp_path):
    """MLflow exports its tracking URI to the environment; register must not leak it to later work."""
    import mlflow

    register(tiny_models[0], _metrics(tmp_path, "a", 40.0), registry)
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    assert mlflow.get_tracking_uri() != registry.tracking_uri


def test_register_rejects_missing_metric_data_and_non_model(tiny_models, registry, tmp_path):
    bad = tmp_path / "m.json"
    bad.write_text(json.dumps({"recall": 1.0}))
    with pytest.raises(ZhclipError, match="no metric 'mean_recall'"):
        register(tiny_models[0], bad, registry)
    with pytest.raises(ZhclipError, match="not a trained model folder"):
        register(tmp_path, bad, registry)
    with pytest.raises(ZhclipError, match="training data folder .*nowhere not found"):
        register(tiny_models[0], _metrics(tmp_path, "a", 40.0), registry, data_dir=tmp_path / "nowhere")


TEXTS = ["红色的圆形在左上角", "蓝色十字在右下角"]
PULL = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import mlflow, numpy as np, pandas as pd
    assert {repo!r} not in sys.path, sys.path
    model = mlflow.pyfunc.load_model("models:/{name}@champion")
    texts, images = {texts!r}, [Path(p).read_bytes() for p in {images!r}]
    frame = pd.DataFrame({{"text": texts + [None] * len(images), "image": [None] * len(texts) + images}})
    vectors = model.predict(frame)
    print(json.dumps({{"vectors": np.asarray(vectors).tolist(), "code": sys.modules["zhclip.model"].__file__}}))
""")


def _png(path: Path, colour: str) -> Path:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 48), colour).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())
    return path


def _invoke(base: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{base}/invocations", data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _rest_pull(base: str, images: list[Path]) -> np.ndarray:
    rows = [[text, None] for text in TEXTS] + [[None, base64.b64encode(p.read_bytes()).decode()] for p in images]
    status, body = _invoke(base, {"dataframe_split": {"columns": ["text", "image"], "data": rows}})
    assert status == 200, body
    return np.array(body["predictions"])


BAD_REQUESTS = {
    "non-image bytes": ({"columns": ["image"], "data": [["aGVsbG8="]]}, "row 0: column 'image': not a decodable image"),
    "bad base64": (
        {"columns": ["text", "image"], "data": [["红色", None], [None, "%%%"]]},
        "row 1: column 'image': a string but not valid base64",
    ),
    "empty text": ({"columns": ["text"], "data": [["红色"], [""]]}, "row 1: column 'text' must be a non-empty string"),
    "wrong column": ({"columns": ["caption"], "data": [["红色"]]}, "needs a 'text' and/or an 'image' column"),
}


@pytest.mark.slow
def test_python_rest_and_cli_pulls_return_the_same_embeddings(tiny_models, registry, tmp_path):
    register(tiny_models[1], _metrics(tmp_path, "a", 40.0), registry)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    images = [_png(outside / "red.png", "red"), _png(outside / "blue.png", "blue")]
    env = {
        **{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        "MLFLOW_TRACKING_URI": registry.tracking_uri,
        "PATH": f"{BIN}:{os.environ['PATH']}",
    }  # `mlflow models serve` runs uvicorn from PATH

    script = PULL.format(repo=str(REPO), name=NAME, texts=TEXTS, images=[str(p) for p in images])
    fresh = subprocess.run(
        [sys.executable, "-c", script], cwd=outside, capture_output=True, text=True, timeout=300, env=env
    )
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    out = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert not out["code"].startswith(str(REPO / "model")), "the model code must come from the MLflow artifact"
    python = np.array(out["vectors"])
    assert python.shape == (4, 64)
    np.testing.assert_allclose(np.linalg.norm(python, axis=1), 1, atol=1e-5)

    cli = run_cli(
        "embed",
        "--model",
        f"models:/{NAME}@champion",
        *sum((["--text", t] for t in TEXTS), []),
        *sum((["--image", str(p)] for p in images), []),
        cwd=outside,
        env={"MLFLOW_TRACKING_URI": registry.tracking_uri},
    )
    assert cli.returncode == 0, cli.stderr[-3000:]
    records = [json.loads(line) for line in cli.stdout.splitlines()]
    np.testing.assert_allclose(np.array([r["embedding"] for r in records[:4]]), python, atol=1e-5)

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    serve = [
        str(BIN / "mlflow"),
        "models",
        "serve",
        "-m",
        f"models:/{NAME}@champion",
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-w",
        "1",
    ]
    with running(serve, f"{base}/ping", tmp_path / "serve.log", timeout=240, cwd=outside, env=env):
        np.testing.assert_allclose(_rest_pull(base, images), python, atol=1e-5)
        for case, (frame, message) in BAD_REQUESTS.items():
            status, body = _invoke(base, {"dataframe_split": frame})
            assert status == 400 and message in body["message"], (case, status, body)
        big = io.BytesIO()
        Image.new("RGB", (6000, 5000)).save(big, format="PNG")
        status, body = _invoke(
            base, {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(big.getvalue()).decode()]]}}
        )
        assert status == 400 and "row 0: column 'image': image is 6000x5000" in body["message"], body
        np.testing.assert_allclose(_rest_pull(base, images), python, atol=1e-5)  # still serving after bad requests
        status, body = _invoke(
            base,
            {
                "dataframe_split": {
                    "columns": ["text", "image"],
                    "data": [[TEXTS[0], base64.b64encode(images[0].read_bytes()).decode()]],
                },
                "params": {"output": "similarity"},
            },
        )
        assert status == 200 and body["predictions"][0] == pytest.approx(float(python[0] @ python[2]), abs=1e-5)


def test_the_gate_lock_is_exclusive_and_a_dead_holders_lease_is_broken(tmp_path, capsys):
    from zhclip.components.registry.gate_lock import gate_lock, lock_name

    with using_tracking_uri(f"sqlite:///{tmp_path / 'locks.db'}"):
        client = MlflowClient()
        with gate_lock(client, "m", lease_s=60, wait_s=5) as owner:
            assert client.get_registered_model(lock_name("m")).tags["zhclip.lock_owner"] == owner
            with pytest.raises(ZhclipError, match=r"stayed locked for 1 s .*m\.gate-lock.*register\.lock_wait_s"):
                with gate_lock(client, "m", lease_s=60, wait_s=1):
                    pass
        assert not client.search_registered_models("name = 'm.gate-lock'")  # released
        # a registration killed while holding the lock: its lease has ended, the next one breaks it
        client.create_registered_model(
            lock_name("m"), tags={"zhclip.lock_owner": "dead-host:1:x", "zhclip.lease_ends": "0"}
        )
        with gate_lock(client, "m", lease_s=60, wait_s=5) as owner:
            assert client.get_registered_model(lock_name("m")).tags["zhclip.lock_owner"] == owner
        assert "broke the gate lock of dead-host:1:x" in capsys.readouterr().err
        assert [model.name for model in client.search_registered_models()] == []


@pytest.mark.parametrize("killed_after", ["register_model", "promotion"])
def test_a_registration_killed_inside_its_gate_is_finished_by_the_next_run(
    tiny_models, registry, tmp_path, monkeypatch, killed_after
):
    """Killed after the version exists but before the gate recorded its decision (with or without the
    champion alias moved): running it again gates that version, registers nothing twice."""
    import zhclip.components.registry.register as module

    client = MlflowClient(registry.tracking_uri, registry.tracking_uri)
    register(tiny_models[0], _metrics(tmp_path, "a", 40.0), registry)
    real_gate = module._gate

    def killed(client_, name, version, *args):
        if killed_after == "promotion":
            client_.set_registered_model_alias(name, "champion", version)
        raise KeyboardInterrupt  # as far as the registry is concerned, a SIGKILL here

    monkeypatch.setattr(module, "_gate", killed)
    with pytest.raises(KeyboardInterrupt):
        register(tiny_models[1], _metrics(tmp_path, "b", 45.0), registry)
    assert "promotion" not in client.get_model_version(NAME, "2").tags
    monkeypatch.setattr(module, "_gate", real_gate)
    again = register(tiny_models[1], _metrics(tmp_path, "b", 45.0), registry)
    assert (again["version"], again["gate_resumed"], again["promoted"]) == (2, True, True)
    assert len(client.search_model_versions(f"name='{NAME}'")) == 2
    assert _aliases(client) == {"champion": 2, "challenger": 2}
    tags = client.get_model_version(NAME, "2").tags
    assert tags["promotion.rule"] == ("champion" if killed_after == "register_model" else "resumed")
    assert again["run_id"] == client.get_model_version(NAME, "2").run_id
    runs = client.search_runs([client.get_experiment_by_name(registry.experiment).experiment_id])
    assert len(runs) == 2  # the killed registration's run is the version's; no second one logged
    assert register(tiny_models[1], _metrics(tmp_path, "b", 45.0), registry)["already_registered"]


def _suite(tmp_path, name, model, digits, demo, start=(10.0, 5.0)):
    """A suite summary as `zhclip suite` writes it: `model` and the start on a zero-shot set and a retrieval set."""
    figures = lambda top1, recall: {"digits": {"top1": top1, "top5": 100.0}, "demo-test": {"mean_recall": recall}}  # noqa: E731
    summary = {
        "preset": "tiny",
        "tasks": {"digits": "zeroshot", "demo-test": "retrieval"},
        "models": {
            "start": figures(*start) | {"suite_mean": sum(start) / 2},
            model: figures(digits, demo) | {"suite_mean": (digits + demo) / 2},
        },
        "published": {},
    }
    path = tmp_path / f"suite_{name}.json"
    path.write_text(json.dumps(summary))
    return path


def test_the_suite_gate_refuses_a_dataset_past_the_margin_even_when_the_mean_improves(tiny_models, registry, tmp_path):
    client = MlflowClient(registry.tracking_uri, registry.tracking_uri)
    names = [path.name for path in tiny_models]
    first = register(
        tiny_models[0], _metrics(tmp_path, "a", 40.0), registry, suite_path=_suite(tmp_path, "a", names[0], 80.0, 90.0)
    )
    assert first["promoted"] and [v["passed"] for v in first["suite"]] == [True, True]
    run = client.get_run(first["run_id"]).data.metrics
    assert run["benchmark/digits/top1"] == 80.0 and run["benchmark/digits/score"] == 80.0
    assert run["benchmark/demo-test/score"] == 90.0 and run["benchmark/suite_mean"] == 85.0

    # The suite's mean and the gate metric improve, but digits falls 2 points, past the 1-point margin.
    falls = register(
        tiny_models[1], _metrics(tmp_path, "b", 45.0), registry, suite_path=_suite(tmp_path, "b", names[1], 78.0, 95.0)
    )
    assert (falls["promoted"], falls["rule"], falls["champion_version"]) == (False, "suite", 1)
    assert falls["decision"] == "kept current champion: digits 78.00 is 2.00 below the champion's 80.00 (margin 1.0)"
    version = client.get_model_version(NAME, "2")
    assert version.tags["promotion.suite.digits"].startswith("fail: 78.00 is 2.00 below")
    assert version.tags["promotion.suite.demo-test"] == "pass: 95.00 (champion 90.00, margin 1.0)"
    assert "| digits | 78.00 | 80.00 | 10.00 | FAIL: 78.00 is 2.00 below" in version.description
    assert _aliases(client) == {"champion": 1, "challenger": 2}
    again = register(tiny_models[1], _metrics(tmp_path, "b", 45.0), registry)  # the same checkpoint: its record
    by_dataset = lambda verdicts: sorted(verdicts, key=lambda verdict: verdict["dataset"])  # noqa: E731
    assert again["already_registered"] and by_dataset(again["suite"]) == by_dataset(falls["suite"])

    within = register(
        tiny_models[2], _metrics(tmp_path, "c", 41.0), registry, suite_path=_suite(tmp_path, "c", names[2], 79.5, 91.0)
    )
    assert (within["promoted"], within["rule"]) == (True, "champion")
    assert (
        client.get_model_version(NAME, "3").tags["promotion.suite.digits"] == "pass: 79.50 (champion 80.00, margin 1.0)"
    )
    assert _aliases(client) == {"champion": 3, "challenger": 3}


def test_the_suite_gate_refuses_a_dataset_below_its_start(tiny_models, registry, tmp_path):
    below = register(
        tiny_models[0],
        _metrics(tmp_path, "a", 40.0),
        registry,
        suite_path=_suite(tmp_path, "a", tiny_models[0].name, 9.0, 90.0),
    )
    assert (below["promoted"], below["rule"]) == (False, "suite")
    assert below["decision"] == "kept current champion: digits 9.00 is below its start's 10.00"
    # the model's name in the suite is its evaluation's label (the pipeline's model folder is 'model')
    labelled = tmp_path / "labelled.json"
    labelled.write_text(json.dumps({"model": "stage2", "mean_recall": 40.0, "split": "test"}))
    by_label = register(tiny_models[2], labelled, registry, suite_path=_suite(tmp_path, "c", "stage2", 9.5, 90.0))
    assert by_label["decision"] == "kept current champion: digits 9.50 is below its start's 10.00"
    with pytest.raises(ZhclipError, match=r"scored \['seed0', 'start'\], not 'seed1': add it to benchmark.models"):
        register(
            tiny_models[1],
            _metrics(tmp_path, "b", 40.0),
            registry,
            suite_path=_suite(tmp_path, "b", "seed0", 9.0, 90.0),
        )


def test_a_registered_version_is_scored_on_the_suite_and_its_figures_reach_the_gate(
    tiny_models, registry, raw_dir, tmp_path
):
    """The champion, registered before the suite had `shapes`, scored on it from the registry: the next
    candidate is then compared with those figures."""
    first = register(tiny_models[0], _metrics(tmp_path, "a", 40.0), registry)
    params = tmp_path / "params.yaml"
    params.write_text(
        json.dumps(
            {
                "benchmark": {
                    "suite": [{"name": "shapes", "task": "zeroshot", "path": str(raw_dir / "zeroshot" / "shapes")}]
                },
                "mlflow": {"tracking_uri": registry.tracking_uri},
            }
        )
    )
    result = run_cli(
        "benchmark", "--model", f"models:/{NAME}@champion", "--params", str(params), "--out", str(tmp_path / "v.json")
    )
    assert result.returncode == 0, result.stderr
    scored = json.loads((tmp_path / "v.json").read_text())
    assert (scored["version"], scored["run_id"]) == (1, first["run_id"])
    client = MlflowClient(registry.tracking_uri, registry.tracking_uri)
    logged = client.get_run(first["run_id"]).data.metrics
    top1 = scored["datasets"]["shapes"]["top1"]
    assert logged["benchmark/shapes/top1"] == logged["benchmark/shapes/score"] == top1

    suite = json.loads(_suite(tmp_path, "b", tiny_models[1].name, 50.0, 50.0).read_text())
    suite["tasks"] = {"shapes": "zeroshot"}
    for model in suite["models"].values():
        model["shapes"] = {"top1": 0.0, "top5": 0.0}
    suite["models"][tiny_models[1].name]["shapes"] = {"top1": top1 - 5, "top5": 100.0}
    (tmp_path / "suite_b.json").write_text(json.dumps(suite))
    refused = register(tiny_models[1], _metrics(tmp_path, "b", 45.0), registry, suite_path=tmp_path / "suite_b.json")
    assert (refused["promoted"], refused["rule"]) == (False, "suite") and "shapes" in refused["decision"]
    missing = run_cli("benchmark", "--model", f"models:/{NAME}/9", "--params", str(params))
    assert missing.returncode == 2 and f"no registered version models:/{NAME}/9" in missing.stderr
