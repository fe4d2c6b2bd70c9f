"""`zhclip init`: the project it writes for a raw folder (the pipeline without the demo, every setting,
the choices first), and the raw folders it refuses before writing anything. docs/own-data.md's walks
run it end to end (tests/test_own_data_guide.py)."""

import shutil

import pytest
import yaml

from zhclip.components.core.errors import ZhclipError
from zhclip.components.core.settings import load_params, resolved_params
from zhclip.components.project.scaffold import CHOICES, init_project, repository_pipeline

from conftest import REPO, run_cli, run_tool


@pytest.fixture(scope="module")
def project(raw_dir, tmp_path_factory):
    """`zhclip init` on the small demo data (Chinese-CLIP format) with two settings chosen."""
    folder = tmp_path_factory.mktemp("init") / "my-clip"
    made = run_cli("init", str(folder), "--raw", str(raw_dir), "--set", "model.preset=tiny", "--set", "stage1.epochs=3")
    assert made.returncode == 0, made.stderr
    # what it prints: each split's format and files, then each choice with its value
    assert f"train  Chinese-CLIP: {raw_dir}/train_imgs.tsv and {raw_dir}/train_texts.jsonl" in made.stdout
    assert 'model.preset: "tiny"' in made.stdout and 'register.model_name: "my-clip"' in made.stdout
    return folder


def test_the_pipeline_is_the_repositorys_without_the_demo_on_the_users_raw_folder(project, raw_dir):
    ours = yaml.safe_load(repository_pipeline().read_text(encoding="utf-8"))["stages"]
    theirs = yaml.safe_load((project / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    assert sorted(theirs) == sorted(set(ours) - {"demo_data", "demo_towers"})
    for name, stage in theirs.items():
        body, original = stage.get("do", stage), ours[name].get("do", ours[name])
        assert " ".join(body["cmd"].split()) == " ".join(original["cmd"].split()).replace("data/raw", str(raw_dir))
        rest = {key: value for key, value in original.items() if key not in ("cmd", "deps")}
        assert {key: value for key, value in body.items() if key not in ("cmd", "deps")} == rest
        assert not [dep for dep in body["deps"] if dep.split("/")[0] in ("components", "model", "workflows")]
    assert theirs["ingest"]["deps"] == [str(raw_dir)]
    assert f"{raw_dir}/zeroshot/${{item.set}}" in theirs["zeroshot"]["deps"]


def test_params_hold_every_setting_with_the_choices_first(project, raw_dir):
    text = (project / "params.yaml").read_text(encoding="utf-8")
    params = load_params(project / "params.yaml")
    assert list(params)[: len(CHOICES)] == list(CHOICES)
    assert "demo_data" not in params and "demo_towers" not in params
    for section, (keys, _) in CHOICES.items():
        assert ", ".join(f"{section}.{key}" for key in keys) in text  # named in the header
    chosen = {
        "model": {"preset": "tiny"},
        "register": {"model_name": "my-clip"},
        "zeroshot": {"sets": ["digits", "shapes"]},
        "benchmark": {
            "suite": [
                {"name": "test", "task": "retrieval", "path": "data/validated", "split": "test"},
                {"name": "digits", "task": "zeroshot", "path": f"{raw_dir}/zeroshot/digits"},
                {"name": "shapes", "task": "zeroshot", "path": f"{raw_dir}/zeroshot/shapes"},
            ]
        },
    }
    expected = resolved_params(
        {**chosen, "start": params["start"], "search": params["search"], "stage1": {"epochs": 3}}
    )
    for section, values in params.items():
        if section in ("stage1", "stage2"):
            assert values.items() <= expected[section].items()
        else:
            assert values == expected[section], section
    assert params["start"]["source"] == "towers" and params["search"]["galleries"] == {"test": "data/validated/test"}


def test_the_project_is_a_git_and_dvc_repository(project):
    assert (project / ".dvc" / "config").is_file()
    assert (project / "weights" / "README.md").is_file()
    assert "ingest" in run_tool("dvc", "stage", "list", cwd=project)


def test_a_split_in_two_formats_is_refused_before_anything_is_written(raw_dir, tmp_path):
    raw = shutil.copytree(raw_dir, tmp_path / "raw")
    (raw / "valid.csv").write_text("text_id,text,image\n1,一只猫,cat.jpg\n", encoding="utf-8")
    with pytest.raises(ZhclipError) as refused:
        init_project(tmp_path / "project", str(raw))
    assert all(
        name in str(refused.value) for name in ("valid: the raw folder holds 2 formats", "valid_imgs.tsv", "valid.csv")
    )
    assert not (tmp_path / "project").exists()


def test_a_missing_split_a_bad_setting_and_an_existing_project_are_refused(raw_dir, tmp_path):
    raw = shutil.copytree(raw_dir, tmp_path / "raw")
    for name in ("test_imgs.tsv", "test_texts.jsonl"):
        (raw / name).unlink()
    with pytest.raises(ZhclipError, match=r"no test split: it needs test\.csv"):
        init_project(tmp_path / "a", str(raw))
    with pytest.raises(ZhclipError, match=r"unknown keys \['presett'\]"):
        init_project(tmp_path / "b", str(raw_dir), ["model.presett=tiny"])
    with pytest.raises(ZhclipError, match="expected section.key=value"):
        init_project(tmp_path / "c", str(raw_dir), ["preset=tiny"])
    with pytest.raises(ZhclipError, match="already holds dvc.yaml and params.yaml"):
        init_project(REPO, str(raw_dir))


def test_a_raw_folder_inside_the_project_is_named_relative_to_it(raw_dir, tmp_path):
    shutil.copytree(raw_dir, tmp_path / "my-clip" / "data" / "raw")
    made = init_project(tmp_path / "my-clip", str(tmp_path / "my-clip" / "data" / "raw"), ["zeroshot.sets=[]"])
    assert made["raw"] == "data/raw"
    assert made["choices"]["zeroshot.sets"] == []
    assert made["choices"]["benchmark.suite"] == [
        {"name": "test", "task": "retrieval", "path": "data/validated", "split": "test"}
    ]
    stages = yaml.safe_load((tmp_path / "my-clip" / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    assert stages["ingest"]["cmd"].startswith("zhclip ingest --raw data/raw ")
