"""bench/study.py runs at its smallest settings and writes its table, JSON and plot.

No accuracy is asserted beyond "a fraction in [0, 1]": one epoch proves the script works, not
which recipe wins (docs/STUDY.md has the full study).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_study_runs_and_writes_results(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "bench/study.py",
            "--seeds",
            "1",
            "--epochs",
            "1",
            "--recipes",
            "dense,SR-STE",
            "--patterns",
            "1:8",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| recipe | 1:8 FF |" in result.stdout
    assert "| SR-STE |" in result.stdout and "| dense |" in result.stdout

    results = json.loads((tmp_path / "study_results.json").read_text())
    assert (tmp_path / "study.png").stat().st_size > 0
    runs = {(r["recipe"], r["pattern"]): r for r in results["runs"]}
    assert set(runs) == {("dense", "dense"), ("SR-STE", "1:8")}
    for run in runs.values():
        assert 0.0 <= run["accuracy"] <= 1.0
        assert run["steps"] == 24  # one epoch of 1497 images at batch 64
    cell = results["summary"]["SR-STE"]["1:8"]
    assert 0.0 <= cell["mean"] <= 1.0 and cell["n"] == 1
    assert results["summary"]["dense"]["1:8"]["vs_srste"]["n"] == 1
