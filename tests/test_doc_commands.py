"""Every command README.md and docs/*.md show is run, or checked against the tools where it needs what
a test cannot have (tests/doc_blocks.py: the markers, and what is checked)."""

import re
from pathlib import Path

import pytest

from conftest import copy_of
from doc_blocks import (
    PAGES,
    REPO,
    REPO_PATH,
    all_shell_blocks,
    block_commands,
    commands,
    fenced_blocks,
    inline_commands,
    inline_spans,
    problems,
    run_block,
)

BLOCKS = all_shell_blocks()
RUN_HERE = [block for block in BLOCKS if block.mode == "run"]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_fenced_block_names_its_language(page):
    """A command in a block without a language would escape the checks below (output is `text`)."""
    unnamed = [line for language, line, _, _ in fenced_blocks(page) if not language]
    assert not unnamed, f"{page.relative_to(REPO)}: blocks at lines {unnamed} name no language"


def test_every_shell_block_says_how_it_is_tested():
    unmarked = [str(block) for block in BLOCKS if not block.mode]
    assert not unmarked, f"shell blocks without a <!-- doc-test: ... --> marker: {unmarked}"
    for block in BLOCKS:
        if block.mode == "run in":
            test = REPO / block.detail
            assert test.is_file() and block.page.name in test.read_text(encoding="utf-8"), block


@pytest.mark.parametrize("block", BLOCKS, ids=str)
def test_every_command_a_block_shows_exists(block):
    found = [problem for words in block_commands(block.code) for problem in problems(words)]
    assert not found, f"{block}: {found}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_command_and_file_named_in_the_text_exists(page):
    """Inline `zhclip ...`, `make ...`, `python -m ...` and repository paths. (An inline `dvc exp` is a
    mention more often than a command: the blocks hold the dvc commands.)"""
    found = []
    for span in inline_commands(page):
        for words in commands(span):
            if words[0] in ("zhclip", "make"):
                found += problems(words)
            elif words[0] == "python" and "<" not in words[2]:  # `python -m bench.<name>` is a pattern
                found += [problem for problem in problems(words[:3]) if "no module" in problem]
    for span in inline_spans(page):
        if re.fullmatch(REPO_PATH.pattern + r"(::\S+)?", span):
            found += problems(["cat", span])
    assert not found, f"{page.relative_to(REPO)}: {found}"


def test_the_checker_finds_a_made_up_option_a_missing_file_and_a_missing_target():
    assert problems(["zhclip", "train", "--made-up-option", "1"]) == ["`zhclip train` has no option --made-up-option"]
    assert problems(["zhclip", "trian"]) == ["`zhclip` has no command 'trian'"]
    assert problems(["pytest", "tests/search/test_follow.py"]) == ["tests/search/test_follow.py does not exist"]
    assert problems(["make", "demo", "deploy"]) == ["Makefile has no target 'deploy'"]
    assert problems(["dvc", "exp", "run", "--made-up"]) and not problems(["dvc", "exp", "run", "-S", "++stage2.a=1"])
    assert "required: --out" in problems(["python", "-m", "bench.ablation"])[0]
    assert problems(["img2dataset", "--url_list=u", "--made_up=1"]) == ["img2dataset has no option --made_up"]
    assert problems(["mlflow", "server", "--made-up"]) == ["`mlflow server` has no option --made-up"]
    assert not problems(["zhclip", "serve", "--index", "indexes/test"])


@pytest.mark.slow
@pytest.mark.parametrize("block", RUN_HERE, ids=str)
def test_a_block_marked_run_runs_in_a_copy_of_the_project(block, small_project, tmp_path):
    """In a copy of the small project (the demo's pipeline on small data, reproduced), with the project's
    environment where `source .venv/bin/activate` finds it."""
    run_block(block, copy_of(small_project, tmp_path))


# Where raw output is committed: the benchmark suite's results, the investigations (each dated folder
# with its script, README and results, which may hold dated folders of its own) and the test-suite logs.
RAW_OUTPUT = ("bench/results", "bench/investigations", "test-runs")


def raw_output_folders(dates: list[str]) -> list[Path]:
    """The committed raw-output folders of those dates (named `<date>-<what>`)."""
    return [
        folder
        for root in RAW_OUTPUT
        for date in dates
        for folder in (REPO / root).rglob(f"{date}-*")
        if folder.is_dir()
    ]


def _measured_in(results: list[Path], minutes: int, seconds: int) -> bool:
    """Whether raw output under `results` says that duration (as the docs, pytest or `time` write it)."""
    spellings = (
        f"{minutes} min {seconds} s",
        f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}",
        f"{minutes}m{seconds}",
    )
    return any(
        spelling in path.read_text(encoding="utf-8", errors="replace")
        for folder in results
        for path in folder.rglob("*")
        if path.is_file()
        for spelling in spellings
    )


def test_a_duration_is_found_only_in_the_raw_output_of_its_day():
    """The check below finds a test-suite log's figure in its dated folder, and no made-up one."""
    assert _measured_in(raw_output_folders(["2026-12-06"]), 46, 45)  # test-runs/2026-12-06-cpu-ci-run-final
    assert not _measured_in(raw_output_folders(["2026-12-06"]), 46, 46)
    assert not _measured_in(raw_output_folders(["2026-11-27"]), 46, 45)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_duration_the_docs_quote_is_in_the_raw_output_of_its_day(page):
    """A figure like "6 min 33 s" comes with its date in the same paragraph, and a folder of that date
    under bench/results, bench/investigations or test-runs holds it."""
    for paragraph in page.read_text(encoding="utf-8").split("\n\n"):
        for minutes, seconds in re.findall(r"(\d+) min (\d+) s\b", paragraph):
            dates = re.findall(r"20\d\d-\d\d-\d\d", paragraph)
            assert dates, f"{page.name}: {minutes} min {seconds} s has no date: {paragraph[:200]!r}"
            assert _measured_in(raw_output_folders(dates), int(minutes), int(seconds)), (
                f"{page.name}: {minutes} min {seconds} s is in no raw output of {dates} under {', '.join(RAW_OUTPUT)}"
            )


def test_every_repository_file_the_code_and_bench_notes_name_exists():
    """Comments and docstrings name files (`components/training/loop.py`); a file moved or renamed
    leaves them pointing nowhere. tests/doc_blocks.py's own examples (tests/FILE.py, made-up paths
    for the self-test) are not names of files."""
    named = re.compile(r"\b((?:components|model|workflows|tests|bench)/[\w/-]+\.py)\b")
    sources = [
        path
        for folder in ("components", "model", "workflows", "tests", "bench")
        for path in (REPO / folder).rglob("*")
        if path.suffix in (".py", ".md", ".sh") and "__pycache__" not in path.parts
    ]
    examples = {REPO / "tests" / "doc_blocks.py", REPO / "tests" / "test_doc_commands.py"}
    missing = [
        f"{source.relative_to(REPO)}: {path}"
        for source in sources
        if source not in examples
        for path in named.findall(source.read_text(encoding="utf-8"))
        if not (REPO / path).exists()
    ]
    assert not missing, missing
