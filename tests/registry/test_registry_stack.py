"""The production registry stack, started here: an MLflow tracking server with a PostgreSQL backend
store (Debian's postgresql, a throw-away cluster) and artifacts on a loopback S3 server. Registration,
aliasing and a pull go through it over HTTP; concurrent registrations lose no version."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import boto3
import numpy as np
import pandas as pd
import psycopg2
import pytest

from zhclip.components.registry.register import RegisterConfig, register
from zhclip.model.pyfunc import ZhclipEmbedder

from conftest import BIN, S3_CREDENTIALS, free_port, running

pytestmark = pytest.mark.slow
NAME = "zhclip-stack"
BUCKET = "mlflow"


def _postgres_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        pytest.fail("PostgreSQL server binaries not found under /usr/lib/postgresql; run `make system-deps`")
    return found[-1].parent


@pytest.fixture(scope="module")
def postgres_uri() -> str:
    """A PostgreSQL cluster in a temp folder on 127.0.0.1 and a free port, stopped and removed afterwards.

    PostgreSQL refuses to run as root, so as root the cluster belongs to the `postgres` user.
    """
    bin_dir = _postgres_bin()
    as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="zhclip-pg-"))  # directly in /tmp: pytest's folders are root-only
    if as_owner:
        shutil.chown(root, "postgres")
    cluster, port = root / "cluster", free_port()

    def pg(*args: str, timeout: int = 120) -> None:
        result = subprocess.run(as_owner + list(args), capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"{args[0]} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"

    pg(str(bin_dir / "initdb"), "-D", str(cluster), "-U", "zhclip", "--auth=trust", "-E", "UTF8")
    pg(
        str(bin_dir / "pg_ctl"),
        "-D",
        str(cluster),
        "-l",
        str(root / "postgres.log"),
        "-w",
        "-t",
        "60",
        "-o",
        f"-p {port} -k {root} -c listen_addresses=127.0.0.1",
        "start",
    )
    try:
        pg(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "zhclip", "mlflow")
        # SQLAlchemy 2.1 reads plain postgresql:// as psycopg 3; the locked driver is psycopg2.
        yield f"postgresql+psycopg2://zhclip@127.0.0.1:{port}/mlflow"
    finally:
        pg(str(bin_dir / "pg_ctl"), "-D", str(cluster), "-m", "fast", "-w", "stop", timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def _s3(endpoint: str):
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.fixture(scope="module")
def tracking_server(postgres_uri, s3_endpoint, tmp_path_factory) -> str:
    """`mlflow server` on PostgreSQL, proxying artifacts to s3://mlflow/artifacts; clients need no S3 credentials."""
    _s3(s3_endpoint).create_bucket(Bucket=BUCKET)
    port = free_port()
    env = {**os.environ, **S3_CREDENTIALS, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint, "PATH": f"{BIN}:{os.environ['PATH']}"}
    server = [
        str(BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        postgres_uri,
        "--artifacts-destination",
        f"s3://{BUCKET}/artifacts",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-w",
        "2",
    ]
    log = tmp_path_factory.mktemp("mlflow_server") / "server.log"
    with running(server, f"http://127.0.0.1:{port}/health", log, timeout=300, env=env):
        yield f"http://127.0.0.1:{port}"


def _metrics(tmp_path: Path, name: str, mean_recall: float) -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"mean_recall": mean_recall}))
    return path


def test_registration_aliases_and_pull_over_http_with_postgres_and_s3(
    tiny_models, tracking_server, postgres_uri, s3_endpoint, tmp_path
):
    config = RegisterConfig(model_name=NAME, tracking_uri=tracking_server)
    assert register(tiny_models[0], _metrics(tmp_path, "a", 40.0), config)["champion_version"] == 1

    # Two registrations at once, both worse than the champion: two new versions, champion stays.
    client_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))},
        "MLFLOW_TRACKING_URI": tracking_server,
    }
    processes = [
        subprocess.Popen(
            [
                str(BIN / "zhclip"),
                "register",
                "--model",
                str(model),
                "--model-name",
                NAME,
                "--metrics",
                str(_metrics(tmp_path, f"m{i}", 30.0 + i)),
                "--defaults",
            ],
            cwd=tmp_path,
            env=client_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, model in enumerate(tiny_models[1:])
    ]
    outputs = [process.communicate(timeout=600) for process in processes]
    assert all(p.returncode == 0 for p in processes), [err[-3000:] for _, err in outputs]
    summaries = [json.loads(out) for out, _ in outputs]
    assert sorted(s["version"] for s in summaries) == [2, 3]
    assert not any(s["promoted"] for s in summaries) and {s["champion_version"] for s in summaries} == {1}

    # The registry really lives in PostgreSQL, the weights really in the bucket.
    with psycopg2.connect(postgres_uri.replace("+psycopg2", "")) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT version FROM model_versions WHERE name = %s ORDER BY version", (NAME,))
        assert [row[0] for row in cursor.fetchall()] == [1, 2, 3]
        cursor.execute("SELECT alias, version FROM registered_model_aliases WHERE name = %s", (NAME,))
        aliases = dict(cursor.fetchall())
    assert aliases["champion"] == 1 and aliases["challenger"] in (2, 3)
    keys = [
        o["Key"]
        for page in _s3(s3_endpoint).get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
        for o in page.get("Contents", [])
    ]
    assert sum(key.endswith("/model.safetensors") for key in keys) == 3

    import mlflow

    from zhclip.components.core.tracking import using_tracking_uri

    with using_tracking_uri(tracking_server):  # the pull goes to the server; nothing stays set afterwards
        pulled = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    frame = pd.DataFrame({"text": ["红色的圆形在左上角", "蓝色十字在右下角"]})
    np.testing.assert_allclose(pulled.predict(frame), ZhclipEmbedder(str(tiny_models[0])).predict(frame), atol=1e-5)


# One racer: a process that registers once per round, each round a model name of its own. A round
# starts when every racer is ready for it (the racers' imports and earlier rounds end at different
# times); each gate is held between its read of the champion and its decision until all the
# registrations of the round have read (or `hold_s` passed): the interleaving in which gates without a
# lock both promote and the last writer wins. The racers take part in every round, so each pays its
# imports once; a racer that fails says so in `failed`, and the others stop waiting for it.
RACER = """
import json, os, sys, time
from pathlib import Path
from zhclip.components.registry import register as registration
rounds, uri = json.loads(sys.argv[1]), sys.argv[2]
count, hold_s, failed = int(sys.argv[3]), float(sys.argv[4]), Path(sys.argv[5])
def arrive(folder, wait_s):
    (Path(folder) / str(os.getpid())).touch()
    until = time.monotonic() + wait_s
    while len(os.listdir(folder)) < count and time.monotonic() < until and not failed.exists():
        time.sleep(0.05)
read_champion = registration._champion
try:
    for entry in rounds:
        def held(*args, barrier=entry["read"]):
            found = read_champion(*args)
            arrive(barrier, hold_s)
            return found
        registration._champion = held
        arrive(entry["start"], 300)
        config = registration.RegisterConfig(model_name=entry["name"], tracking_uri=uri)
        print(json.dumps(registration.register(entry["model"], entry["metrics"], config)), flush=True)
except BaseException:
    failed.touch()
    raise
"""
ROUNDS, RACERS = 3, 8


def _race_metrics(tmp_path: Path, name: str, value: float, start: float) -> Path:
    path = tmp_path / f"{name}.json"
    chain = [{"model": "start", "mean_recall": start}, {"model": "stage2", "mean_recall": value}]
    path.write_text(json.dumps({"mean_recall": value, "chain": chain}))
    return path


def _race_round(tmp_path: Path, tracking_server: str, number: int) -> list[dict]:
    """Round `number`'s model name, with a first version registered and champion, and for each racer
    its candidate (in this round's random order), model folder, metrics and barriers."""
    import random

    from zhclip.model import build_model, save_model

    name, folder = f"race-{number}", tmp_path / f"round{number}"
    first = save_model(*build_model("tiny", seed=100 * number), folder / "first")
    register(
        first, _race_metrics(folder, "first", 20.0, 10.0), RegisterConfig(model_name=name, tracking_uri=tracking_server)
    )
    # seven pass their own gate (30..36); the best value of all (40) is below its own start (45)
    candidates = [(30.0 + i, 10.0) for i in range(7)] + [(40.0, 45.0)]
    random.Random(number).shuffle(candidates)
    for barrier in ("start", "read"):
        (folder / barrier).mkdir()
    return [
        {
            "name": name,
            "model": str(save_model(*build_model("tiny", seed=100 * number + 1 + i), folder / f"m{i}")),
            "metrics": str(_race_metrics(folder, f"m{i}", value, start)),
            "start": str(folder / "start"),
            "read": str(folder / "read"),
        }
        for i, (value, start) in enumerate(candidates)
    ]


def test_eight_concurrent_registrations_leave_the_best_gated_candidate_champion(tracking_server, tmp_path):
    """8 registrations of one name at once, candidates in random order, every gate held open until
    all have read the champion, in 3 rounds (3 names, 3 orders): each round's champion ends on the best
    candidate that passed its own gate, and every version's recorded decision is true of the end state."""
    rounds = [_race_round(tmp_path, tracking_server, number) for number in range(ROUNDS)]
    client_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))},
        "MLFLOW_TRACKING_URI": tracking_server,
    }
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, json.dumps([entries[racer] for entries in rounds]), tracking_server,
             str(RACERS), "2", str(tmp_path / "failed")],
            cwd=tmp_path, env=client_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for racer in range(RACERS)
    ]  # fmt: skip
    try:
        outputs = [racer.communicate(timeout=900) for racer in racers]
    finally:
        for racer in racers:
            racer.kill()
    assert all(racer.returncode == 0 for racer in racers), [err[-3000:] for _, err in outputs]
    registered = [out.splitlines() for out, _ in outputs]
    assert all(len(lines) == ROUNDS for lines in registered), registered  # each racer in each round
    for entries in rounds:
        _assert_the_best_gated_candidate_is_champion(tracking_server, entries[0]["name"])


def _assert_the_best_gated_candidate_is_champion(tracking_server: str, name: str) -> None:
    from mlflow import MlflowClient

    from zhclip.components.core.tracking import using_tracking_uri

    with using_tracking_uri(tracking_server):
        client = MlflowClient()
        champion = str(client.get_registered_model(name).aliases["champion"])
        versions = {str(v.version): v for v in client.search_model_versions(f"name = '{name}'")}
        assert not client.search_registered_models(f"name = '{name}.gate-lock'")  # released
    assert len(versions) == 9
    values = {version: float(v.tags["metric.mean_recall"]) for version, v in versions.items()}
    assert values[champion] == 36.0, (
        f"{name}: champion is version {champion} ({values[champion]}), not the best gated 36.0"
    )
    for entry in versions.values():
        decision, rule = entry.tags["promotion"], entry.tags["promotion.rule"]
        candidate = float(entry.tags["promotion.candidate_value"])
        if rule == "start":
            assert candidate == 40.0 and decision.startswith("kept")
        elif decision.startswith("kept"):  # kept: a champion at least as good was there, and still is
            assert float(entry.tags["promotion.champion_value"]) > candidate and values[champion] > candidate
        else:  # promoted over the champion it read; nothing better than the final champion was promoted
            assert candidate <= values[champion]
            read = entry.tags["promotion.champion_version"]
            assert read == "None" or float(entry.tags["promotion.champion_value"]) == values[read]
