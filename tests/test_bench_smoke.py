"""The benchmark scripts run at their smallest settings and print their ratio tables.

No timing is asserted: these only prove the scripts work (and that torch.ao's mask check passes).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.slow
def test_mask_kernel_bench_runs():
    out = run_script("bench/mask_kernel.py", "--repeats", "1", "--shapes", "64x128")
    assert "mask/abs" in out and "ao.step/mask" in out
    rows = [line for line in out.splitlines() if line.strip().startswith("64x128")]
    assert [row.split()[1] for row in rows] == ["2:4", "1:8", "1:32"]


@pytest.mark.slow
def test_step_overhead_bench_runs():
    out = run_script(
        "bench/step_overhead.py",
        "--layers",
        "1",
        "--batch",
        "1",
        "--image-size",
        "32",
        "--repeats",
        "1",
        "--warmup",
        "0",
    )
    assert "time/dense" in out and "saved/dense" in out
    recipes = [line.split()[0] for line in out.splitlines() if line.strip()]
    for name in ("dense", "STE", "SR-STE", "MDGF-exp", "SDGF"):
        assert name in recipes
