"""`zhclip init`: a DVC project for your own data, apart from the demo.

The project runs this repository's pipeline (its dvc.yaml) without the demo's stages (`demo_data`,
`demo_towers`), on the raw folder the user names, and without the code dependencies (the project
holds no zhclip code: the installed zhclip runs its stages). Its params.yaml lists every setting at
the code's default, with the ones a user must choose first and named in its header. The raw folder
is checked before anything is written: every split in exactly one format (docs/own-data.md).
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from zhclip.components.core.errors import ZhclipError
from zhclip.components.core.settings import OVERLAYS, parse_settings, resolved_params
from zhclip.components.core.storage import Folder

DEMO_STAGES = ("demo_data", "demo_towers")
DEMO_RAW = "data/raw"
# What a user must choose, first in params.yaml: each section, the keys to set in it, and why.
CHOICES = {
    "start": (
        ("source", "vision", "text", "checkpoint"),
        "your towers or a Chinese-CLIP checkpoint (docs/starting-weights.md)",
    ),
    "model": (("preset",), "the architecture, matching the starting weights (docs/models.md)"),
    "register": (("model_name",), "the MLflow registry name your models go under (the search service's too)"),
    "zeroshot": (("sets",), "the class folders under the raw folder's zeroshot/ to score ([]: none)"),
    "benchmark": (("suite",), "the datasets every model is scored on (docs/evaluation.md#the-benchmark-suite)"),
    "search": (("galleries",), "the galleries the index stages embed ({}: none)"),
}
# The paper's recipe: stage 1 from pretrained towers of ViT-B-16's size, which the user puts here.
PAPER_START = {"source": "towers", "vision": "weights/vision", "text": "weights/text"}
GITIGNORE = (
    "# what runs write beside the pipeline (DVC adds its outputs itself)\n/ray_results/\n/mlflow.db\n/mlruns/\n/logs/\n"
)
WEIGHTS_README = (
    "Put the starting weights here and track them with `dvc add` (or `dvc import`): every file under\n"
    "weights/ is a dependency of the `start` stage. params.yaml's `start` section names them\n"
    "(docs/starting-weights.md).\n"
)


def _package_folder(package: str) -> Path:
    """The repository folder of an installed zhclip package, found without importing it (the project
    capability sits below the packages it names: workflows, the model)."""
    from importlib.util import find_spec

    spec = find_spec(package)
    if spec is None or spec.origin is None:
        raise ZhclipError(f"{package} is not installed: install zhclip from its clone (`make install`)")
    return Path(spec.origin).resolve().parent


def repository_pipeline() -> Path:
    """The dvc.yaml of the zhclip repository this package was installed from (`pip install -e`)."""
    path = _package_folder("zhclip.components").parent / "dvc.yaml"
    if not path.is_file():
        raise ZhclipError(
            f"zhclip init reads the pipeline from the zhclip repository it was installed from, and {path} "
            "is not there: install zhclip from its clone (`make install`, docs/installation.md)"
        )
    return path


def _code_folders() -> set[str]:
    """The repository's folders that hold zhclip's code (dvc.yaml's code dependencies)."""
    return {_package_folder(f"zhclip.{name}").name for name in ("components", "model", "workflows")}


def _is_code(dep: str, code: set[str]) -> bool:
    return dep.split("/", 1)[0] in code


def _on_raw(text: str, raw: str) -> str:
    """`text` (a command or a path) reading the project's raw folder instead of the demo's."""
    return text.replace(DEMO_RAW, raw)


def _stage(stage: dict, raw: str, code: set[str]) -> dict:
    """A stage of the repository's pipeline for a project: on `raw`, without code dependencies."""
    body = stage.get("do", stage)
    body = {
        **body,
        "cmd": _on_raw(body["cmd"], shlex.quote(raw)),
        "deps": [_on_raw(dep, raw) for dep in body.get("deps", []) if not _is_code(dep, code)],
    }
    return {**stage, "do": body} if "do" in stage else body


def project_pipeline(raw: str) -> dict:
    """The repository's dvc.yaml for a project on the raw folder `raw`: no demo stages, no code deps."""
    pipeline = yaml.safe_load(repository_pipeline().read_text(encoding="utf-8"))
    code = _code_folders()
    stages = {name: _stage(stage, raw, code) for name, stage in pipeline["stages"].items() if name not in DEMO_STAGES}
    return {**pipeline, "stages": stages}


def _defaults() -> dict[str, dict[str, Any]]:
    """Every section but the demo's at the code's defaults; a stage overlay (stage1, stage2) lists the
    train settings the repository's params.yaml sets per stage, so `dvc exp run -S stage1.epochs=...`
    finds them."""
    repository = yaml.safe_load(repository_pipeline().with_name("params.yaml").read_text(encoding="utf-8"))
    return {
        section: {key: values[key] for key in repository[section]} if section in OVERLAYS else values
        for section, values in resolved_params({}).items()
        if not section.startswith("demo_")
    }


def zeroshot_sets(raw: Folder) -> list[str]:
    """The class-folder sets under the raw folder's zeroshot/, by name."""
    from pyarrow import fs

    if raw.kind("zeroshot") != fs.FileType.Directory:
        return []
    listing = raw.filesystem.get_file_info(fs.FileSelector(raw.path("zeroshot")))
    return sorted(info.base_name for info in listing if info.type == fs.FileType.Directory)


def project_params(name: str, raw: str, sets: list[str], chosen: dict[str, dict]) -> dict[str, dict]:
    """Every section but the demo's, at the code's defaults, with the choices a project starts from
    (the paper's start, ViT-B-16, `name` in the registry, the raw folder's zero-shot sets, a suite of
    the test split and those sets, the test split's gallery), then `chosen`, checked against the
    settings like any params.yaml."""
    params = _defaults()
    params["start"].update(PAPER_START)
    params["model"]["preset"] = "ViT-B-16"
    params["register"]["model_name"] = name
    params["zeroshot"]["sets"] = sets
    params["search"]["galleries"] = {"test": "data/validated/test"}
    for section, values in chosen.items():
        if section not in params:
            raise ZhclipError(f"--set {section}.…: no section '{section}'; known: {sorted(params)}")
        params[section].update(values)
    if "suite" not in chosen.get("benchmark", {}):  # the test split and the zero-shot sets as chosen
        params["benchmark"]["suite"] = [
            {"name": "test", "task": "retrieval", "path": "data/validated", "split": "test"},
            *(
                {"name": name, "task": "zeroshot", "path": f"{raw}/zeroshot/{name}"}
                for name in params["zeroshot"]["sets"]
            ),
        ]
    resolved_params(params)  # checked as any params.yaml is: an unknown key or a bad value fails here
    return {section: params[section] for section in [*CHOICES, *(s for s in params if s not in CHOICES)]}


def raw_formats(raw: Folder) -> dict[str, str]:
    """Each split's format and files in the raw folder; a split in none or in two formats is refused."""
    from pyarrow import fs

    from zhclip.components.data.img2dataset import shards
    from zhclip.components.data.ingest import one_format
    from zhclip.components.data.schema import SPLITS

    if raw.kind() != fs.FileType.Directory:
        raise ZhclipError(f"--raw {raw.uri}: no such folder")
    formats = {}
    for split in SPLITS:
        found = one_format(raw, split, shards(raw, split))
        if not found:
            raise ZhclipError(
                f"{raw.name('')}: no {split} split: it needs {split}.csv (and its images), {split}_imgs.tsv "
                f"and {split}_texts.jsonl, or img2dataset's output in {split}/ (docs/own-data.md)"
            )
        formats[split] = "{}: {}".format(*next(iter(found.items())))
    return formats


def _raw_in_project(raw: str, folder: Path) -> str:
    """How the project names its raw folder: s3:// as given, a folder inside the project relative to
    it (the project moves with its data), any other absolute."""
    if raw.startswith("s3://"):
        return raw.rstrip("/")
    path = Path(raw).resolve()
    return path.relative_to(folder).as_posix() if path.is_relative_to(folder) else str(path)


def _params_text(params: dict[str, dict], raw: str) -> str:
    header = [
        f"# A zhclip project on {raw}, written by `zhclip init`. Choose these before `dvc repro`",
        "# (docs/own-data.md); they come first below:",
        *[f"#   {', '.join(f'{section}.{key}' for key in keys)}: {why}" for section, (keys, why) in CHOICES.items()],
        "# Every other setting is the code's default: docs/configuration.md says what each does.",
        "# `dvc exp run -S section.key=value` runs a variant.",
    ]
    body = yaml.safe_dump(params, allow_unicode=True, sort_keys=False, width=100)
    return "\n".join(header) + "\n" + body


def _init_repositories(folder: Path) -> None:
    """`git init` (unless the folder is in a repository already) and `dvc init`."""
    inside = subprocess.run(
        ["git", "rev-parse", "--show-toplevel"], cwd=folder, capture_output=True, text=True, check=False
    )
    if inside.returncode != 0:
        subprocess.run(["git", "init", "-q"], cwd=folder, check=True)
    top = Path(inside.stdout.strip()).resolve() if inside.returncode == 0 else folder
    if not (folder / ".dvc").is_dir():
        subdir = ["--subdir"] if top != folder else []
        subprocess.run([sys.executable, "-m", "dvc", "init", "-q", *subdir], cwd=folder, check=True)


def init_project(folder: str | Path, raw: str, settings: list[str] | None = None) -> dict:
    """Write a DVC project into `folder` for the raw data at `raw` (a folder or s3:// prefix):
    dvc.yaml, params.yaml, .gitignore, weights/README.md, and git and DVC set up. Refuses to write
    over a project; returns what it wrote and what the raw folder holds."""
    folder = Path(folder).resolve()
    taken = [name for name in ("dvc.yaml", "params.yaml") if (folder / name).exists()]
    if taken:
        raise ZhclipError(f"{folder} already holds {' and '.join(taken)}: choose an empty folder for a new project")
    location = _raw_in_project(raw, folder)
    raw_folder = Folder(raw if raw.startswith("s3://") else Path(raw).resolve())
    formats = raw_formats(raw_folder)
    params = project_params(folder.name, location, zeroshot_sets(raw_folder), parse_settings(settings or []))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "weights").mkdir(exist_ok=True)
    (folder / "weights" / "README.md").write_text(WEIGHTS_README, encoding="utf-8")
    (folder / ".gitignore").write_text(GITIGNORE, encoding="utf-8")
    pipeline = project_pipeline(location)
    (folder / "dvc.yaml").write_text(
        f"# The zhclip pipeline on {location}, written by `zhclip init` (docs/dvc.md).\n"
        + yaml.safe_dump(pipeline, allow_unicode=True, sort_keys=False, width=100),
        encoding="utf-8",
    )
    (folder / "params.yaml").write_text(_params_text(params, location), encoding="utf-8")
    _init_repositories(folder)
    return {
        "project": str(folder),
        "raw": location,
        "splits": formats,
        "stages": list(pipeline["stages"]),
        "choices": {f"{section}.{key}": params[section][key] for section, (keys, _) in CHOICES.items() for key in keys},
    }
