"""The `zhclip` command line: help for every step, and bad input ends in one clear line, exit 2."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from zhclip.components.demo.data import DemoDataConfig

from conftest import run_cli

COMMANDS = [
    "demo-data",
    "ingest",
    "validate",
    "train",
    "evaluate",
    "zeroshot",
    "register",
    "embed",
    "index",
    "serve",
    "results",
]


def test_top_level_help_lists_every_step():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in COMMANDS + ["pipeline"]:
        assert command in result.stdout


@pytest.mark.parametrize(
    "command, option",
    [
        (["demo-data"], "--train-images"),
        (["ingest"], "--shard-rows"),
        (["validate"], "--quarantine"),
        (["train"], "--stage"),
        (["evaluate"], "--model"),
        (["evaluate"], "--image-feats"),
        (["zeroshot"], "--images"),
        (["register"], "--metrics"),
        (["embed"], "--image"),
        (["index"], "--gallery"),
        (["index"], "--workers"),
        (["serve"], "--index"),
        (["pipeline", "compile"], "--out"),
        (["pipeline", "run-local"], "--root"),
        (["pipeline", "submit"], "--ray-address"),
    ],
)
def test_each_command_explains_its_options(command, option):
    result = run_cli(*command, "--help")
    assert result.returncode == 0 and option in result.stdout


def _assert_clean_error(result, *fragments):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def _in_process(capsys, monkeypatch):
    """`zhclip <args>` through the same entry point as the installed command, in this process: nine
    commands in a row would otherwise pay nine interpreter starts (4 s each on 2 vCPU x86)."""
    from zhclip.components.cli import main

    def run(*args: str) -> subprocess.CompletedProcess:
        monkeypatch.setattr(sys, "argv", ["zhclip", *args])
        with pytest.raises(SystemExit) as exit:
            main()
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, exit.value.code, out.out, out.err)

    return run


def test_bad_input_gives_a_clear_error_at_every_step(tmp_path, prepared_dir, capsys, monkeypatch):
    zhclip = _in_process(capsys, monkeypatch)
    _assert_clean_error(
        zhclip("ingest", "--raw", str(tmp_path / "nope"), "--out", str(tmp_path / "o")),
        "error: raw data folder",
        "nope",
    )
    _assert_clean_error(zhclip("validate", "--data", str(tmp_path)), "no Parquet shards in", "zhclip ingest")
    _assert_clean_error(
        zhclip("train", "--stage", "2", "--data", str(prepared_dir), "--out", str(tmp_path / "m")),
        "stage 2 starts from stage 1",
    )
    _assert_clean_error(zhclip("evaluate", "--model", str(tmp_path), "--data", str(prepared_dir)), "cannot load model")
    _assert_clean_error(
        zhclip("register", "--model", str(tmp_path), "--metrics", str(tmp_path / "m.json")),
        "not a trained model folder",
    )
    _assert_clean_error(
        zhclip("embed", "--model", str(tmp_path), "--image", str(tmp_path / "cat.png")),
        "image file",
        "cat.png",
        "not found",
    )
    _assert_clean_error(
        zhclip("index", "--gallery", str(tmp_path), "--out", "a", "--publish", "b"), "exactly one of --out"
    )
    _assert_clean_error(
        zhclip("serve", "--follow", "models:/zhclip-demo/3"), "--follow 'models:/zhclip-demo/3': give a registry alias"
    )
    _assert_clean_error(
        zhclip("serve", "--follow", "models:/m@champion", "--model", str(tmp_path)), "--model", "--follow", "not both"
    )
    (tmp_path / "params.yaml").write_text("ingest:\n  shard_rowz: 3\n")
    _assert_clean_error(zhclip("ingest", "--params", str(tmp_path / "params.yaml")), "section 'ingest'", "shard_rowz")
    _assert_clean_error(
        zhclip("ingest", "--set", "ingest.shard_rows"), "--set 'ingest.shard_rows'", "section.key=value"
    )
    _assert_clean_error(zhclip("ingest", "--set", "ingestt.shard_rows=3"), "no section 'ingestt'")
    usage = zhclip("train", "--stage", "3", "--out", str(tmp_path))
    assert usage.returncode == 2 and "Traceback" not in usage.stderr and "--stage" in usage.stderr


def test_demo_data_and_ingest_from_the_command_line(tmp_path):
    result = run_cli(
        "demo-data",
        "--out",
        str(tmp_path / "raw"),
        "--train-images",
        "10",
        "--test-images",
        "5",
        "--summary",
        str(tmp_path / "s.json"),
        "--defaults",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    defaults = DemoDataConfig()
    assert json.loads((tmp_path / "s.json").read_text())["splits"]["test"]["images"] == 5 + defaults.test_digits
    result = run_cli(
        "ingest", "--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "prepared"), "--defaults", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert (
        json.loads(result.stdout)["splits"]["train"]["pairs"]
        == (10 + defaults.train_digits) * defaults.captions_per_image
    )


def test_embed_prints_unit_embeddings_and_similarities(trained, tmp_path):
    image = tmp_path / "red.png"
    Image.new("RGB", (64, 64), "red").save(image)
    result = run_cli(
        "embed",
        "--model",
        str(trained["root"] / "stage2"),
        "--text",
        "红色的圆形",
        "--text",
        "蓝色十字",
        "--image",
        str(image),
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r.get("text") or r.get("image") for r in records[:3]] == ["红色的圆形", "蓝色十字", str(image)]
    for record in records[:3]:
        assert abs(sum(x * x for x in record["embedding"]) - 1) < 1e-4
    assert len(records) == 5 and all(-1 <= r["cosine"] <= 1 for r in records[3:])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    _assert_clean_error(
        run_cli("embed", "--model", str(trained["root"] / "stage2"), "--image", str(broken)),
        "broken.png",
        "not a decodable image",
    )


def test_version_is_the_one_pyproject_declares(capsys, monkeypatch):
    import tomllib

    from conftest import REPO

    declared = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    result = _in_process(capsys, monkeypatch)("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"zhclip {declared}"


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_training_and_scoring_read_the_rows_that_passed_validation_by_default(command, capsys, monkeypatch):
    import click
    import typer

    from zhclip.components.cli import app

    group = typer.main.get_command(app)
    (data,) = [p for p in group.commands[command].params if p.name == "data"]
    assert str(data.default) == "data/validated"  # what dvc.yaml's stages read: the gate is not skipped
    assert "data/validated" in click.unstyle(_in_process(capsys, monkeypatch)(command, "--help").stdout)
