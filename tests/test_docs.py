"""The README stays one screen and the docs speak to users: no machine-relative figures, no issue or
round names, no link to a file outside the repository. (`make docs` builds the site with strict link
checking; this catches what a build cannot see.)"""

import re

import pytest

from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
FORBIDDEN = {
    "a figure without its hardware": re.compile(r"\bthis (2-core )?machine\b", re.I),
    "an issue number": re.compile(r"\bissues? #?\d+\b|(?<![\w/&])#\d{1,3}\b", re.I),
    "a round name": re.compile(r"\bround [12]\b|\bround (one|two)\b", re.I),
    "a file outside the repository": re.compile(r"\.\./shared/"),
}


def test_readme_is_one_screen():
    assert len((REPO / "README.md").read_text(encoding="utf-8").splitlines()) <= 160


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_user_docs_name_no_issue_round_or_unnamed_machine(page):
    text = page.read_text(encoding="utf-8")
    for what, pattern in FORBIDDEN.items():
        found = pattern.search(text)
        context = text[max(0, found.start() - 60) : found.end() + 20] if found else ""
        assert not found, f"{page.relative_to(REPO)} has {what}: {context!r}"


def test_readme_links_resolve():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    targets = [t for t in re.findall(r"\]\(([^)#\s]+)", text) if "://" not in t and not t.startswith("mailto:")]
    assert targets, "the README links its docs pages"
    missing = [t for t in targets if not (REPO / t).exists()]
    assert not missing, f"README links to missing files: {missing}"
