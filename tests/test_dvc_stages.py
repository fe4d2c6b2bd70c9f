"""dvc.yaml's code dependencies cover everything each stage's command imports, so `dvc status` never
calls a stale result up to date.

Nothing here lists modules by hand. Each stage's `zhclip <command>` (as DVC resolves dvc.yaml, foreach
and matrix expanded) is looked up in the Typer app; from that command function, and what the CLI
module runs as it is imported, every repository module reachable by an import statement is followed:
module- or function-level, absolute (`zhclip.…`) or relative (`from .presets import …`), with each
package's `__init__.py` on the way (importing a submodule runs it). Also followed: modules imported
at run time by name (settings.SECTIONS' "zhclip.components.x.y:Config" through
`importlib.import_module`) where the command can reach the function that imports them, and files
beside a module that it names (`Path(__file__).with_name("served_model.py")`, "page.html").

The imports are grimp's import graph, the one import-linter checks the layering on in `make lint`
(each import statement with its line). What no import graph holds is worked out here from the
source: which of a CLI module's imports the command's own functions reach, the modules imported by
name at run time, and the files beside a module.

The closure over-approximates (every import of an imported module counts, called or not): a
dependency set may be too large, never too small.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path, PurePosixPath

import pytest

from conftest import BIN, REPO, package_dirs

PACKAGE = "zhclip"  # the installed namespace (pyproject.toml [tool.setuptools.package-dir])

# Calls that import a module named by a value (a literal name is an ordinary import): what they load,
# "module" (it, and the packages above it) or "parents" (find_spec imports only the packages above).
DYNAMIC_IMPORTS = {"import_module": "module", "__import__": "module", "find_spec": "parents"}
MODULE_STRING = re.compile(rf"^{PACKAGE}(\.\w+)+(:[\w.]+)?$")  # "zhclip.components.core.tracking:MlflowConfig"
DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


# ---------------------------------------------------------------------------------------------------
# Modules: dotted names <-> repository files, from pyproject.toml's package mapping
# ---------------------------------------------------------------------------------------------------


def code_roots() -> list[str]:
    """The repository folders that hold the package's code (model, components, workflows)."""
    return [folder.relative_to(REPO).as_posix() for folder in package_dirs().values()]


def module_file(name: str) -> Path | None:
    """The repository file that defines module `name` (a package: its __init__.py), or None."""
    for package, folder in sorted(package_dirs().items(), key=lambda item: -len(item[0])):
        if name == package or name.startswith(package + "."):
            base = folder.joinpath(*name[len(package) :].split(".")[1:])
            for candidate in (base.with_suffix(".py"), base / "__init__.py"):
                if candidate.is_file():
                    return candidate
            return None
    return None


def module_name(path: Path) -> str:
    """The dotted name of repository file `path` (the inverse of module_file)."""
    for package, folder in package_dirs().items():
        if path.is_relative_to(folder):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            return ".".join([package, *parts])
    raise ValueError(f"{path} is in no package of pyproject.toml [tool.setuptools.package-dir]")


def with_parents(name: str) -> list[str]:
    """`a.b.c` -> [a, a.b, a.b.c]: importing a submodule runs each package's __init__ first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def files_of(names: set[str]) -> set[Path]:
    """The repository files of modules `names` (names outside the repository have none)."""
    return {path for name in names if name.split(".")[0] == PACKAGE and (path := module_file(name))}


@cache
def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def imported_module(node: ast.ImportFrom, path: Path) -> str:
    """The module a `from ... import` in `path` imports from, relative imports resolved."""
    if not node.level:
        return node.module
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    return importlib.util.resolve_name("." * node.level + (node.module or ""), package)


def called_name(call: ast.Call) -> str:
    return call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")


def is_text(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


@cache
def import_graph():
    """The package's import graph as import-linter builds it for `make lint` (grimp): every import
    statement of every module, at module or function level, relative ones resolved."""
    import grimp

    return grimp.build_graph(*package_dirs(), cache_dir=None)


def imports_of(path: Path) -> set[str]:
    """Every module of the package (and the packages above it) that the import statements of module
    `path` may load, wherever they stand in it."""
    names = import_graph().find_modules_directly_imported_by(module_name(path))
    return {parent for name in names for parent in with_parents(name)}


def imports_in(path: Path, nodes: list[ast.AST]) -> set[str]:
    """The modules (and packages above them) that import statements inside `nodes` (parts of module
    `path`) load: the import graph's imports of the module, on the lines `nodes` span."""
    graph, importer = import_graph(), module_name(path)
    spans = [(node.lineno, node.end_lineno or node.lineno) for node in nodes if hasattr(node, "lineno")]
    names = {
        imported
        for imported in graph.find_modules_directly_imported_by(importer)
        for detail in graph.get_import_details(importer=importer, imported=imported)
        if any(first <= detail["line_number"] <= last for first, last in spans)
    }
    return {parent for name in names for parent in with_parents(name)}


def runs_code(path: Path) -> bool:
    """Whether importing module `path` runs anything. An empty package marker (or one with only a
    docstring) cannot change a result, and DVC warns about every empty file among a stage's deps;
    once it holds code, the stages that import it must depend on it."""
    body = parsed(path).body
    return not (not body or (len(body) == 1 and isinstance(body[0], ast.Expr) and is_text(body[0].value)))


@cache
def beside(path: Path) -> frozenset[Path]:
    """Files next to module `path` that it names in a string (`Path(__file__).with_name("served_model.py")`,
    "page.html"): read, or logged as code, when it runs; .py ones count as modules (what they import too)."""
    found = set()
    for node in ast.walk(parsed(path)):
        if is_text(node) and 0 < len(node.value) < 200 and not set(node.value) & {"\n", "\0", "*", "{"}:
            candidate = (path.parent / node.value).resolve()
            if candidate.is_file() and candidate != path and candidate.is_relative_to(REPO):
                found.add(candidate)
    return frozenset(found)


# ---------------------------------------------------------------------------------------------------
# Imports at run time: which functions import modules named by strings, and whether a command reaches one
# ---------------------------------------------------------------------------------------------------


@cache
def bindings(path: Path) -> dict[str, frozenset[str]]:
    """Names bound by the module's import statements (at any level, so one name may stand for several
    things, e.g. each command's `run`) -> the dotted names they stand for."""
    bound: dict[str, set[str]] = {}
    for node in ast.walk(parsed(path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = alias.name if alias.asname else alias.name.split(".")[0]
                bound.setdefault(alias.asname or target, set()).add(target)
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                bound.setdefault(alias.asname or alias.name, set()).add(f"{imported_module(node, path)}.{alias.name}")
    return {name: frozenset(targets) for name, targets in bound.items()}


def references(path: Path, nodes: list[ast.AST]) -> set[str]:
    """The dotted names that names and attribute chains in `nodes` (code of `path`) may refer to, with
    every prefix: `settings.resolved_params(...)` -> zhclip.components.core.settings(.resolved_params)."""
    bound, here = bindings(path), module_name(path)
    found = set()
    for node in (sub for top in nodes for sub in ast.walk(top)):
        chain = []
        while isinstance(node, ast.Attribute):
            chain.insert(0, node.attr)
            node = node.value
        if isinstance(node, ast.Name):
            for target in {*bound.get(node.id, ()), f"{here}.{node.id}"}:
                found.update(".".join([target, *chain[:i]]) for i in range(len(chain) + 1))
    return found


@cache
def definitions(path: Path) -> dict[str, ast.AST]:
    """The module's top-level functions and classes by their dotted names."""
    return {f"{module_name(path)}.{node.name}": node for node in parsed(path).body if isinstance(node, DEFINITIONS)}


@cache
def definition_references(path: Path) -> dict[str, frozenset[str]]:
    return {name: frozenset(references(path, [node])) for name, node in definitions(path).items()}


@cache
def named_modules(path: Path) -> frozenset[str]:
    """The modules that string constants in `path` name ("zhclip.x.y", or "zhclip.x.y:attr")."""
    return frozenset(
        node.value.split(":")[0] for node in ast.walk(parsed(path)) if is_text(node) and MODULE_STRING.match(node.value)
    )


def run_at_import(path: Path) -> list[ast.AST]:
    """What runs when `path` is imported: its module-level statements, each function's decorators and
    default values, each class's body but its methods' bodies."""

    def outside_bodies(node: ast.AST) -> list[ast.AST]:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return [*node.decorator_list, *node.args.defaults, *(d for d in node.args.kw_defaults if d)]
        if isinstance(node, ast.ClassDef):
            return [
                *node.decorator_list,
                *node.bases,
                *node.keywords,
                *(part for statement in node.body for part in outside_bodies(statement)),
            ]
        return [node]

    return [part for node in parsed(path).body for part in outside_bodies(node)]


def importers(modules: set[Path]) -> dict[str, set[tuple[Path, str]]]:
    """The top-level functions and classes of `modules` that, themselves or through what they refer
    to, import modules named by strings: dotted name -> {(the module whose strings name them, kind)}."""
    found: dict[str, set[tuple[Path, str]]] = {}
    for path in modules:
        for name, node in definitions(path).items():
            for call in ast.walk(node):
                if (
                    isinstance(call, ast.Call)
                    and called_name(call) in DYNAMIC_IMPORTS
                    and call.args
                    and not is_text(call.args[0])
                ):
                    found.setdefault(name, set()).add((path, DYNAMIC_IMPORTS[called_name(call)]))
    changed = True
    while changed:  # a function that refers to an importer is one too
        changed = False
        for path in modules:
            for name, refs in definition_references(path).items():
                reached = set().union(*(found.get(ref, set()) for ref in refs))
                if not reached <= found.get(name, set()):
                    found.setdefault(name, set()).update(reached)
                    changed = True
    return found


def imported_at_run_time(path: Path, nodes: list[ast.AST], by_name: dict[str, set[tuple[Path, str]]]) -> set[str]:
    """The modules that running `nodes` (code of `path`) may import through the importers it refers to."""
    names = set()
    for ref in references(path, nodes):
        for origin, kind in by_name.get(ref, set()):
            for string in named_modules(origin):
                names.update(with_parents(string) if kind == "module" else with_parents(string)[:-1])
    return names


# ---------------------------------------------------------------------------------------------------
# Commands: `zhclip <sub-command>` -> the CLI functions it runs -> the modules they may load
# ---------------------------------------------------------------------------------------------------


@cache
def cli_commands() -> dict[tuple[str, ...], tuple]:
    """Every command of the `zhclip` Typer app by its words (("ingest",), ("pipeline", "compile")) -> the
    functions that run for it: the callbacks of the app and its groups on the way, then the command."""
    import typer.main

    from zhclip.components.cli import app

    found: dict[tuple[str, ...], tuple] = {}

    def callbacks(typer_app, info=None) -> list:
        candidates = [
            getattr(info, "callback", None),
            typer_app.info.callback,
            getattr(typer_app.registered_callback, "callback", None),
        ]
        return [function for function in candidates if inspect.isfunction(function)]

    def walk(typer_app, prefix: tuple[str, ...], running: list) -> None:
        for info in typer_app.registered_commands:
            name = info.name or typer.main.get_command_name(info.callback.__name__)
            found[prefix + (name,)] = (*running, info.callback)
        for group in typer_app.registered_groups:
            sub = group.typer_instance
            name = group.name if isinstance(group.name, str) else sub.info.name
            walk(sub, prefix + (name,), [*running, *callbacks(sub, group)])

    walk(app, (), callbacks(app))
    return found


def command_of(cmd: str) -> tuple[str, tuple]:
    """The `zhclip` command (its words) and the functions it runs, of a stage's command line."""
    words = cmd.split()
    assert PACKAGE in words, f"{cmd!r} does not run `{PACKAGE}`: this test cannot tell what it imports"
    words = words[words.index(PACKAGE) + 1 :]
    commands = cli_commands()
    for length in range(len(words), 0, -1):
        if tuple(words[:length]) in commands:
            return " ".join(words[:length]), commands[tuple(words[:length])]
    raise AssertionError(f"{cmd!r}: no such `{PACKAGE}` command; known: {sorted(' '.join(c) for c in commands)}")


def function_node(function) -> tuple[Path, ast.AST]:
    """The file and top-level definition of a CLI function."""
    function = inspect.unwrap(function)
    path = Path(inspect.getsourcefile(function)).resolve()
    line = function.__code__.co_firstlineno  # the first decorator's line
    for node in parsed(path).body:
        if (
            isinstance(node, DEFINITIONS)
            and node.name == function.__name__
            and min(part.lineno for part in [node, *node.decorator_list]) <= line <= node.end_lineno
        ):
            return path, node
    raise AssertionError(f"no top-level definition of {function.__module__}.{function.__qualname__} in {path}")


def command_modules(functions: tuple) -> set[Path]:
    """The repository modules that running CLI `functions` may load.

    Of a module holding CLI commands: what runs when it is imported, the functions that run, and the
    helpers (its other top-level definitions) that those refer to, not its other commands. Of every
    module they import: all of it (each import statement at any level, the .py files beside it that
    it names), and the modules its run-time importers load wherever reachable code refers to them.
    """
    code: dict[Path, list[ast.AST]] = {}
    for function in functions:
        path, node = function_node(function)
        code.setdefault(path, run_at_import(path)).append(node)
    for path, roots in code.items():
        helpers, todo = set(), list(references(path, roots))
        while todo:
            name = todo.pop()
            if name in definitions(path) and name not in helpers:
                helpers.add(name)
                todo.extend(definition_references(path)[name])
        roots.extend(definitions(path)[name] for name in helpers)
    modules = files_of(
        {name for path, nodes in code.items() for name in [*with_parents(module_name(path)), *imports_in(path, nodes)]}
    )
    seen: set[Path] = set()
    while modules - seen:  # to a fixpoint: what is imported at run time may import (at run time) more
        new = modules - seen
        seen |= new
        for module in new - code.keys():
            modules |= files_of(imports_of(module))
            modules |= {file for file in beside(module) if file.suffix == ".py"}
        by_name = importers(seen)
        for module in seen:
            modules |= files_of(imported_at_run_time(module, code.get(module) or run_at_import(module), by_name))
    return modules


# ---------------------------------------------------------------------------------------------------
# Stages: dvc.yaml as DVC itself resolves it (foreach / matrix expanded with params.yaml)
# ---------------------------------------------------------------------------------------------------


@cache
def stages() -> dict[str, dict]:
    """Stage name (train@stage1, zeroshot@start-digits, ...) -> its command and dependency paths."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        return {
            stage.name: {
                "cmd": " ".join(stage.cmd) if isinstance(stage.cmd, list) else stage.cmd,
                "deps": [dep.def_path for dep in stage.deps if not isinstance(dep, ParamsDependency)],
            }
            for stage in repo.index.stages
            if stage.cmd
        }


STAGES = stages()


def covered(path: str, deps: list[str]) -> bool:
    """Whether repository path `path` is one of `deps` or inside a folder among them."""
    return any(PurePosixPath(path) == PurePosixPath(dep) or PurePosixPath(path).is_relative_to(dep) for dep in deps)


def fix_for(path: str) -> str:
    """The dependency to add for `path`: its folder (components/<capability>, model, ...), or the file
    itself where that folder holds further packages (components/cli.py: all of components/ would make
    every stage depend on every capability)."""
    folder = (REPO / path).parent
    if any(sub.is_dir() and (sub / "__init__.py").is_file() for sub in folder.iterdir()):
        return path
    return folder.relative_to(REPO).as_posix()


def unresolved(modules: set[Path]) -> set[str]:
    """Modules of the namespace that import statements in `modules` name but no repository file
    defines: a closure that dropped them silently would be too small."""
    names = set()
    for path in modules:
        for node in ast.walk(parsed(path)):
            if isinstance(node, ast.Import):
                names.update((alias.name, path) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                names.add((imported_module(node, path), path))
    return {
        f"{name} (imported in {path.relative_to(REPO)})"
        for name, path in names
        if name.startswith(PACKAGE + ".") and not module_file(name)
    }


@cache
def stage_files(stage: str) -> list[str]:
    """The repository files that the stage's command may use: the modules it may import (less those
    that run nothing), and the files beside them that they name."""
    _, functions = command_of(STAGES[stage]["cmd"])
    modules = command_modules(functions)
    missing = unresolved(modules)
    assert not missing, f"{stage}: no repository file defines {sorted(missing)} (pyproject.toml's package-dir?)"
    cli = {function_node(function)[0] for function in functions}
    data = {file for module in modules - cli for file in beside(module) if file.suffix != ".py"}
    return sorted(
        path.relative_to(REPO).as_posix() for path in modules | data if path.suffix != ".py" or runs_code(path)
    )


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_cover_its_import_closure(stage):
    """Every repository module the stage's command may load lies under one of the stage's deps."""
    command, _ = command_of(STAGES[stage]["cmd"])
    files = stage_files(stage)
    assert files, f"{stage}: found no module for `{PACKAGE} {command}`"
    fixes: dict[str, list[str]] = {}
    for file in files:
        if not covered(file, STAGES[stage]["deps"]):
            fixes.setdefault(fix_for(file), []).append(file)
    assert not fixes, (
        f"dvc.yaml stage {stage!r} runs `{PACKAGE} {command}`, which imports modules that are not among its "
        f"deps, so `dvc status` would call its results up to date after they change. Add to the deps of stage "
        f"{stage.split('@')[0]!r} in dvc.yaml:\n"
        + "\n".join(f"  - {fix}    (for {', '.join(found)})" for fix, found in fixes.items())
    )


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_exist(stage):
    """Each code dependency names a real file or folder (a moved module leaves no dead path behind).

    Data deps (what another stage writes: data/, models/, metrics/, weights/) may be missing in a
    fresh clone; code deps are those inside the package folders of pyproject.toml."""
    code = [dep for dep in STAGES[stage]["deps"] if covered(dep, code_roots())]
    assert code, f"dvc.yaml stage {stage!r} lists no code dependency at all"
    dead = [dep for dep in code if not (REPO / dep).exists()]
    assert not dead, f"dvc.yaml stage {stage!r} depends on {dead}, which do not exist: fix the paths in dvc.yaml"


# ---------------------------------------------------------------------------------------------------
# The real thing: `dvc status` in a copy of the project after a module changes
# ---------------------------------------------------------------------------------------------------


def dvc(*args: str, cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run([str(BIN / "dvc"), *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def modified_deps(project: Path) -> dict[str, set[str]]:
    """`dvc status`: stage -> the deps it reports modified."""
    found = {}
    for stage, changes in json.loads(dvc("status", "--json", cwd=project) or "{}").items():
        deps = {
            path
            for change in changes
            if isinstance(change, dict)
            for path, state in change.get("changed deps", {}).items()
            if state == "modified"
        }
        if deps:
            found[stage.rpartition(":")[2]] = deps
    return found


@pytest.fixture(scope="module")
def committed_copy(tmp_path_factory) -> Path:
    """The project's files (tracked, and new ones git does not ignore) in a new git repository, every
    stage committed as it stands, so `dvc status` starts clean. Outs and data deps are placeholders:
    which code a stage depends on does not need the pipeline's data."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    root = tmp_path_factory.mktemp("dvc_project")
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():  # a file deleted in the working tree is listed until the deletion is staged
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    with Repo(str(root)) as repo:
        paths = {
            item.def_path
            for stage in repo.index.stages
            for item in [*stage.deps, *stage.outs]
            if not isinstance(item, ParamsDependency)
        }
    for name in sorted(paths, key=lambda name: -name.count("/")):  # inner folders first (data/raw/zeroshot/digits)
        path = root / name
        if path.exists():
            continue
        if path.suffix:  # metrics/*.json, plots/*.csv, reports/*.jsonl
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("placeholder\n")
        else:  # data/raw, models/start, reports/evaluate_start, ...
            path.mkdir(parents=True, exist_ok=True)
            (path / "placeholder").write_text("placeholder\n")
    dvc("commit", "--force", "--quiet", cwd=root)
    assert modified_deps(root) == {}, "dvc status is not clean right after dvc commit"
    return root


def core_module() -> str:
    """A module of components/core that runs code: the one the fewest stages import (then by name)."""
    candidates = [
        path.relative_to(REPO).as_posix()
        for path in sorted((REPO / "components" / "core").glob("*.py"))
        if runs_code(path)
    ]
    return min(candidates, key=lambda module: (sum(module in stage_files(stage) for stage in STAGES), module))


@pytest.mark.parametrize("module", ["model/embedding.py", "components/core"])
def test_dvc_status_sees_a_changed_module(committed_copy, module):
    """After a comment is appended to a module, `dvc status` reports a changed dep for exactly the stages
    whose deps cover it, which include every stage that imports it; the others stay up to date."""
    module = core_module() if module == "components/core" else module
    importers = {stage for stage in STAGES if module in stage_files(stage)}
    assert importers, f"no stage imports {module}: pick another module"
    path = committed_copy / module
    before = path.read_text(encoding="utf-8")
    try:
        path.write_text(before + "# a change dvc must notice\n", encoding="utf-8")
        changed = modified_deps(committed_copy)
    finally:
        path.write_text(before, encoding="utf-8")
    covering = {stage: {dep for dep in STAGES[stage]["deps"] if covered(module, [dep])} for stage in STAGES}
    stale = sorted(importers - changed.keys())
    assert not stale, f"{module} changed, yet dvc status calls {stale} up to date"
    assert changed == {stage: deps for stage, deps in covering.items() if deps}, (
        f"{module} changed: dvc status reports {changed}; dvc.yaml's deps that cover it: {covering}"
    )
    assert modified_deps(committed_copy) == {}, "the copy is not clean again after the change was undone"


def test_bytecode_caches_change_no_stage(committed_copy):
    """Python writes __pycache__/*.pyc into the code folders that stages depend on; .dvcignore keeps them
    out of those folders' hashes, or any import would make the stages stale."""
    folders = sorted(
        {
            dep
            for stage in STAGES.values()
            for dep in stage["deps"]
            if covered(dep, code_roots()) and (committed_copy / dep).is_dir()
        }
    )
    assert folders, "no stage depends on a code folder"
    written = []
    try:
        for folder in folders:
            cache_dir = committed_copy / folder / "__pycache__"
            cache_dir.mkdir(exist_ok=True)
            written.append(cache_dir)
            (cache_dir / "module.cpython-311.pyc").write_bytes(b"\0bytecode")
        assert modified_deps(committed_copy) == {}, "bytecode caches changed a code dependency's hash: see .dvcignore"
    finally:
        for cache_dir in written:
            shutil.rmtree(cache_dir)
