"""The code's shape: the layering contract of pyproject.toml ([tool.importlinter], run by `make lint`)
holds, and fails naming the import when a copy of the code adds one that breaks it; no product
function is over 80 lines."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint_imports(code_root: Path | None = None) -> subprocess.CompletedProcess:
    """lint-imports with the repository's contracts, over the installed zhclip or, first on the path,
    a copy of its packages under `code_root/zhclip/`."""
    env = {**os.environ, "PYTHONPATH": str(code_root)} if code_root else None
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--config", str(REPO / "pyproject.toml")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=code_root or REPO,
    )


def _code_with(tmp_path: Path, module: str, line: str) -> Path:
    """A copy of zhclip's packages where `module` (a path under the copy) starts with `line`."""
    for package, folder in {"model": "model", "components": "components", "workflows": "workflows"}.items():
        shutil.copytree(REPO / folder, tmp_path / "zhclip" / package, ignore=shutil.ignore_patterns("__pycache__"))
    source = tmp_path / "zhclip" / module
    source.write_text(f"{line}\n{source.read_text(encoding='utf-8')}", encoding="utf-8")
    return tmp_path


def test_the_code_keeps_its_layers():
    checked = _lint_imports()
    assert checked.returncode == 0, checked.stdout[-3000:]
    assert "2 kept, 0 broken" in checked.stdout


@pytest.mark.parametrize(
    ("module", "line", "named"),
    [
        ("model/loss.py", "import zhclip.components.core.errors", "zhclip.model.loss -> zhclip.components.core.errors"),
        (
            "components/evaluation/report.py",
            "from zhclip.components.search import index_store",
            "zhclip.components.evaluation.report -> zhclip.components.search.index_store",
        ),
        (
            "components/data/decode.py",
            "from zhclip.components.data.ingest import IngestConfig",
            "zhclip.components.data.decode -> zhclip.components.data.ingest",
        ),
    ],
    ids=["model-imports-core", "evaluation-imports-search", "decode-imports-ingest"],
)
def test_an_import_against_the_layers_fails_naming_it(tmp_path, module, line, named):
    checked = _lint_imports(_code_with(tmp_path, module, line))
    assert checked.returncode == 1 and "1 broken" in checked.stdout
    assert named in " ".join(checked.stdout.split()), checked.stdout[-3000:]


def test_no_function_in_the_product_code_is_over_80_lines():
    """One job per function: a function past 80 lines does several (docs/design.md)."""
    import ast

    long = [
        f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for folder in ("components", "model", "workflows")
        for path in (REPO / folder).rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80
    ]
    assert not long, long
