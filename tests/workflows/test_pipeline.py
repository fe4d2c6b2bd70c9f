"""The Kubeflow pipeline: compiles to valid v2 YAML with params.yaml defaults and Kubernetes task
settings, runs with kfp.local, and is submitted through the KFP API."""

import json
import socket
import threading
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import yaml
from google.protobuf import json_format
from kfp.kubernetes import kubernetes_executor_config_pb2
from kfp.pipeline_spec import pipeline_spec_pb2
from mlflow import MlflowClient

from zhclip.components.core.errors import ZhclipError
from zhclip.components.core.settings import load_params
from zhclip.components.core.storage import ObjectStoreConfig
from zhclip.workflows.config import pipeline_galleries, pipeline_suite, step_configs, suite_on_artifacts
from zhclip.workflows.submit import compile_pipeline

from conftest import copy_of, run_cli

TRAINING = ("train-op", "train-op-2", "train-op-3")  # two-stage branch: stage 1, stage 2; fine-tune branch: stage 2
EVALUATIONS = ("evaluate-op", "evaluate-op-2", "evaluate-op-3", "evaluate-op-4")  # the start, then each branch's
REGISTRATIONS = ("register-op", "register-op-2")
INDEXING = ("index-op", "index-op-2")  # after each branch's registration, a task per gallery (the demo has one)
BENCHMARKS = ("benchmark-op", "benchmark-op-2", "benchmark-op-3", "suite-op", "suite-op-2")  # the start, each branch's
STEPS = ("ingest-op", "validate-op", "start-op", *EVALUATIONS, *BENCHMARKS, *REGISTRATIONS, *INDEXING)
ZEROSHOT = ("zeroshot-op", "zeroshot-op-2", "zeroshot-op-3")
# log to MLflow or read MinIO: its and MinIO's credentials
TRACKED = (*TRAINING, "start-op", *EVALUATIONS, *BENCHMARKS, *ZEROSHOT, *REGISTRATIONS, *INDEXING)


def _all_tasks(spec: dict) -> dict[str, dict]:
    """Every task of the compiled pipeline, at the root or inside a branch or loop, by name."""
    tasks = dict(spec["root"]["dag"]["tasks"])
    for component in spec["components"].values():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    return tasks


def _compiled(tmp_path, params) -> tuple[pipeline_spec_pb2.PipelineSpec, dict]:
    """The compiled YAML parsed back into KFP's PipelineSpec, and each executor's Kubernetes config."""
    pipeline_doc, platform_doc = yaml.safe_load_all(compile_pipeline(tmp_path / "pipeline.yaml", params).read_text())
    spec = json_format.ParseDict(pipeline_doc, pipeline_spec_pb2.PipelineSpec())
    platform = json_format.ParseDict(platform_doc, pipeline_spec_pb2.PlatformSpec())
    executors = json_format.MessageToDict(platform.platforms["kubernetes"].deployment_spec)["executors"]
    k8s = {
        name.removeprefix("exec-"): json_format.ParseDict(
            config, kubernetes_executor_config_pb2.KubernetesExecutorConfig()
        )
        for name, config in executors.items()
    }
    return spec, k8s


def test_compiled_pipeline_chains_the_steps_with_params_defaults(tmp_path):
    params = load_params("params.yaml")
    spec = yaml.safe_load_all(compile_pipeline(tmp_path / "pipeline.yaml", params).read_text()).__next__()
    root = spec["root"]["dag"]["tasks"]
    assert set(root) == {
        "importer",
        "ingest-op",
        "validate-op",
        "start-op",
        "evaluate-op",
        "benchmark-op",
        "condition-1",
        "condition-3",
        "for-loop-5",
    }
    # start_config.stages picks the branch at run time: the start task's output names it
    for branch, name in (("condition-1", "two-stage"), ("condition-3", "fine-tune")):
        assert root[branch]["triggerPolicy"]["condition"].endswith(f"== '{name}'")
    tasks = _all_tasks(spec)

    def source(task, name):
        artifact = tasks[task]["inputs"]["artifacts"][name]
        return artifact.get("taskOutputArtifact") or {
            "producerTask": artifact["componentInputArtifact"].split("--")[1].rsplit("-", 1)[0]
        }

    assert source("train-op", "prepared")["producerTask"] == "validate-op"
    # two-stage: start -> stage 1 -> stage 2, each evaluated beside the evaluation of the model it started from
    assert source("train-op", "init_model")["producerTask"] == "start-op"
    assert source("train-op-2", "init_model")["producerTask"] == "train-op"
    assert (
        source("evaluate-op", "model")["producerTask"] == "start-op"
        and "init_scores" not in tasks["evaluate-op"]["inputs"]["artifacts"]
    )
    assert source("evaluate-op-2", "init_scores")["producerTask"] == "evaluate-op"
    assert source("evaluate-op-3", "init_scores")["producerTask"] == "evaluate-op-2"
    assert source("register-op", "scores")["producerTask"] == "evaluate-op-3"
    assert source("register-op", "model")["producerTask"] == "train-op-2"
    assert source("register-op", "data")["producerTask"] == "validate-op"
    # the benchmark suite: the start (once) and each branch's final model, the suite gating the registration
    assert source("benchmark-op", "model")["producerTask"] == "start-op"
    for benchmark, final, suite, registration in (
        ("benchmark-op-2", "train-op-2", "suite-op", "register-op"),
        ("benchmark-op-3", "train-op-3", "suite-op-2", "register-op-2"),
    ):
        assert source(benchmark, "model")["producerTask"] == final
        assert source(benchmark, "raw")["producerTask"] == "importer"
        assert source(benchmark, "validated")["producerTask"] == "validate-op"
        assert source(suite, "start_results")["producerTask"] == "benchmark-op"
        assert source(suite, "final_results")["producerTask"] == benchmark
        assert tasks[suite]["inputs"]["parameters"]["final"]["runtimeValue"]["constant"] == "stage2"
        assert source(registration, "suite")["producerTask"] == suite
    # fine-tune: stage 2 from the start, with stage 2's settings
    assert source("train-op-3", "init_model")["producerTask"] == "start-op"
    assert (
        tasks["train-op-3"]["inputs"]["parameters"]["config"]["componentInputParameter"]
        == "pipelinechannel--stage2_config"
    )
    assert source("evaluate-op-4", "init_scores")["producerTask"] == "evaluate-op"
    assert source("register-op-2", "scores")["producerTask"] == "evaluate-op-4"
    defaults = {name: p.get("defaultValue") for name, p in spec["root"]["inputDefinitions"]["parameters"].items()}
    assert defaults["stage1_config"]["lr"] == params["stage1"]["lr"]
    assert (
        defaults["stage1_config"]["use_gpu"] is True
        and defaults["stage1_config"]["num_workers"] == params["kubeflow"]["gpus"]
    )
    assert defaults["stage2_config"]["epochs"] == params["stage2"]["epochs"]
    # the suite's paths in the run's artifacts: data/validated -> {validated}, data/raw/... -> {raw}/...
    suite = {entry["name"]: entry["path"] for entry in defaults["benchmark_config"]["suite"]}
    assert suite == {
        "demo-test": "{validated}",
        "demo-unseen": "{raw}/benchmark/unseen",
        "digits": "{raw}/zeroshot/digits",
        "shapes": "{raw}/zeroshot/shapes",
    }
    assert defaults["register_config"]["model_name"] == params["register"]["model_name"]
    assert (
        defaults["start_config"]["source"] == params["start"]["source"]
        and defaults["start_config"]["stages"] == params["start"]["stages"]
    )
    assert spec["deploymentSpec"]["executors"]["exec-train-op"]["container"]["image"]
    # per image set of params.yaml, zero-shot tasks for the start and for each branch's final model
    assert defaults["zeroshot_sets"] == params["zeroshot"]["sets"] and root["for-loop-5"]["parameterIterator"]
    # each branch indexes every gallery of search.galleries (a split of the validated data) with the
    # champion after registering, and publishes it where the search Deployment follows it
    assert params["search"]["galleries"] == {"test": "data/validated/test"}
    assert step_configs(params)["galleries"] == {"test": "test"}
    for registration, index in (("register-op", "index-op"), ("register-op-2", "index-op-2")):
        assert tasks[index]["dependentTasks"] == [registration]
        assert source(index, "validated")["producerTask"] == "validate-op"
        constants = {
            name: value["runtimeValue"]["constant"]
            for name, value in tasks[index]["inputs"]["parameters"].items()
            if "runtimeValue" in value
        }
        assert constants["gallery"] == "test"
        assert constants["publish_uri"] == f"{params['kubeflow']['index_catalog']}/test"
    assert (
        defaults["index_config"]["factory"] == params["index"]["factory"]
        and defaults["index_config"]["alias"] == "champion"
    )
    models = {name: tasks[name]["inputs"]["artifacts"]["model"]["componentInputArtifact"] for name in ZEROSHOT}
    assert models == {
        "zeroshot-op": "pipelinechannel--train-op-2-model",
        "zeroshot-op-2": "pipelinechannel--train-op-3-model",
        "zeroshot-op-3": "pipelinechannel--start-op-model",
    }
    zeroshot = tasks["zeroshot-op"]["inputs"]
    assert zeroshot["artifacts"]["raw"]["componentInputArtifact"] == "pipelinechannel--importer-artifact"
    assert zeroshot["parameters"]["image_set"]["componentInputParameter"] == "pipelinechannel--zeroshot_sets-loop-item"
    evaluate_outputs = spec["components"]["comp-evaluate-op"]["outputDefinitions"]["artifacts"]
    assert evaluate_outputs["report"]["artifactType"]["schemaTitle"] == "system.HTML"
    assert evaluate_outputs["summary"]["artifactType"]["schemaTitle"] == "system.Markdown"


def test_the_pipeline_scores_the_suite_dvc_repro_scores_and_names_a_path_it_cannot_read():
    params = load_params("params.yaml")
    params["benchmark"]["suite"] = [
        {"name": "muge", "task": "retrieval", "path": "s3://datasets/{2024}/MUGE", "split": "valid"},
        {"name": "inet", "task": "zeroshot", "path": "data/raw/imagenet", "split": "val", "label_file": "labels.txt"},
        {"name": "test", "task": "retrieval", "path": "data/validated"},
    ]
    suite = pipeline_suite(params)
    assert [entry["path"] for entry in suite] == ["s3://datasets/{2024}/MUGE", "{raw}/imagenet", "{validated}"]
    located = suite_on_artifacts(suite, "/runs/validated", "/runs/raw")
    assert [(d.path, d.label_file) for d in located] == [
        ("s3://datasets/{2024}/MUGE", ""),  # braces of its own stay
        ("/runs/raw/imagenet", "labels.txt"),  # a label file relative to its set moves with it
        ("/runs/validated", ""),
    ]
    with pytest.raises(ZhclipError, match=r"suite mine: data/benchmark/mine is neither in the run's data"):
        suite_on_artifacts([{**suite[0], "name": "mine", "path": "data/benchmark/mine"}], "/v", "/r")
    for entry, refused in (
        (
            {"name": "mine", "task": "zeroshot", "path": "data/benchmark/mine"},
            r"mine: data/benchmark/mine is a local path .* data/raw/",
        ),
        (
            {"name": "inet", "task": "zeroshot", "path": "s3://sets/inet", "label_file": "/home/me/labels.txt"},
            r"inet: label_file /home/me/labels.txt is a local file",
        ),
    ):
        params["benchmark"]["suite"] = [entry]
        with pytest.raises(ZhclipError, match=refused):
            pipeline_suite(params)


def test_an_empty_suite_compiles_no_benchmark_task(tmp_path):
    params = load_params("params.yaml")
    params["benchmark"]["suite"] = []
    tasks = _all_tasks(next(yaml.safe_load_all(compile_pipeline(tmp_path / "pipeline.yaml", params).read_text())))
    assert not [name for name in tasks if name.startswith(("benchmark-op", "suite-op"))]
    assert "suite" not in tasks["register-op"]["inputs"]["artifacts"] and "register-op-2" in tasks


def test_the_pipeline_indexes_the_galleries_dvc_repro_indexes():
    params = load_params("params.yaml")
    params["search"]["galleries"] = {"valid": "data/validated/valid", "shop": "s3://shop/gallery"}
    assert pipeline_galleries(params) == {"valid": "valid", "shop": "s3://shop/gallery"}
    params["search"]["galleries"] = {"mine": "photos/mine"}
    with pytest.raises(ZhclipError, match=r"search.galleries.mine: photos/mine is a local folder .* data/validated/"):
        pipeline_galleries(params)


@pytest.mark.slow
def test_run_local_reproduces_dvc_repro(small_project, tmp_path):
    """The whole pipeline under kfp.local scores the model exactly as `dvc repro` does, same params and seed."""
    project = copy_of(small_project, tmp_path)  # the pipeline registers into the project's MLflow store
    uri = f"sqlite:///{project / 'mlflow.db'}"
    params = yaml.safe_load((project / "params.yaml").read_text())
    name = params["register"]["model_name"]
    expected = json.loads((project / "metrics" / "evaluate_stage2.json").read_text())

    result = run_cli(
        "pipeline",
        "run-local",
        "--raw",
        str(project / "data" / "raw"),
        "--root",
        str(tmp_path / "root"),
        "--params",
        str(project / "params.yaml"),
        cwd=project,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = json.loads(result.stdout[result.stdout.rindex('{\n  "run_dir"') :])  # after the tasks' logs
    scores = outputs["scores"]
    assert set(scores) >= {"t2i_r1", "i2t_r10", "mean_recall", "chance_mean_recall"}
    for key in (
        "t2i_r1",
        "t2i_r5",
        "t2i_r10",
        "i2t_r1",
        "i2t_r5",
        "i2t_r10",
        "mean_recall",
        "chance_mean_recall",
        "gain_over_start",
    ):
        assert scores[key] == pytest.approx(expected[key], abs=1e-6), key
    # the same start, from the same pretrained towers, scored the same
    start = json.loads((project / "metrics" / "evaluate_start.json").read_text())
    assert outputs["start_scores"]["mean_recall"] == pytest.approx(start["mean_recall"], abs=1e-6)
    # the same training, step for step: both stages' losses agree, and they moved
    for stage, task in ((1, "train-op"), (2, "train-op-2")):
        dvc_train = json.loads((project / "metrics" / f"train_stage{stage}.json").read_text())
        kfp_train = json.loads((Path(outputs["run_dir"]) / task / "executor_output.json").read_text())
        logged = kfp_train["artifacts"]["summary"]["artifacts"][0]["metadata"]
        assert logged["steps"] == dvc_train["steps"] and logged["first_loss"] != logged["final_loss"]
        assert logged["final_loss"] == pytest.approx(dvc_train["final_loss"], abs=1e-6)
    client = MlflowClient(uri, uri)
    version = client.get_model_version_by_alias(name, "champion")
    assert float(version.tags["metric.mean_recall"]) == scores["mean_recall"]
    assert version.tags["data_dvc_hash"].endswith(".dir")
    assert json.loads(next((tmp_path / "root").glob("zhclip-*/evaluate-op-3/scores")).read_text())["texts"] == 48
    assert not list((tmp_path / "root").glob("zhclip-*/train-op-3"))  # the fine-tune branch did not run
    # zero-shot: one task per image set, each the same accuracy as dvc repro's stage for that set
    for model, tasks in (("start", outputs["zeroshot_start"]), ("stage2", outputs["zeroshot"])):
        expected_top1 = sorted(
            json.loads((project / "metrics" / f"zeroshot_{model}_{name}.json").read_text())["top1"]
            for name in params["zeroshot"]["sets"]
        )
        assert sorted(task["top1"] for task in tasks) == pytest.approx(expected_top1, abs=1e-6), model
    # the benchmark suite: the start and the final model on every dataset; the final model as dvc repro's
    # suite stage scored it (the project's benchmark.models is [stage2]), the start as its zero-shot stage did
    suite, ours = json.loads((project / "metrics" / "benchmark.json").read_text()), outputs["suite"]
    assert set(ours["models"]) == {"start", "stage2"} and ours["tasks"] == suite["tasks"]
    for dataset in suite["tasks"]:
        assert ours["models"]["stage2"][dataset] == pytest.approx(suite["models"]["stage2"][dataset], abs=1e-6)
    start_shapes = json.loads((project / "metrics" / "zeroshot_start_shapes.json").read_text())["top1"]
    assert ours["models"]["start"]["shapes"]["top1"] == pytest.approx(start_shapes, abs=1e-6)
    html = next((tmp_path / "root").glob("zhclip-*/evaluate-op-3/report")).read_text(encoding="utf-8")
    assert "<table" in html and "data:image/png;base64," in html and "Start → stages" in html

    # The pipeline trained the very weights dvc repro registered as version 1: no second version.
    assert outputs["register"]["version"] == 1 and len(client.search_model_versions(f"name='{name}'")) == 1
    # the index task embedded the test split with the champion, as dvc repro's index stage did
    indexed = json.loads((project / "metrics" / "index_test.json").read_text())
    assert outputs["index"]["images"] == indexed["images"] == 24 and outputs["index"]["rejected"] == 0
    card = next((tmp_path / "root").glob("zhclip-*/register-op/card")).read_text()
    assert (
        f"{name} version 1" in card
        and f"{scores['mean_recall']}" in card
        and "| already registered (same weights) | True |" in card
    )


def test_start_task_names_the_branch_of_its_stages(tmp_path):
    from types import SimpleNamespace

    from zhclip.workflows.steps import start_op

    class Summary:
        def log_metric(self, key, value):
            self.logged = (key, value)

    for stages, branch in (({"stage1": "start", "stage2": "stage1"}, "two-stage"), ({"stage2": "start"}, "fine-tune")):
        summary = Summary()
        assert (
            start_op.python_func(
                model=SimpleNamespace(path=str(tmp_path / branch)),
                summary=summary,
                config={"source": "scratch", "stages": stages},
            )
            == branch
        )
        assert summary.logged == ("projection_dim", 64) and (tmp_path / branch / "model.safetensors").is_file()


def test_step_configs_are_plain_json():
    configs = step_configs(load_params("params.yaml"))
    assert json.loads(json.dumps(configs)) == configs


def test_compiled_tasks_carry_gpus_resources_retries_secrets_and_caching(tmp_path):
    params = load_params("params.yaml")
    cluster = params["kubeflow"]
    spec, k8s = _compiled(tmp_path, params)
    executors = spec.deployment_spec["executors"]
    tasks = {
        **spec.root.dag.tasks,
        **{name: task for component in spec.components.values() for name, task in component.dag.tasks.items()},
    }
    for name in TRAINING:
        resources = executors[f"exec-{name}"]["container"]["resources"]
        assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
        assert int(resources["accelerator"]["resourceCount"]) == cluster["gpus"]
        assert resources["resourceCpuLimit"] == resources["resourceCpuRequest"] == cluster["train_cpu"]
        assert resources["resourceMemoryLimit"] == cluster["train_memory"]
        retry = tasks[name].retry_policy
        assert (
            retry.max_retry_count == cluster["train_retries"]
            and retry.backoff_duration.seconds == 60
            and retry.backoff_factor == 2
        )
        assert not tasks[name].caching_options.enable_cache
        config = k8s[name]
        assert dict(config.node_selector.labels) == cluster["gpu_node_selector"]
        assert [(t.key, t.operator, t.effect) for t in config.tolerations] == [
            ("nvidia.com/gpu", "Exists", "NoSchedule")
        ]
        assert config.empty_dir_mounts[0].mount_path == "/dev/shm"
    for name in ("ingest-op", "validate-op"):
        assert tasks[name].caching_options.enable_cache
    for name in STEPS:
        resources = executors[f"exec-{name}"]["container"]["resources"]
        assert "accelerator" not in resources and resources["resourceMemoryRequest"] == cluster["step_memory"]
        assert not tasks[name].HasField("retry_policy")
    loop = spec.components["comp-for-loop-2"].dag.tasks["zeroshot-op"]
    assert not loop.caching_options.enable_cache and not loop.HasField("retry_policy")
    assert "accelerator" not in executors["exec-zeroshot-op"]["container"]["resources"]
    for name in TRACKED:
        secrets = {s.secret_name: {e.secret_key: e.env_var for e in s.key_to_env} for s in k8s[name].secret_as_env}
        assert secrets == {
            "minio-credentials": {"access-key": "AWS_ACCESS_KEY_ID", "secret-key": "AWS_SECRET_ACCESS_KEY"},
            "mlflow-credentials": {"username": "MLFLOW_TRACKING_USERNAME", "password": "MLFLOW_TRACKING_PASSWORD"},
        }
        env = {e["name"]: e["value"] for e in executors[f"exec-{name}"]["container"]["env"]}
        assert env["MLFLOW_TRACKING_URI"] == cluster["mlflow_uri"] and env["AWS_ENDPOINT_URL"] == cluster["s3_endpoint"]
    for name in ("ingest-op", "validate-op"):
        assert not k8s[name].secret_as_env
    for name in (*TRAINING, *STEPS, *ZEROSHOT):  # the NetworkPolicies let exactly these pods reach MinIO and MLflow
        assert dict(k8s[name].pod_metadata.labels) == {"zhclip.io/client": "true"}
        assert k8s[name].security_context.run_as_non_root
        env = {e["name"]: e["value"] for e in executors[f"exec-{name}"]["container"]["env"]}
        assert json.loads(env["ZHCLIP_OBJECT_STORE"]) == asdict(ObjectStoreConfig())  # params.yaml's retry policy
    assert spec.root.input_definitions.parameters["ray_address"].default_value.string_value == ""


def test_cpu_cluster_requests_no_gpu_and_bad_kubeflow_settings_are_named(tmp_path):
    params = load_params("params.yaml")
    params["kubeflow"] = {**params["kubeflow"], "gpus": 0}
    spec, k8s = _compiled(tmp_path, params)
    resources = spec.deployment_spec["executors"]["exec-train-op"]["container"]["resources"]
    assert (
        "accelerator" not in resources and not k8s["train-op"].tolerations and not k8s["train-op"].node_selector.labels
    )
    defaults = spec.root.input_definitions.parameters["stage1_config"].default_value.struct_value
    assert defaults["use_gpu"] is False
    with pytest.raises(ZhclipError, match="section 'kubeflow': unknown keys \\['gpu'\\]"):
        compile_pipeline(tmp_path / "bad.yaml", {"kubeflow": {"gpu": 2}})


class FakeKfpApi(ThreadingHTTPServer):
    """A loopback stand-in for the KFP v2beta1 REST API: remembers requests, answers like the server."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), FakeKfpHandler)
        self.requests: list[tuple[str, str, bytes]] = []
        self.pipelines: dict[str, str] = {}  # display name -> id
        self.versions: list[str] = []


class FakeKfpHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _reply(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        api: FakeKfpApi = self.server
        url = urlparse(self.path)
        api.requests.append(("GET", url.path, b""))
        if url.path == "/apis/v2beta1/healthz":
            self._reply({"multi_user": False})
        elif url.path == "/apis/v2beta1/pipelines":
            name = json.loads(parse_qs(url.query)["filter"][0])["predicates"][0]["stringValue"]
            found = [{"pipeline_id": api.pipelines[name], "display_name": name}] if name in api.pipelines else []
            self._reply({"pipelines": found, "total_size": len(found)})
        elif url.path.endswith("/versions"):
            self._reply({"pipeline_versions": [{"pipeline_version_id": api.versions[-1], "pipeline_id": "p1"}]})
        elif url.path == "/apis/v2beta1/experiments":
            self._reply({})
        else:
            self.send_error(404)

    def do_POST(self):
        api: FakeKfpApi = self.server
        url = urlparse(self.path)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        api.requests.append(("POST", url.path, body))
        if url.path == "/apis/v2beta1/pipelines/upload":
            api.pipelines[parse_qs(url.query)["name"][0]] = "p1"
            api.versions.append("v1")
            self._reply({"pipeline_id": "p1", "display_name": parse_qs(url.query)["name"][0]})
        elif url.path == "/apis/v2beta1/pipelines/upload_version":
            api.versions.append(f"v{len(api.versions) + 1}")
            self._reply({"pipeline_id": "p1", "pipeline_version_id": api.versions[-1]})
        elif url.path == "/apis/v2beta1/experiments":
            self._reply({"experiment_id": "e1", **json.loads(body)})
        elif url.path == "/apis/v2beta1/runs":
            self._reply({"run_id": f"r{len(api.versions)}", **json.loads(body)})
        else:
            self.send_error(404)


@pytest.fixture
def kfp_api():
    api = FakeKfpApi()
    thread = threading.Thread(target=api.serve_forever, daemon=True)
    thread.start()
    yield api
    api.shutdown()
    api.server_close()


def _uploaded_spec(body: bytes) -> dict:
    """The pipeline YAML inside a multipart upload request."""
    part = body.split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n--", 1)[0]
    return next(yaml.safe_load_all(part))


def test_submit_uploads_the_compiled_package_and_starts_a_run(kfp_api, tmp_path):
    host = f"http://127.0.0.1:{kfp_api.server_address[1]}"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"stage1": {"epochs": 7}}))
    first = run_cli(
        "pipeline",
        "submit",
        "--host",
        host,
        "--raw-uri",
        "s3://zhclip-data/raw/v1",
        "--run-name",
        "first",
        "--params",
        str(tmp_path / "params.yaml"),
        timeout=120,
    )
    assert first.returncode == 0, first.stderr
    second = run_cli(
        "pipeline",
        "submit",
        "--host",
        host,
        "--raw-uri",
        "s3://zhclip-data/raw/v2",
        "--run-name",
        "second",
        "--ray-address",
        "ray://zhclip-head-svc:10001",
        "--params",
        str(tmp_path / "params.yaml"),
        timeout=120,
    )
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout[second.stdout.index("{") :])["version_id"] == "v2"

    uploads = [body for method, path, body in kfp_api.requests if path.startswith("/apis/v2beta1/pipelines/upload")]
    assert [path for _, path, _ in kfp_api.requests if "upload" in path] == [
        "/apis/v2beta1/pipelines/upload",
        "/apis/v2beta1/pipelines/upload_version",
    ]
    for body in uploads:  # the request carries the whole compiled package, params file defaults included
        spec = json_format.ParseDict(_uploaded_spec(body), pipeline_spec_pb2.PipelineSpec())
        assert set(spec.root.dag.tasks) >= {"ingest-op", "start-op", "condition-1", "condition-3"}
        assert set(spec.components["comp-condition-1"].dag.tasks) >= {"train-op", "train-op-2", "register-op"}
        assert spec.root.input_definitions.parameters["stage1_config"].default_value.struct_value["epochs"] == 7
    runs = [json.loads(body) for method, path, body in kfp_api.requests if path == "/apis/v2beta1/runs"]
    assert [run["pipeline_version_reference"] for run in runs] == [
        {"pipeline_id": "p1", "pipeline_version_id": "v1"},
        {"pipeline_id": "p1", "pipeline_version_id": "v2"},
    ]
    assert [run["display_name"] for run in runs] == ["first", "second"]
    assert runs[0]["runtime_config"]["parameters"] == {"raw_uri": "s3://zhclip-data/raw/v1"}
    assert runs[1]["runtime_config"]["parameters"] == {
        "raw_uri": "s3://zhclip-data/raw/v2",
        "ray_address": "ray://zhclip-head-svc:10001",
    }
    assert all(run["experiment_id"] == "e1" for run in runs)


def test_submit_to_an_unreachable_host_is_a_clear_error(tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run_cli(
        "pipeline", "submit", "--host", f"http://127.0.0.1:{port}", "--raw-uri", "s3://b/raw", "--defaults", timeout=120
    )
    assert result.returncode == 2
    assert f"Kubeflow Pipelines API at http://127.0.0.1:{port}" in result.stderr
