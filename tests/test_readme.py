"""Every Python snippet of README.md and of the docs runs as written: page by page, in order, in
one fresh process and one empty working directory per page, as a reader pasting them one after
the other would; offline."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", "docs/USAGE.md", "docs/LANGUAGE_MODELS.md", "docs/PRETRAINED.md"]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
MARK = "### line "


def python_blocks(page: str) -> list[tuple[int, str]]:
    """(line number, code) of every fenced ```python block of ``page``."""
    path = ROOT / page
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    return [(text[: m.start()].count("\n") + 1, m.group(1)) for m in BLOCK.finditer(text)]


def test_the_pages_have_python_snippets():
    assert len(python_blocks("README.md")) >= 1
    assert len(python_blocks("docs/USAGE.md")) >= 3


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)])
def test_snippets_run_as_written(page, tmp_path):
    blocks = python_blocks(page)
    script = "".join(f"print({MARK + str(line)!r}, flush=True)\n{code}\n" for line, code in blocks)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    reached = [line for line in out.stdout.splitlines() if line.startswith(MARK)]
    where = f"{page}, {reached[-1]}" if reached else f"{page}, before the first snippet"
    assert out.returncode == 0, f"failed in the snippet at {where}:\n{out.stderr[-3000:]}"
    assert len(reached) == len(blocks)
