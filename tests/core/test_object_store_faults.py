"""The object store going away (MinIO restarting) during a shard read, an index publish, an upload and
a checkpoint upload: a few seconds down, and the step retries and succeeds with every byte in place;
down for good, and the step fails within a bounded time naming the endpoint, leaving no partial object
that a reader takes as complete. The store is moto_server behind `outage.OutageProxy`."""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict

import boto3
import pytest

from zhclip.components.core.storage import POLICY_ENV, ObjectStoreConfig, upload
from zhclip.components.data.validate import ValidateConfig, validate
from zhclip.components.search.index_build import IndexConfig, build_index
from zhclip.components.search.index_store import (
    IndexNotFound,
    SearchIndex,
    find_index,
    publish_index,
    weights_folder_name,
)

from conftest import S3_CREDENTIALS, run_cli
from outage import OutageProxy

OUTAGE_S = 3.0
# Retries that outlast OUTAGE_S (the waits double: 6 attempts span about 15 s), short timeouts.
POLICY = ObjectStoreConfig(retry_attempts=6, connect_timeout_s=2, request_timeout_s=20)


def _moto(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **_boto_credentials())


def _boto_credentials() -> dict:
    return {"aws_access_key_id": S3_CREDENTIALS["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": "testing"}


def _objects(endpoint: str, bucket: str, prefix: str) -> dict[str, bytes]:
    s3 = _moto(endpoint)
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    files = [o["Key"] for o in listed if not o["Key"].endswith("/")]  # not the folder markers pyarrow writes
    return {key: s3.get_object(Bucket=bucket, Key=key)["Body"].read() for key in files}


@pytest.fixture
def store(s3_endpoint, monkeypatch):
    """The loopback S3 server behind a proxy that can go down; the steps of this process use the proxy."""
    proxy = OutageProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    for name, value in {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": proxy.url}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(POLICY_ENV, json.dumps(asdict(POLICY)))
    yield proxy
    proxy.close()


@pytest.fixture(scope="module")
def local_index(tiny_models, prepared_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("index") / "test"
    built = build_index(str(prepared_dir / "test"), str(out), str(tiny_models[0]), IndexConfig(factory="Flat"))
    return {"folder": out, "weights_hash": built["model"]["weights_hash"]}


def _assert_one_outage_ridden_out(proxy: OutageProxy, started: float) -> None:
    (outage,) = proxy.outages
    assert outage["seconds"] == OUTAGE_S
    assert time.monotonic() - outage["at"] >= OUTAGE_S and outage["at"] > started  # the step waited it out


def test_an_index_publish_rides_out_an_outage_and_is_complete(store, s3_endpoint, local_index):
    _moto(s3_endpoint).create_bucket(Bucket="zhclip-catalog")
    store.outage_on(rb"^PUT /zhclip-catalog/catalog/\w+/index\.faiss", OUTAGE_S)  # after items.parquet
    started = time.monotonic()
    entry = publish_index(str(local_index["folder"]), "s3://zhclip-catalog/catalog", local_index["weights_hash"])
    _assert_one_outage_ridden_out(store, started)
    key = f"catalog/{weights_folder_name(local_index['weights_hash'])}"
    local = {f"{key}/{p.name}": p.read_bytes() for p in local_index["folder"].iterdir()}
    assert _objects(s3_endpoint, "zhclip-catalog", key) == local  # every file, byte for byte
    assert SearchIndex(entry).size == SearchIndex(local_index["folder"]).size


def test_a_publish_with_the_store_down_for_good_fails_in_bounded_time_naming_it(
    store, s3_endpoint, tiny_models, prepared_dir, tmp_path
):
    """Through the CLI, as users and the pipeline's task run it; the retry policy is params.yaml's."""
    _moto(s3_endpoint).create_bucket(Bucket="zhclip-down")
    (tmp_path / "params.yaml").write_text("object_store:\n  retry_attempts: 3\n  connect_timeout_s: 2\n")
    store.outage_on(rb"^PUT /zhclip-down/catalog/\w+/index\.faiss", None)  # items.parquet is in, then down
    started = time.monotonic()
    result = run_cli(
        "index",
        *("--gallery", str(prepared_dir / "test"), "--model", str(tiny_models[0])),
        *("--publish", "s3://zhclip-down/catalog", "--factory", "Flat"),
        cwd=tmp_path,
        env={POLICY_ENV: ""},  # the policy of params.yaml, not the fixture's
    )
    took = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"the object store at {store.url} did not answer after 3 attempts" in result.stderr
    assert "object_store.retry_attempts" in result.stderr and "Traceback" not in result.stderr
    assert took < 60, f"took {took:.0f} s to give up"
    written = _objects(s3_endpoint, "zhclip-down", "catalog/")
    assert [key.rsplit("/", 1)[1] for key in written] == ["items.parquet"]  # no index.json: never taken
    store.up()  # back: a reader finds no index there
    with pytest.raises(IndexNotFound):
        find_index("s3://zhclip-down/catalog", {"weights_hash": next(iter(written)).split("/")[1], "uri": "m"})


def test_a_shard_read_rides_out_an_outage(store, s3_endpoint, prepared_dir, tmp_path):
    """Validation reads every shard of the prepared data from the store; the first shard read of the
    train split starts a 3 s outage, and the outcome is that of the same data on local disk."""
    _moto(s3_endpoint).create_bucket(Bucket="zhclip-shards")
    upload(prepared_dir, "s3://zhclip-shards/prepared")
    store.outage_on(rb"^GET /zhclip-shards/prepared/train/part-", OUTAGE_S)
    started = time.monotonic()
    remote = validate("s3://zhclip-shards/prepared", tmp_path / "remote", ValidateConfig(), None, tmp_path / "q1")
    _assert_one_outage_ridden_out(store, started)
    local = validate(prepared_dir, tmp_path / "local", ValidateConfig(), None, tmp_path / "q2")
    assert remote["splits"] == local["splits"]
    assert (tmp_path / "q1").read_bytes() == (tmp_path / "q2").read_bytes()


def test_an_upload_with_the_store_down_fails_in_bounded_time_naming_it(store, prepared_dir, tmp_path):
    (tmp_path / "params.yaml").write_text("object_store:\n  retry_attempts: 3\n  connect_timeout_s: 2\n")
    store.down()
    started = time.monotonic()
    result = run_cli(
        "upload", "--src", str(prepared_dir), "--dest", "s3://zhclip-never/x", cwd=tmp_path, env={POLICY_ENV: ""}
    )
    assert result.returncode == 2 and time.monotonic() - started < 60
    assert f"the object store at {store.url} did not answer after 3 attempts" in result.stderr, result.stderr[-2000:]


@pytest.mark.slow
def test_a_checkpoint_upload_rides_out_an_outage(store, s3_endpoint, prepared_dir, tmp_path):
    """Stage 1 with its Ray Train checkpoints on the store: the first checkpoint's upload starts a 3 s
    outage; the stage runs to its end without a restart, and every checkpoint it kept is whole."""
    from zhclip.components.training.config import TrainConfig
    from zhclip.components.training.runner import train

    _moto(s3_endpoint).create_bucket(Bucket="zhclip-ray")
    store.outage_on(rb"^PUT /zhclip-ray/runs/\S*checkpoint_\S*/model\.safetensors", OUTAGE_S)
    config = TrainConfig(
        stage=1,
        max_steps=12,
        batch_size=32,
        warmup_steps=2,
        checkpoint_every=4,
        keep_checkpoints=3,
        storage_path="s3://zhclip-ray/runs",
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )
    started = time.monotonic()
    summary = train(prepared_dir, tmp_path / "out", config)
    _assert_one_outage_ridden_out(store, started)
    assert summary["steps"] == 12 and summary["resumed_at_steps"] == []
    stored = _objects(s3_endpoint, "zhclip-ray", "runs/")
    checkpoints = {match[1] for key in stored if (match := re.search(r"/(checkpoint_\d[^/]*)/", key))}
    assert len(checkpoints) == 3 and summary["checkpoint"].rsplit("/", 1)[1] in checkpoints
    for name in checkpoints:
        files = {key.rsplit("/", 1)[1]: data for key, data in stored.items() if f"/{name}/" in key}
        assert files.get("model.safetensors"), f"{name}: no weights"
