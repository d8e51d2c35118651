"""Every Python snippet of README.md runs as written, each in a fresh process, offline."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks() -> list[tuple[int, str]]:
    """(line number, code) of every fenced ```python block of the README."""
    text = README.read_text(encoding="utf-8")
    return [(text[: m.start()].count("\n") + 1, m.group(1)) for m in BLOCK.finditer(text)]


def test_the_readme_has_python_snippets():
    assert len(python_blocks()) >= 3


@pytest.mark.slow
@pytest.mark.parametrize(
    "line, code", python_blocks(), ids=lambda v: f"line{v}" if isinstance(v, int) else ""
)
def test_readme_snippet_runs_as_written(line, code, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, f"README.md line {line}:\n{code}\n--- stderr:\n{out.stderr[-3000:]}"
