"""infra/ without a cluster: kustomize renders every overlay, every object passes the Kubernetes
schemas (kubernetes-validate, strict: unknown fields fail), the RayCluster carries what KubeRay
requires, and security, secrets, buckets and network rules hang together with the pipeline."""

import copy
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from zhclip.workflows.config import KubeflowConfig
from zhclip.workflows.pipeline import CLIENT_LABEL

INFRA = Path(__file__).resolve().parents[2] / "infra"
OVERLAYS = ("local", "production")
K8S_VERSION = "1.33"  # oldest Kubernetes the manifests target
CUSTOM_KINDS = {"RayCluster"}  # CRDs: no schema in kubernetes-validate, checked field by field below


def render(overlay: str) -> list[dict]:
    """`kubectl kustomize infra/overlays/<overlay>`, as objects."""
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl not installed (make system-deps installs Debian's kubernetes-client)")
    result = subprocess.run(
        [kubectl, "kustomize", str(INFRA / "overlays" / overlay)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def objects(request) -> list[dict]:
    return render(request.param)


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == kind}


def pod_templates(objects: list[dict]) -> dict[str, dict]:
    """Every pod template, named by its owner (Ray groups included)."""
    templates = {}
    for obj in objects:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in ("Deployment", "StatefulSet", "Job"):
            templates[name] = obj["spec"]["template"]
        elif obj["kind"] == "RayCluster":
            templates[f"{name}/head"] = obj["spec"]["headGroupSpec"]["template"]
            for group in obj["spec"]["workerGroupSpecs"]:
                templates[f"{name}/{group['groupName']}"] = group["template"]
    return templates


def test_every_object_passes_the_kubernetes_schemas(objects):
    kinds = {obj["kind"] for obj in objects}
    assert kinds >= {
        "Namespace",
        "StatefulSet",
        "Deployment",
        "Service",
        "Job",
        "ConfigMap",
        "NetworkPolicy",
        "RayCluster",
    }
    for obj in objects:
        if obj["kind"] not in CUSTOM_KINDS:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    for template in pod_templates(objects).values():  # Ray's pod templates are core PodTemplateSpecs
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template},
            K8S_VERSION,
            strict=True,
        )
    assert all(obj["metadata"].get("namespace") == "zhclip" for obj in objects if obj["kind"] != "Namespace")


def test_the_schema_check_catches_a_misspelt_field():
    deployment = copy.deepcopy(by_kind(render("local"), "Deployment")["mlflow"])
    deployment["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_raycluster_has_what_kuberay_requires(objects):
    cluster = by_kind(objects, "RayCluster")["zhclip"]
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    lock = (INFRA.parent / "requirements.lock").read_text()
    assert f"ray=={spec['rayVersion']}\n" in lock  # the image's Ray must match the cluster's
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["template"]["spec"]["containers"][0]["image"].split(":")[0].endswith("zhclip")
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    groups = {group["groupName"]: group for group in spec["workerGroupSpecs"]}
    assert set(groups) == {"gpu", "cpu"}
    for group in groups.values():
        assert isinstance(group["rayStartParams"], dict)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"] and group["maxReplicas"] >= 1
    worker = groups["gpu"]["template"]["spec"]
    limits = worker["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] >= 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in worker["tolerations"]
    assert worker["nodeSelector"] == KubeflowConfig().gpu_node_selector  # the same GPU nodes as pipeline tasks
    data_worker = groups["cpu"]["template"]["spec"]  # decoding and validation: CPU nodes, no GPU held
    assert (
        "nvidia.com/gpu" not in data_worker["containers"][0]["resources"]["limits"]
        and "nodeSelector" not in data_worker
    )
    assert data_worker["containers"][0]["env"] == worker["containers"][0]["env"], "the same MinIO and MLflow access"


def test_every_container_is_non_root_unprivileged_and_bounded(objects):
    for owner, template in pod_templates(objects).items():
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, owner
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", owner
        for container in pod["containers"] + pod.get("initContainers", []):
            where = f"{owner}/{container['name']}"
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"], where
            assert not security.get("privileged"), where
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), f"{where} lacks {bound}"


def test_no_secret_values_only_references_to_documented_secrets(objects):
    assert not by_kind(objects, "Secret"), "secret values are created from infra/secrets/*.example, never committed"
    examples = {}
    for path in (INFRA / "secrets").glob("*.env.example"):
        keys = {line.split("=", 1)[0] for line in path.read_text().splitlines() if line and not line.startswith("#")}
        examples[path.name.removesuffix(".env.example")] = keys
    examples["mlflow-auth"] |= {"basic_auth.ini"}  # a file key (basic_auth.ini.example)
    references = set()
    for template in pod_templates(objects).values():
        for container in template["spec"]["containers"]:
            for env in container.get("env", []):
                if "secretKeyRef" in env.get("valueFrom", {}):
                    references.add((env["valueFrom"]["secretKeyRef"]["name"], env["valueFrom"]["secretKeyRef"]["key"]))
        for volume in template["spec"].get("volumes", []):
            if "secret" in volume:
                references |= {(volume["secret"]["secretName"], item["key"]) for item in volume["secret"]["items"]}
    launcher = yaml.safe_load(by_kind(objects, "ConfigMap")["kfp-launcher"]["data"]["providers"])
    ref = launcher["s3"]["default"]["credentials"]["secretRef"]
    references |= {(ref["secretName"], ref["accessKeyKey"]), (ref["secretName"], ref["secretKeyKey"])}
    cluster = KubeflowConfig()  # the pipeline's tasks read these as env
    references |= {
        (cluster.minio_secret, "access-key"),
        (cluster.minio_secret, "secret-key"),
        (cluster.mlflow_secret, "username"),
        (cluster.mlflow_secret, "password"),
    }
    for name, key in references:
        assert key in examples.get(name, set()), (
            f"secret {name} key {key} has no infra/secrets/{name}.env.example entry"
        )
    assert {name for name, _ in references} == set(examples)


def test_pipeline_root_buckets_and_endpoints_point_at_minio(objects):
    launcher = by_kind(objects, "ConfigMap")["kfp-launcher"]["data"]
    root_bucket = re.match(r"s3://([^/]+)/", launcher["defaultPipelineRoot"]).group(1)
    job = by_kind(objects, "Job")["minio-buckets"]["spec"]["template"]["spec"]["containers"][0]
    buckets = set(next(env["value"] for env in job["env"] if env["name"] == "BUCKETS").split())
    mlflow_args = by_kind(objects, "Deployment")["mlflow"]["spec"]["template"]["spec"]["containers"][0]["args"]
    artifacts_bucket = re.search(r"--artifacts-destination=s3://([^/]+)/", " ".join(mlflow_args)).group(1)
    assert {root_bucket, artifacts_bucket, "zhclip-dvc", "zhclip-ray"} <= buckets
    assert {"--serve-artifacts", "--app-name=basic-auth"} <= set(mlflow_args)
    assert any(arg.startswith("--backend-store-uri=postgresql") for arg in mlflow_args)
    endpoint = yaml.safe_load(launcher["providers"])["s3"]["default"]["endpoint"]
    cluster = KubeflowConfig()
    assert endpoint == "minio.zhclip.svc.cluster.local:9000" and cluster.s3_endpoint == f"http://{endpoint}"
    assert cluster.mlflow_uri == "http://mlflow.zhclip.svc.cluster.local:5000"
    assert "mlflow.zhclip.svc.cluster.local:5000" in next(a for a in mlflow_args if a.startswith("--allowed-hosts"))


def test_only_labelled_clients_reach_minio_and_mlflow(objects):
    policies = by_kind(objects, "NetworkPolicy")
    client = dict([CLIENT_LABEL])  # the label the compiled pipeline puts on every task pod
    for name, service in (("minio-from-clients", "minio"), ("mlflow-from-clients", "mlflow")):
        policy = policies[name]["spec"]
        assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": service}
        assert policy["policyTypes"] == ["Ingress"]
        sources = [peer for rule in policy["ingress"] for peer in rule["from"]]
        assert {"podSelector": {"matchLabels": client}} in sources
        assert all("podSelector" in peer for peer in sources), "no rule may open a whole namespace or IP range"
    postgres = policies["postgres-from-mlflow"]["spec"]["ingress"]
    assert postgres == [
        {"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mlflow"}}}], "ports": [{"port": 5432}]}
    ]
    templates = pod_templates(objects)
    for owner in (
        "Deployment/mlflow",
        "RayCluster/zhclip/head",
        "RayCluster/zhclip/gpu",
        "RayCluster/zhclip/cpu",
        "Job/minio-buckets",
    ):
        assert templates[owner]["metadata"]["labels"].items() >= client.items(), owner
    assert "zhclip.io/client" not in templates["StatefulSet/postgres"]["metadata"]["labels"]


def test_overlays_differ_where_they_should():
    local, production = (by_kind(render(overlay), "RayCluster")["zhclip"] for overlay in OVERLAYS)
    assert (
        local["spec"]["workerGroupSpecs"][0]["maxReplicas"] < production["spec"]["workerGroupSpecs"][0]["maxReplicas"]
    )
    images = {
        container["image"]
        for cluster in (local, production)
        for container in cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    }
    assert images == {"zhclip:dev", "registry.example.com/ml/zhclip:0.1.0"}


def test_image_is_cuda_pytorch_non_root_and_installs_the_lock():
    dockerfile = (INFRA / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", dockerfile, re.M).group(1)
    assert base.startswith("pytorch/pytorch:") and "cuda" in base
    torch_pin = re.search(r"^torch==(\S+)$", (INFRA.parent / "requirements.lock").read_text(), re.M).group(1)
    assert base.split(":")[1].startswith(f"{torch_pin}-")  # pip then keeps the base's CUDA torch
    assert "pip install -r requirements.lock" in dockerfile
    users = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")


def test_search_service_reads_the_index_the_pipeline_publishes(objects):
    from zhclip.components.core.settings import load_params

    deployment = by_kind(objects, "Deployment")["zhclip-search"]
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    args = dict(arg.removeprefix("--").split("=", 1) for arg in container["args"] if not arg.startswith("--index="))
    params = load_params(INFRA.parent / "params.yaml")
    assert container["command"] == ["zhclip", "serve"] and args["host"] == "0.0.0.0"
    # each gallery of search.galleries where the pipeline's index task publishes it: <index_catalog>/<name>
    catalog = params["kubeflow"]["index_catalog"]
    served = [arg.removeprefix("--index=") for arg in container["args"] if arg.startswith("--index=")]
    assert served == [f"{name}={catalog}/{name}" for name in params["search"]["galleries"]]
    assert args["follow"] == f"models:/{params['register']['model_name']}@{params['search']['alias']}"
    bucket = catalog.removeprefix("s3://").split("/")[0]
    job = by_kind(objects, "Job")["minio-buckets"]["spec"]["template"]["spec"]["containers"][0]
    assert bucket in next(env["value"] for env in job["env"] if env["name"] == "BUCKETS").split()
    env = {item["name"]: item for item in container["env"]}
    assert (
        env["AWS_ENDPOINT_URL"]["value"] == "http://minio:9000"
        and env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow:5000"
    )
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "minio-credentials"
    assert env["ZHCLIP_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "search-admin", "key": "token"}
    assert (
        container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        and container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    )
    assert pod["metadata"]["labels"].items() >= dict([CLIENT_LABEL]).items()  # MinIO and MLflow let it in
    service = by_kind(objects, "Service")["zhclip-search"]["spec"]
    assert service["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["ports"][0]["targetPort"] == container["ports"][0]["name"]


def test_search_is_scraped_kept_available_and_scaled(objects):
    deployment = by_kind(objects, "Deployment")["zhclip-search"]
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == container["ports"][0]["containerPort"]
    budget = by_kind(objects, "PodDisruptionBudget")["zhclip-search"]["spec"]
    assert budget["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert budget["minAvailable"] == 1 < deployment["spec"]["replicas"]  # a drain never empties the service
    scaler = by_kind(objects, "HorizontalPodAutoscaler")["zhclip-search"]["spec"]
    assert scaler["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "zhclip-search"}
    assert scaler["minReplicas"] >= budget["minAvailable"] + 1 and scaler["maxReplicas"] > scaler["minReplicas"]
    assert "cpu" in container["resources"]["requests"]  # utilisation is measured against the request


def test_the_grafana_dashboard_plots_only_metrics_the_search_service_exports():
    import json

    from zhclip.components.search.observability import ServiceMetrics

    exported = {
        sample_name
        for family in ServiceMetrics().registry.collect()
        for sample_name in (
            [family.name + suffix for suffix in ("_bucket", "_sum", "_count")]
            if family.type == "histogram"
            else [family.name + "_total"]
            if family.type == "counter"
            else [family.name, family.name + "_info"]
        )
    }
    dashboard = json.loads((INFRA / "grafana" / "zhclip-search.json").read_text(encoding="utf-8"))
    used = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\bzhclip_search_\w+", target["expr"])
    }
    assert used and used <= exported, used - exported
    assert {"zhclip_search_requests_total", "zhclip_search_request_seconds_bucket", "zhclip_search_model_info"} <= used
