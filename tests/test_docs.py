"""The repository is self-contained: no file refers to documents outside it, references to the
method page name sections that exist, and the docs speak of the project, not of how it was made."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
OUTSIDE = re.compile(r"\.\./shared|\b(SPEC|DESIGN|NOTES|STYLE)\.md|\bSPEC §")
BUILD_HISTORY = re.compile(r"\b[Ss]ession \d")
METHOD_REF = re.compile(r"METHOD\.md,? (§[\d§\-, ]+)")


def repo_files() -> list[Path]:
    """Tracked files plus new files git does not ignore (what a commit of the tree would hold)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / name for name in out.splitlines() if (ROOT / name).is_file()]


def texts(paths) -> dict[str, str]:
    out = {}
    for path in paths:
        try:
            out[path.relative_to(ROOT).as_posix()] = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary (images)
    return out


def hits(pattern: re.Pattern, files: dict[str, str]) -> list[str]:
    return [
        f"{name}:{i}: {line.strip()}"
        for name, text in files.items()
        for i, line in enumerate(text.splitlines(), 1)
        if pattern.search(line)
    ]


def test_no_reference_outside_the_repository():
    files = texts(p for p in repo_files() if p != Path(__file__))
    assert len(files) > 50
    assert hits(OUTSIDE, files) == []


def test_docs_speak_of_the_project():
    docs = texts([ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    assert "docs/METHOD.md" in docs and "docs/ARCHITECTURE.md" in docs
    assert hits(BUILD_HISTORY, docs) == []
    # nor do the code and its comments
    files = texts(p for p in repo_files() if p != Path(__file__))
    assert hits(BUILD_HISTORY, files) == []


def test_method_references_name_existing_sections():
    method = (ROOT / "docs" / "METHOD.md").read_text()
    sections = {int(n) for n in re.findall(r"^## (\d+)\. ", method, flags=re.M)}
    assert sections == set(range(1, len(sections) + 1)) and len(sections) >= 6
    files = texts(p for p in repo_files() if p != Path(__file__))
    refs = [
        (name, int(n))
        for name, text in files.items()
        for group in METHOD_REF.findall(text)
        for n in re.findall(r"\d+", group)
    ]
    assert refs, "the code points to docs/METHOD.md by section"
    assert [(name, n) for name, n in refs if n not in sections] == []


def test_architecture_page_names_every_module():
    """docs/ARCHITECTURE.md describes the layout as built: every module of the package is on it."""
    page = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    modules = [
        path.relative_to(ROOT / "nmsparse_hf").as_posix()
        for path in sorted((ROOT / "nmsparse_hf").rglob("*.py"))
        if path.name != "__init__.py" and "metric_scripts" not in path.parts
    ]
    assert len(modules) > 20
    missing = [m for m in modules if Path(m).name not in page]
    assert missing == [], f"add these modules to docs/ARCHITECTURE.md: {missing}"
    for folder in ("export/", "integrations/", "data/", "recipes/"):
        assert folder in page
