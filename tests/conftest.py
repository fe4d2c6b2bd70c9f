"""Shared fixtures: tiny demo data, its prepared shards, and a two-stage trained model.

Everything is built locally on the fly; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

REPO = Path(__file__).resolve().parents[1]
# A demo dataset small enough for the tests that run whole pipelines (96 shapes, no digit scans in a split).
SMALL_DEMO_DATA = dict(
    train_images=96,
    valid_images=8,
    test_images=24,
    captions_per_image=2,
    train_digits=0,
    valid_digits=0,
    test_digits=0,
    zeroshot_per_class=1,
    unseen_images=8,
    unseen_digits=0,
)
BIN = Path(sys.executable).parent


def package_dirs() -> dict[str, Path]:
    """Installed package -> repository folder, from pyproject.toml's package-dir: "zhclip.model" -> REPO/model."""
    import tomllib

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    return {name: REPO / folder for name, folder in pyproject["tool"]["setuptools"]["package-dir"].items() if name}


def _modules_missing_from_the_install() -> list[str]:
    """The package's files the editable install does not link yet: it links each file (setuptools'
    strict mode), so a module added since the last `make install` does not import."""
    import zhclip

    trees = [Path(folder) for folder in zhclip.__path__]
    missing = []
    for package, folder in package_dirs().items():
        for source in folder.rglob("*.py"):
            linked = Path(*package.split(".")[1:]) / source.relative_to(folder)
            if "__pycache__" not in source.parts and not any((tree / linked).is_file() for tree in trees):
                missing.append(str(source.relative_to(REPO)))
    return missing


_NOT_INSTALLED = _modules_missing_from_the_install()
if _NOT_INSTALLED:
    pytest.exit(f"not in the editable install yet: {_NOT_INSTALLED}; run `make install`", 2)


# `make test` runs the suite on two pytest-xdist workers (--dist loadgroup; TEST_WORKERS=0 for one
# process): on 2 vCPU one process left the CPUs idle two thirds of the time, waiting on subprocesses,
# servers and Ray's start. A work unit is a test module, so each module-scoped fixture (a Ray
# cluster, an S3 or MLflow server) is built once; the costly session fixtures are built once for both
# workers (`built_once`). Units go out longest first, as tests/module_seconds.json measured them (a
# module it does not list first of all: it may be long), so that no long unit is left to run alone
# at the end while the other worker has finished. The file's source: the junit.xml of
# test-runs/2026-12-07-cpu-ci-run-lazy-imports/. The cost of this order: the heaviest modules run
# side by side first, each slower for it (test-runs/2026-12-07-cpu-ci-run-shared-fixtures/README.md).
# One exception: the first unit builds `small_project` (3 minutes, about one core: `dvc repro` runs a
# stage at a time), so the second, which the other worker starts with, is the longest one that does
# not wait for it.
MODULE_SECONDS = json.loads((Path(__file__).with_name("module_seconds.json")).read_text(encoding="utf-8"))


def _module(item: pytest.Item) -> str:
    return item.nodeid.split("::")[0]


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups (registered after this file)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_module(item)))
    # in collection order before sorting (not a set's, which differs between processes): every xdist
    # worker must collect the same list in the same order
    collected = dict.fromkeys(_module(item) for item in items)
    modules = sorted(collected, key=lambda module: -MODULE_SECONDS.get(module, float("inf")))
    waiting = {_module(item) for item in items if "small_project" in getattr(item, "fixturenames", ())}
    if modules and modules[0] in waiting:
        second = next((module for module in modules if module not in waiting), None)
        if second:
            modules.remove(second)
            modules.insert(1, second)
    place = {module: number for number, module in enumerate(modules)}
    items.sort(key=lambda item: place[_module(item)])


# Generated inputs (Hypothesis): `ci` runs a few thousand examples per cheap property in CI time;
# ZHCLIP_HYPOTHESIS_PROFILE=nightly ten times as many. Slow properties ask for fewer_examples(n).
for _profile, _examples in {"ci": 2000, "nightly": 20000}.items():
    settings.register_profile(
        _profile,
        max_examples=_examples,
        deadline=None,  # a shared 2-core CI runner has slow spells; a deadline would flag them, not bugs
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
settings.load_profile(os.environ.get("ZHCLIP_HYPOTHESIS_PROFILE", "ci"))


def fewer_examples(divisor: int) -> int:
    """The profile's example count divided by `divisor`, for properties that cost a whole step each."""
    return max(1, settings().max_examples // divisor)


# Ray, MLflow and DVC experiments must not depend on the caller's global setup.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("GIT_AUTHOR_NAME", "zhclip tests")
os.environ.setdefault("GIT_AUTHOR_EMAIL", "tests@zhclip.invalid")
os.environ.setdefault("GIT_COMMITTER_NAME", "zhclip tests")
os.environ.setdefault("GIT_COMMITTER_EMAIL", "tests@zhclip.invalid")
os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(autouse=True)
def no_tracking_uri_left_behind():
    """MLflow exports the tracking URI it is given to the environment; a test that leaves one behind
    would send every later test's runs to a server that is gone."""
    yield
    leaked = {
        name: os.environ.pop(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI") if name in os.environ
    }
    assert not leaked, f"this test left {leaked} in the environment"


@pytest.fixture
def seven_passes(monkeypatch) -> None:
    """Every whole-split query of the data steps runs in seven hash-partitioned passes, whatever the
    rows (instead of one below millions of rows), so a tiny split goes through the passes and their merge."""
    from zhclip.components.data.spill import Spill

    monkeypatch.setattr(Spill, "passes", lambda self, rows: 7)


def run_cli(
    *args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run the installed `zhclip` command; output captured as text."""
    return subprocess.run(
        [str(BIN / "zhclip"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def run_tool(*args: str, cwd: Path, timeout: int = 900, with_stderr: bool = False) -> str:
    """Run a command with this environment's tools (zhclip, dvc) first on PATH; fails the test on error.
    Returns its stdout (followed by its stderr: progress bars, notes, with `with_stderr`)."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    result = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr if with_stderr else result.stdout


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).close()
    except urllib.error.HTTPError:
        return True  # an HTTP error status is still a server answering
    except OSError:
        return False
    return True


@contextmanager
def running(args: list[str], ready_url: str, log: Path, timeout: float = 120, **popen) -> Iterator[subprocess.Popen]:
    """Run a server (in its own process group, so its workers stop with it) until the block ends.

    Waits at most `timeout` seconds for `ready_url` to answer; fails the test with the server's log otherwise.
    """
    with open(log, "wb") as out:
        server = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **popen)
    try:
        deadline = time.monotonic() + timeout
        while not _answers(ready_url):
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"{Path(args[0]).name} did not answer {ready_url} within {timeout} s:\n"
                    f"{log.read_text(errors='replace')[-3000:]}"
                )
            time.sleep(0.5)
        yield server
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=10)


@contextmanager
def serving(args: list[str], log: Path, timeout: float = 120, **popen) -> Iterator[str]:
    """`zhclip serve <args>` on a free port until the block ends; yields its base URL once /readyz answers 200."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with running([str(BIN / "zhclip"), "serve", *args, "--port", str(port)], f"{base}/healthz", log, timeout, **popen):
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{base}/readyz", timeout=5).close()
                break
            except OSError:  # 503 while loading, as an HTTPError
                assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
                time.sleep(0.5)
        yield base


def caption_recall_at_10(base: str, pairs) -> float:
    """The percentage of a split's captions (`read_pairs` rows grouped by text) with one of their images
    among the server's top 10: `zhclip evaluate`'s text-to-image R@10, asked over HTTP."""
    import json
    import urllib.parse

    positives = pairs.groupby("text_id").agg(
        text=("text", "first"), images=("image_id", lambda ids: {str(i) for i in ids})
    )
    hits = 0
    for text, images in zip(positives["text"], positives["images"]):
        with urllib.request.urlopen(
            f"{base}/api/search?" + urllib.parse.urlencode({"q": text, "k": 10}), timeout=60
        ) as response:
            hits += bool(images & {result["id"] for result in json.load(response)["results"]})
    return 100 * hits / len(positives)


S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory) -> Iterator[str]:
    """A loopback S3 server (moto_server) for this module's tests."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with running([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], f"http://127.0.0.1:{port}/", log, 30):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def shared_ray() -> Iterator[None]:
    """One local Ray (2 CPUs) for a module's in-process data steps, as Ray's testing guide advises: each
    step's `ray_runtime()` joins it instead of starting and stopping its own, about 6 s and 4 CPU-s
    each (bench/investigations/2026-12-07-ray-start). Not for training, which asks for more CPUs."""
    from zhclip.components.core.cluster import ray_runtime

    with ray_runtime(2):
        yield


def copy_project(root: Path) -> Path:
    """The pipeline files of this repository (dvc.yaml, params, code, DVC config) in a new git repo."""
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    # every code folder of the package (pyproject.toml's package-dir): dvc.yaml's stages depend on them
    for folder in sorted({folder.relative_to(REPO) for folder in package_dirs().values()}):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (root / ".dvc").mkdir()
    for name in ("config", ".gitignore"):
        shutil.copy(REPO / ".dvc" / name, root / ".dvc" / name)
    run_tool("git", "init", "-q", cwd=root)
    return root


def update_params(project: Path, changes: dict[str, dict]) -> None:
    """Change settings in a project's params.yaml: each section given is updated with its values."""
    import yaml

    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text(encoding="utf-8"))
    for section, values in changes.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False), encoding="utf-8")


# The settings of the `small_project` fixture: the small demo data, quick stand-in towers, one epoch
# per stage, one zero-shot set (a stage per set and model in every pipeline run; the real demo's two
# sets are the dvc.yaml tests' and the demo's), and a benchmark suite of one retrieval dataset and one
# zero-shot set for the final model only (the demo's suite: 3 models x 4 datasets). Stage 2 checkpoints
# every 2 of its 6 steps and a killed registration holds the gate 10 s, for tests/test_pipeline_kill.py.
SMALL_PROJECT_PARAMS = {
    "demo_data": {**SMALL_DEMO_DATA, "pretrain_images": 40},
    "demo_towers": {"clip_steps": 20, "mlm_steps": 20},
    "stage1": {"epochs": 1},
    "stage2": {"epochs": 1, "checkpoint_every": 2},
    "train": {"batch_size": 32},
    "register": {"lock_lease_s": 10.0},
    "zeroshot": {"sets": ["shapes"]},
    "benchmark": {
        "models": ["stage2"],
        "suite": [
            {"name": "demo-unseen", "task": "retrieval", "path": "data/raw/benchmark/unseen"},
            {"name": "shapes", "task": "zeroshot", "path": "data/raw/zeroshot/shapes"},
        ],
    },
}


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """The folder `name` that `build(folder)` fills once for the whole run: the first worker to ask
    builds it, under a file lock, and the other waits for it (pytest-xdist's way to build a session
    fixture once). Tests read it, or change a `copy_of` it. A build that failed is tried again."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the run's, every worker's
    folder, built = shared / name, shared / f"{name}.built"
    with FileLock(str(shared / f"{name}.lock")):
        if not built.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            built.touch()
    return folder


def _build_small_project(project: Path) -> None:
    copy_project(project)
    update_params(project, SMALL_PROJECT_PARAMS)
    log = project / "logs" / "dvc-repro.log"  # what `make demo` would have shown (logs/ is not committed)
    log.parent.mkdir()
    log.write_text(run_tool("dvc", "repro", "--quiet", cwd=project, with_stderr=True), encoding="utf-8")
    run_tool("git", "add", "-A", cwd=project)
    run_tool("git", "commit", "-qm", "small project, reproduced", cwd=project)


@pytest.fixture(scope="session")
def small_project(tmp_path_factory) -> Path:
    """The project on SMALL_PROJECT_PARAMS where `dvc repro` ran once and everything was committed.

    Built once for the tests that compare with a whole pipeline run or change one and re-run it; a test
    that changes its files, or runs a step in it, works on `copy_of(small_project, ...)`: both workers
    share it. MLflow (./mlflow.db) and Ray checkpoints (./ray_results) are inside the project, so every
    copy has its own. The console output of `dvc repro --quiet` (as `make demo` runs it) is in
    ./logs/dvc-repro.log.
    """
    return built_once(tmp_path_factory, "small_project", _build_small_project)


def _reproduced(root: Path) -> bool:
    """Every stage of `root` ran with its current code, params and data, and its outputs are there."""
    status = subprocess.run(
        [str(BIN / "dvc"), "status", "--json"], cwd=root, capture_output=True, text=True, timeout=300
    )
    return status.returncode == 0 and json.loads(status.stdout or "{}") == {}


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> Path:
    """A project where the demo's `dvc repro --quiet` (as `make demo`) ran: the repository's own
    workspace when it is reproduced, else a scratch copy where it runs now (once per session).
    Tests only read it."""
    if (REPO / "metrics" / "evaluate_stage2.json").is_file() and _reproduced(REPO):
        return REPO
    root = copy_project(tmp_path_factory.mktemp("demo"))
    run_tool("git", "add", "-A", cwd=root)
    run_tool("git", "commit", "-qm", "project", cwd=root)
    run_tool("dvc", "repro", "--quiet", cwd=root, timeout=1500)
    return root


def copy_of(project: Path, root: Path) -> Path:
    """A copy of a project (git history, DVC cache, MLflow store and all) that a test may change.
    DVC's own scratch folder stays behind: its lock files are the original's, which another test may
    hold while it runs `dvc` there."""
    return Path(shutil.copytree(project, root / project.name, symlinks=True, ignore=_dvc_scratch))


def _dvc_scratch(folder: str, names: list[str]) -> list[str]:
    return ["tmp"] if Path(folder).name == ".dvc" else []


@pytest.fixture(scope="session")
def raw_dir(tmp_path_factory) -> Path:
    """The small demo data (SMALL_DEMO_DATA), as `zhclip demo-data` writes it."""
    from zhclip.components.demo.data import DemoDataConfig, generate_demo_data

    return built_once(tmp_path_factory, "raw", lambda out: generate_demo_data(out, DemoDataConfig(**SMALL_DEMO_DATA)))


@pytest.fixture(scope="session")
def prepared_dir(raw_dir, tmp_path_factory) -> Path:
    """`raw_dir` ingested, in shards of 50 rows."""
    from zhclip.components.data.ingest import IngestConfig, ingest

    return built_once(tmp_path_factory, "prepared", lambda out: ingest(raw_dir, out, IngestConfig(shard_rows=50)))


def _train_both_stages(prepared_dir: Path, root: Path) -> None:
    from zhclip.components.training.config import TrainConfig
    from zhclip.components.training.runner import train

    common = {
        "epochs": 2,
        "batch_size": 32,
        "storage_path": str(root / "ray"),
        "warmup_steps": 2,
        "checkpoint_every": 4,
        "tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
    }
    train(
        prepared_dir,
        root / "stage1",
        TrainConfig(stage=1, lr=1e-3, **common),
        summary_path=root / "stage1.json",
        history_csv=root / "stage1.csv",
    )
    train(
        prepared_dir,
        root / "stage2",
        TrainConfig(stage=2, lr=5e-4, **common),
        init_dir=root / "stage1",
        summary_path=root / "stage2.json",
    )


@pytest.fixture(scope="session")
def trained(prepared_dir, tmp_path_factory) -> dict:
    """Both stages trained with Ray Train on the tiny data (two epochs each): the folder, and each
    stage's summary as train() returned and wrote it."""
    from zhclip.components.core.summaries import read_summary

    root = built_once(tmp_path_factory, "trained", lambda root: _train_both_stages(prepared_dir, root))
    return {"root": root, **{stage: read_summary(root / f"{stage}.json") for stage in ("stage1", "stage2")}}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> list[Path]:
    """Three untrained tiny-preset model folders with different weights (seeds 0, 1, 2), built in seconds."""
    from zhclip.model import build_model, save_model

    root = tmp_path_factory.mktemp("tiny_models")
    return [save_model(*build_model("tiny", seed=seed), root / f"seed{seed}") for seed in range(3)]
