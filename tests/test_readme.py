"""Every Python snippet of README.md runs as written: in order, in one fresh process and one
empty working directory, as a reader pasting them one after the other would; offline."""

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
MARK = "### README.md line "


def python_blocks() -> list[tuple[int, str]]:
    """(line number, code) of every fenced ```python block of the README."""
    text = README.read_text(encoding="utf-8")
    return [(text[: m.start()].count("\n") + 1, m.group(1)) for m in BLOCK.finditer(text)]


def test_the_readme_has_python_snippets():
    assert len(python_blocks()) >= 3


@pytest.mark.slow
def test_readme_snippets_run_as_written(tmp_path):
    script = "".join(
        f"print({MARK + str(line)!r}, flush=True)\n{code}\n" for line, code in python_blocks()
    )
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
    where = reached[-1] if reached else "before the first snippet"
    assert out.returncode == 0, f"failed in the snippet at {where}:\n{out.stderr[-3000:]}"
    assert len(reached) == len(python_blocks())
