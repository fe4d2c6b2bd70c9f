"""The shell blocks of README.md and docs/*.md, and a checker of the commands they show.

Each ```bash block is preceded by a marker that says how the tests treat it:
- `<!-- doc-test: run -->`: tests/test_doc_commands.py runs it in a copy of the small project (the
  demo's pipeline on small data, reproduced), with the project's environment on PATH;
- `<!-- doc-test: run in tests/FILE.py -->`: that test runs it and checks what it made;
- `<!-- doc-test: check: REASON -->`: it needs what a test cannot have here (a cluster, a GPU, a long
  run, a download), so each command is only checked against the tools.
Every block is checked: each `zhclip` command and option exists (and `mlflow`'s, `dvc`'s and
`img2dataset`'s, asked of those tools), each `make` target, each `python -m` module with arguments its
parser accepts, and each repository file it names.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import re
import runpy
import shlex
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from conftest import REPO
from img2dataset_tool import IMG2DATASET

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\S*)\n(.*?)^```", re.M | re.S)
MARKER = re.compile(r"<!-- doc-test: (run(?: in (\S+))?|check: (.+?)) -->\s*\Z")
# A path into the repository's own folders (what a block names as input: it must be there).
REPO_PATH = re.compile(r"(?:^|[=@])((?:bench|components|docs|infra|model|test-runs|tests|workflows|\.ci)/[\w./*-]*)")
OUTPUT_OPTIONS = {"--out", "-o", "--output_folder", "--dest", "--plot", "--loss-plot", "--report-dir", "--publish"}
OPERATORS = {";", "&&", "||", "|", "&"}


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    code: str
    mode: str  # run, run in, check
    detail: str  # the test file (run in) or the reason (check)

    def __str__(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def fenced_blocks(page: Path) -> list[tuple[str, int, str, str]]:
    """(language, line, code, the text before it) of each fenced block of `page`."""
    text = page.read_text(encoding="utf-8")
    return [
        (found.group(1), text.count("\n", 0, found.start()) + 1, found.group(2), text[: found.start()])
        for found in FENCE.finditer(text)
    ]


def shell_blocks(page: Path) -> list[Block]:
    """The ```bash blocks of `page` with their markers (mode '' where the marker is missing)."""
    blocks = []
    for language, line, code, before in fenced_blocks(page):
        if language != "bash":
            continue
        marker = MARKER.search(before)
        if marker is None:
            blocks.append(Block(page, line, code, "", ""))
        else:
            mode = "run in" if marker.group(2) else marker.group(1).split(":")[0]
            blocks.append(Block(page, line, code, mode, marker.group(2) or marker.group(3) or ""))
    return blocks


def all_shell_blocks() -> list[Block]:
    return [block for page in PAGES for block in shell_blocks(page)]


def run_block(block: Block, project: Path, env: dict[str, str] | None = None) -> str:
    """Run `block` in `project` under bash -euo pipefail, with this environment where `source
    .venv/bin/activate` finds it and on PATH, and `env` on top (HOME, say); returns its output, or
    fails the test with it."""
    import os

    venv = Path(sys.executable).parent.parent
    if not (project / ".venv").exists():
        (project / ".venv").symlink_to(venv)
    ran = subprocess.run(
        ["bash", "-c", f"set -euo pipefail\n{block.code}"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}", **(env or {})},
    )
    assert ran.returncode == 0, f"{block} failed:\n{ran.stdout[-3000:]}\n{ran.stderr[-3000:]}"
    return ran.stdout + ran.stderr


def commands(line: str) -> list[list[str]]:
    """The simple commands of one shell line: words, split at ; && || | &, the comment removed,
    leading VAR=value assignments and for-loop keywords dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split, lexer.commenters = True, "#"
    found, words = [], []
    for token in [*lexer, ";"]:
        if token in OPERATORS:
            found.append(words)
            words = []
        else:
            words.append(token)
    simple = []
    for words in map(_without_redirections, found):
        while words and re.match(r"^[A-Za-z_]\w*=", words[0]):
            words = words[1:]
        if words and words[0] in ("do", "then"):
            words = words[1:]
        if words and words[0] not in ("for", "done", "fi"):
            simple.append(words)
    return simple


def _without_redirections(words: list[str]) -> list[str]:
    kept, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif re.fullmatch(r"\d?>>?|<|&>", word):
            skip = True
        else:
            kept.append(word)
    return kept


def block_commands(code: str) -> list[list[str]]:
    """The simple commands of a block, line by line: continuations joined, and a line whose quote
    closes on a later line read with it."""
    found, pending = [], ""
    for line in code.replace("\\\n", " ").splitlines():
        pending = f"{pending}\n{line}" if pending else line
        try:
            found += commands(pending)
        except ValueError:  # no closing quotation yet
            continue
        pending = ""
    assert not pending, f"unclosed quote in {pending!r}"
    return found


@cache
def _click_root(tool: str):
    import typer

    if tool == "zhclip":
        from zhclip.components.cli import app

        return typer.main.get_command(app)
    from mlflow.cli import cli

    return cli


def _click_problems(words: list[str]) -> list[str]:
    """A click command line (typer's own click for zhclip): each sub-command and each --option exists."""
    command, path = _click_root(words[0]), [words[0]]
    args = words[1:]
    while hasattr(command, "commands") and args and not args[0].startswith("-"):
        if args[0] not in command.commands:
            return [f"`{' '.join(path)}` has no command {args[0]!r}"]
        command = command.commands[args[0]]
        path.append(args.pop(0))
    known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)} | {"--help"}
    return [
        f"`{' '.join(path)}` has no option {arg.split('=')[0]}"
        for arg in args
        if arg.startswith("-") and arg.split("=")[0] not in known
    ]


def _dvc_problems(words: list[str]) -> list[str]:
    from dvc.cli import DvcParserError, parse_args

    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        try:
            parsed = parse_args(words[1:])
        except (DvcParserError, SystemExit):
            return [f"dvc does not accept `{' '.join(words)}` (its error is in the output above)"]
    return [problem for override in getattr(parsed, "set_param", None) or [] for problem in _param_problems(override)]


def _param_problems(override: str) -> list[str]:
    """`dvc exp run -S key=value`: without Hydra's `+`/`++` the key must be in params.yaml already (DVC
    refuses others: "Key 'lora' is not in struct")."""
    import yaml

    key = override.split("=", 1)[0].split(":")[-1]
    if key.startswith("+"):
        return []
    section = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    for part in key.split("."):
        if not isinstance(section, dict) or part not in section:
            return [f"-S {override}: params.yaml has no {key} (DVC refuses it; `++{key}=...` adds it)"]
        section = section[part]
    return []


class _Parsed(Exception):
    """Raised in place of running a module once its arguments parsed."""


def _module_problems(words: list[str]) -> list[str]:
    """`python -m MODULE ARGS`: the module exists and, when it parses arguments with argparse, accepts
    these (parsed in this process, the module stopped before it does anything)."""
    import importlib.util

    module, args = words[2], words[3:]
    if importlib.util.find_spec(module) is None:
        return [f"no module {module}"]
    if not module.startswith("bench."):
        return []
    original = argparse.ArgumentParser.parse_args

    def parse_only(parser, *a, **k):
        original(parser, *a, **k)
        raise _Parsed

    saved_argv = sys.argv
    sys.argv, argparse.ArgumentParser.parse_args = [module, *args], parse_only
    try:
        with contextlib.redirect_stderr(io.StringIO()) as errors:
            runpy.run_module(module, run_name="__main__")
    except _Parsed:
        return []
    except SystemExit:
        return [f"`python -m {module}` refuses {' '.join(args)!r}: {errors.getvalue().strip().splitlines()[-1]}"]
    finally:
        sys.argv, argparse.ArgumentParser.parse_args = saved_argv, original
    return [f"`python -m {module}` ran without parsing arguments"]


@cache
def _make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([\w-]+):", text, re.M))


@cache
def _img2dataset_options() -> set[str]:
    python = IMG2DATASET.parent / "python"
    script = "import inspect, img2dataset; print(*inspect.signature(img2dataset.download).parameters)"
    return set(subprocess.run([str(python), "-c", script], capture_output=True, text=True, check=True).stdout.split())


def _path_problems(words: list[str]) -> list[str]:
    """Each repository path the command reads (not the value of an output option) exists; a path whose
    `.example` exists counts (a block copies the examples first)."""
    problems = []
    for before, word in zip(["", *words], words):
        if before in OUTPUT_OPTIONS or word.split("=")[0] in OUTPUT_OPTIONS:
            continue
        for path in REPO_PATH.findall(word):
            path = path.split("::")[0]
            if not glob.glob(str(REPO / path)) and not (REPO / f"{path}.example").exists():
                problems.append(f"{path} does not exist")
    return problems


def problems(words: list[str]) -> list[str]:
    """What is wrong with one simple command, as far as the tools can tell without running it."""
    program, found = words[0], _path_problems(words)
    if program in ("zhclip", "mlflow"):
        found += _click_problems(words)
    elif program == "dvc":
        found += _dvc_problems(words)
    elif program == "make":
        found += [
            f"Makefile has no target {t!r}" for t in words[1:] if not t.startswith("-") and t not in _make_targets()
        ]
    elif program in ("python", "python3") and words[1:2] == ["-m"] and words[2] != "pip":
        found += _module_problems(words)
    elif program == "img2dataset":
        options = {word[2:].split("=")[0] for word in words[1:] if word.startswith("--")}
        found += [f"img2dataset has no option --{name}" for name in sorted(options - _img2dataset_options())]
    return found


def inline_spans(page: Path) -> list[str]:
    """The inline code of a page, outside its fenced blocks."""
    return re.findall(r"`([^`\n]+)`", FENCE.sub("", page.read_text(encoding="utf-8")))


def inline_commands(page: Path) -> list[str]:
    """The commands a page shows in inline code (`zhclip ...`, `dvc ...`, `make ...`, `python -m ...`)."""
    return [span for span in inline_spans(page) if re.match(r"(zhclip|dvc|make|python -m) [a-z-]", span)]
