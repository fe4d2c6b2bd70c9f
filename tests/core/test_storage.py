"""S3 paths against a loopback S3 server (moto_server, the `s3_endpoint` fixture of conftest):
DVC push/pull through an S3 remote, and uploads with the minio client."""

import os
import shutil
import subprocess

import boto3
import pytest

from zhclip.components.core.errors import ZhclipError
from zhclip.components.core.storage import upload

from conftest import BIN, S3_CREDENTIALS


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    for key, value in {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(key, value)
    return s3_endpoint


def _s3(endpoint):
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )


def _objects(endpoint, bucket):
    return {o["Key"]: o["Size"] for o in _s3(endpoint).list_objects_v2(Bucket=bucket).get("Contents", [])}


def test_upload_prepared_shards_with_the_minio_client(s3_env, prepared_dir):
    summary = upload(prepared_dir, "s3://zhclip-data/prepared/v1")
    local = {
        f"prepared/v1/{p.relative_to(prepared_dir).as_posix()}": p.stat().st_size
        for p in prepared_dir.rglob("*")
        if p.is_file()
    }
    assert _objects(s3_env, "zhclip-data") == local
    assert summary["uploaded_files"] == len(local) > 3


def test_upload_errors_name_the_problem(s3_env, tmp_path, monkeypatch):
    with pytest.raises(ZhclipError, match="not an s3://bucket/prefix URI"):
        upload(tmp_path, "zhclip-data/x")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(ZhclipError, match="set AWS_SECRET_ACCESS_KEY"):
        upload(tmp_path, "s3://zhclip-data/x")


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _dvc(*args, cwd, env):
    result = subprocess.run([str(BIN / "dvc"), *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, f"dvc {args}: {result.stdout[-2000:]}{result.stderr[-2000:]}"
    return result.stdout


def test_dvc_push_and_pull_round_trip_through_the_s3_remote(s3_endpoint, raw_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    _dvc("init", "-q", cwd=tmp_path, env=env)
    shutil.copytree(raw_dir, tmp_path / "raw")
    _dvc("add", "-q", "raw", cwd=tmp_path, env=env)
    _s3(s3_endpoint).create_bucket(Bucket="zhclip-dvc")
    # As README documents for MinIO: endpoint in the shared config, credentials only in config.local.
    _dvc("remote", "add", "-d", "minio", "s3://zhclip-dvc/store", cwd=tmp_path, env=env)
    _dvc("remote", "modify", "minio", "endpointurl", s3_endpoint, cwd=tmp_path, env=env)
    _dvc("remote", "modify", "--local", "minio", "access_key_id", "testing", cwd=tmp_path, env=env)
    _dvc("remote", "modify", "--local", "minio", "secret_access_key", "testing", cwd=tmp_path, env=env)
    assert "testing" not in (tmp_path / ".dvc" / "config").read_text()
    _dvc("push", cwd=tmp_path, env=env)
    assert _objects(s3_endpoint, "zhclip-dvc"), "nothing reached the bucket"
    original = _files(tmp_path / "raw")
    shutil.rmtree(tmp_path / "raw")
    shutil.rmtree(tmp_path / ".dvc" / "cache")
    _dvc("pull", cwd=tmp_path, env=env)
    assert _files(tmp_path / "raw") == original and len(original) > 6


def test_benchmark_sets_read_from_s3_as_from_disk(s3_env, raw_dir, tiny_models):
    """A zero-shot set in ELEVATER's layout and a retrieval split in Chinese-CLIP's, from MinIO."""
    import numpy as np

    from zhclip.components.evaluation.benchmark import benchmark
    from zhclip.components.evaluation.classification_set import read_classification_set
    from zhclip.components.evaluation.suite_config import SuiteDataset

    upload(raw_dir, "s3://zhclip-bench/raw")
    local, remote = (read_classification_set(f"{root}/zeroshot/shapes") for root in (raw_dir, "s3://zhclip-bench/raw"))
    assert (remote.layout, remote.classes, remote.files) == ("elevater", local.classes, local.files)
    assert np.array_equal(remote.labels, local.labels) and remote.open(0).tobytes() == local.open(0).tobytes()
    figures = [
        benchmark(tiny_models[0], SuiteDataset("unseen", "retrieval", f"{root}/benchmark/unseen"))
        for root in (raw_dir, "s3://zhclip-bench/raw")
    ]
    assert {key: figures[0][key] for key in ("t2i_r1", "i2t_r5", "mean_recall")} == {
        key: figures[1][key] for key in ("t2i_r1", "i2t_r5", "mean_recall")
    }


@pytest.mark.slow
def test_ingest_reads_raw_splits_from_s3_with_ray_tasks(s3_env, raw_dir, prepared_dir, tmp_path):
    """The raw data in MinIO, decoded by Ray tasks that read it themselves: the same shards as from the local folder."""
    from zhclip.components.data.ingest import IngestConfig, ingest
    from zhclip.components.data.shards import read_pairs

    upload(raw_dir, "s3://zhclip-raw/v1")
    summary = ingest("s3://zhclip-raw/v1", tmp_path / "prepared", IngestConfig(shard_rows=50, workers=2))
    assert summary["raw_dir"] == "s3://zhclip-raw/v1"
    for split in ("train", "valid", "test"):
        assert read_pairs(tmp_path / "prepared", split).equals(read_pairs(prepared_dir, split)), split
    with pytest.raises(ZhclipError, match="s3://zhclip-raw/missing not found"):
        ingest("s3://zhclip-raw/missing", tmp_path / "other", IngestConfig(workers=1))


@pytest.mark.slow
def test_training_reads_its_data_from_and_checkpoints_to_s3(s3_env, prepared_dir, tmp_path):
    """As on a KubeRay cluster, where workers share no disk: shards and checkpoints in MinIO."""
    from zhclip.components.core.lineage import dvc_hash
    from zhclip.components.training.config import TrainConfig
    from zhclip.components.training.runner import train

    upload(prepared_dir, "s3://zhclip-train/prepared")
    assert dvc_hash("s3://zhclip-train/prepared") == dvc_hash(prepared_dir)
    _s3(s3_env).create_bucket(Bucket="zhclip-ray")
    config = TrainConfig(
        stage=1,
        max_steps=6,
        batch_size=32,
        warmup_steps=1,
        checkpoint_every=3,
        storage_path="s3://zhclip-ray/checkpoints",
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )
    stage1 = train("s3://zhclip-train/prepared", tmp_path / "stage1", config)
    upload(tmp_path / "stage1", "s3://zhclip-train/models/stage1")  # as KFP stores a Model artifact
    config2 = TrainConfig(
        stage=2,
        max_steps=2,
        batch_size=32,
        warmup_steps=1,
        storage_path="s3://zhclip-ray/checkpoints",
        tracking_uri=config.tracking_uri,
    )
    stage2 = train(
        "s3://zhclip-train/prepared", tmp_path / "stage2", config2, init_dir="s3://zhclip-train/models/stage1"
    )
    assert stage2["steps"] == 2 and stage2["mlflow"]["parent_run_id"] == stage1["mlflow"]["parent_run_id"]
    summary = stage1
    keys = _objects(s3_env, "zhclip-ray")
    run = f"checkpoints/{summary['ray_run']}/"
    checkpoints = {
        key.split("/")[2] for key in keys if key.startswith(run + "checkpoint_") and key.endswith("model.safetensors")
    }
    assert (tmp_path / "stage1" / "model.safetensors").is_file()
    assert len(checkpoints) == 2, f"checkpoints at steps 3 and 6 in the bucket, got {sorted(keys)}"
    assert any(key.endswith("training_state.pt") for key in keys)
    assert summary["checkpoint"].startswith(f"s3://zhclip-ray/{run}checkpoint_") and summary["steps"] == 6
