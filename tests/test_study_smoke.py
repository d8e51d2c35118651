"""bench/study.py runs at its smallest settings, writes its tables, JSON and plot, resumes a stopped
grid, reruns one cell, and computes its intervals correctly.

No accuracy is asserted beyond "a fraction in [0, 1]": one epoch proves the script works, not
which recipe wins (docs/STUDY.md has the full study).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_study():
    """bench/study.py as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("study", ROOT / "bench" / "study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_t_interval_and_paired_summary():
    study = load_study()
    cell = study.t_interval([1.0, 2.0, 3.0])
    assert cell["mean"] == 2.0 and cell["std"] == 1.0 and cell["n"] == 3
    assert cell["ci95"] == pytest.approx(4.3027 / 3**0.5, rel=1e-4)  # t(0.975, 2) = 4.3027
    runs = [
        {"location": loc, "pattern": p, "recipe": r, "seed": s, "accuracy": acc}
        for (loc, p, r, s, acc) in [
            ("dense", "dense", "dense", 0, 0.9),
            ("dense", "dense", "dense", 1, 0.8),
            ("FF", "1:8", "SR-STE", 0, 0.7),
            ("FF", "1:8", "SR-STE", 1, 0.6),
            ("FF", "1:8", "MDGF-exp", 0, 0.8),
            ("FF", "1:8", "MDGF-exp", 1, 0.6),
        ]
    ]
    summary = study.summarize(runs)
    assert set(summary["FF"]["1:8"]) == {"dense", "SR-STE", "MDGF-exp"}
    paired = summary["FF"]["1:8"]["MDGF-exp"]["vs_srste"]
    assert paired["mean"] == pytest.approx(0.05)
    assert (paired["ahead"], paired["tied"], paired["n"]) == (1, 1, 2)
    assert summary["FF"]["1:8"]["dense"]["vs_srste"]["mean"] == pytest.approx(0.2)
    assert "vs_srste" not in summary["FF"]["1:8"]["SR-STE"]


@pytest.mark.slow
def test_study_runs_resumes_and_reruns_a_cell(tmp_path):
    command = [sys.executable, "bench/study.py", "--seeds", "1", "--epochs", "1"]
    command += ["--recipes", "dense,SR-STE", "--columns", "FF/1:8", "--out", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| recipe | 1:8 FF |" in result.stdout
    assert "| SR-STE |" in result.stdout and "| dense |" in result.stdout
    assert (tmp_path / "study.png").stat().st_size > 0
    results = json.loads((tmp_path / "study_results.json").read_text())
    runs = {(r["location"], r["pattern"], r["recipe"]): r for r in results["runs"]}
    assert set(runs) == {("dense", "dense", "dense"), ("FF", "1:8", "SR-STE")}
    for run in runs.values():
        assert 0.0 <= run["accuracy"] <= 1.0
        assert run["steps"] == 24  # one epoch of 1497 images at batch 64
    assert results["summary"]["FF"]["1:8"]["dense"]["vs_srste"]["n"] == 1

    study = load_study()
    threads = torch.get_num_threads()
    try:
        # Resume: the finished runs are kept as they are, only the new column's run is trained.
        args = ["--seeds", "1", "--epochs", "1", "--out", str(tmp_path), "--no-plot"]
        resumed = study.main([*args, "--recipes", "dense,SR-STE", "--columns", "FF/1:8,FF+QKV/1:4"])
        assert len(resumed["runs"]) == 3
        assert resumed["runs"][:2] == results["runs"]
        assert resumed["runs"][2]["location"] == "FF+QKV"
        # One cell again: same seed, same budget, so the same accuracy (runs are deterministic).
        rerun = study.main([*args, "--cell", "FF/1:8/SR-STE"])
        assert len(rerun["runs"]) == 3
        again = next(r for r in rerun["runs"] if r["recipe"] == "SR-STE" and r["pattern"] == "1:8")
        assert again["accuracy"] == runs["FF", "1:8", "SR-STE"]["accuracy"]
        # Other run settings would mix incomparable runs: refused before training.
        with pytest.raises(SystemExit, match="other settings"):
            study.main(["--seeds", "1", "--epochs", "2", "--out", str(tmp_path), "--cell", "dense"])
    finally:
        torch.set_num_threads(threads)
