"""The design notes are in the repository and stay true to the code's layout.

Comments and notes cite docs/DESIGN.md, docs/SCIENCE.md and docs/ARCHITECTURE.md, and name
modules by path (`insitu_daq/control/bias.py`). A module that moves without its citations
being updated leaves a newcomer at a dead end, so every path named in a note, docstring or
comment must exist.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
# A repository path as notes write it: a top-level source folder, then path parts, then a file.
PATH_RE = re.compile(
    r"(?<![\w/.])((?:insitu_daq|drivers|sim|tests|bench|deploy|docs)/[\w/]*\w\.(?:py|md|toml|yml|json))"
)
CITED_DOC_RE = re.compile(r"\b([A-Z][A-Z_]+\.md)\b")
# Dated measurement records keep the paths of their day (bench/README.md names the module a
# figure was measured on); every other note names today's paths.
HISTORICAL = {"bench/README.md"}


def _tracked_text_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "*.py", "*.md", "*.toml", "*.yml"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [REPO / name for name in listed if name not in HISTORICAL]


def test_the_design_and_science_notes_are_in_the_repository() -> None:
    for name in ("DESIGN.md", "SCIENCE.md", "ARCHITECTURE.md"):
        assert (DOCS / name).is_file(), f"docs/{name} is missing"


def test_every_cited_note_exists() -> None:
    notes = {p.name for p in REPO.glob("*.md")} | {p.name for p in REPO.rglob("docs/*.md")}
    notes |= {p.name for p in REPO.glob("*/*.md")}
    missing = {
        (str(path.relative_to(REPO)), doc)
        for path in _tracked_text_files()
        for doc in CITED_DOC_RE.findall(path.read_text(encoding="utf-8"))
        if doc not in notes
    }
    assert not missing, sorted(missing)


def test_every_repository_path_named_in_notes_and_comments_exists() -> None:
    dead = sorted(
        (str(path.relative_to(REPO)), named)
        for path in _tracked_text_files()
        for named in PATH_RE.findall(path.read_text(encoding="utf-8"))
        if not (REPO / named).exists()
    )
    assert not dead, "\n".join(f"{where}: {named}" for where, named in dead)
