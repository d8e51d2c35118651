"""The benchmark scripts run at their smallest settings and print their ratio tables.

No timing is asserted: these only prove the scripts work (and that torch.ao's mask check passes).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str, timeout: int = 120) -> str:
    result = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.slow
def test_mask_kernel_bench_runs():
    # the compiled column is exercised by the GPU suite smoke below (an inductor compile less)
    out = run_script("bench/mask_kernel.py", "--repeats", "1", "--shapes", "64x128", "--no-compile")
    assert "mask/abs" in out and "ao.step/mask" in out
    rows = [line for line in out.splitlines() if line.strip().startswith("64x128")]
    assert [row.split()[1] for row in rows] == ["2:4", "1:8", "1:32"]


TINY_STEP = ("--layers", "1", "--image-size", "32", "--repeats", "2", "--warmup", "0")


@pytest.mark.slow
def test_step_overhead_bench_runs_profiles_and_writes_json(tmp_path):
    out = run_script(
        "bench/step_overhead.py",
        *TINY_STEP,
        "--batch",
        "1",
        "--profile",
        "STE",
        "--profile-top",
        "4",
        "--json",
        str(tmp_path / "so.json"),
    )
    assert "overhead %" in out and "saved/dense" in out and "passes %" in out
    recipes = [line.split()[0] for line in out.splitlines() if line.strip()]
    for name in ("dense", "STE", "SR-STE", "MDGF-exp", "SDGF"):
        assert name in recipes
    for name in ("MDGF-lin", "SDGF-geo", "authors", "authors-SR-STE", "dense-again"):
        assert name in recipes
    assert "ours/authors" in out and "IQR" in out
    assert "patterns at the timed steps: STE 2:4" in out
    assert "STE vs dense: operators by added self CPU time" in out
    result = json.loads((tmp_path / "so.json").read_text())
    assert {"dense", "STE", "authors", "SR-STE"} <= set(result["variants"])
    ste = result["variants"]["STE"]
    assert len(ste["rounds"]) == 2 and "over_authors_overhead" in ste
    assert ste["saved_over_dense"] > 1  # the bool masks


def test_step_breakdown_bench_runs():
    out = run_script(
        "bench/step_breakdown.py",
        *("--layers", "1", "--image-size", "32", "--batch", "2", "--steps", "3", "--warmup", "1"),
    )
    assert "eager" in out and "medians of 2 steps" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:]}
    assert list(rows) == ["dense", "MDGF-exp", "SR-STE"]
    assert float(rows["dense"][0]) == 0.0 and float(rows["SR-STE"][0]) > 0  # update: masks


@pytest.mark.slow
def test_step_scaling_bench_runs(tmp_path):
    out = run_script(
        "bench/step_scaling.py",
        *TINY_STEP,
        "--out",
        str(tmp_path),
        "--batches",
        "1",
        "2",
        "--widths",
        "vit-s",
        "--width-batch",
        "2",
        "--variants",
        "dense",
        "STE",
        "authors",
    )
    assert "vit-s batch 2" in out
    result = json.loads((tmp_path / "step_scaling.json").read_text())
    assert [r["batch"] for r in result["batch"]] == [1, 2]
    assert [r["width"] for r in result["width"]] == ["vit-s"]
    assert (tmp_path / "step_scaling.png").stat().st_size > 10_000


@pytest.mark.slow
def test_gpu_suite_smoke(tmp_path):
    """Every code path of the GPU suite, on CPU; CUDA-only parts say why they are skipped."""
    out = run_script("bench/gpu_suite.py", "--out", str(tmp_path), "--smoke", timeout=400)
    result = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert [r["pattern"] for r in result["mask_kernel"]] == ["2:4", "1:8", "1:32"]
    assert all("compiled_ms" in r and "ao.step_ms" in r for r in result["mask_kernel"])
    rows = {(r["mode"], r["variant"]) for r in result["train_step"]["rows"]}
    for name in ("dense", "STE", "SR-STE", "MDGF-lin", "MDGF-exp", "SDGF", "SDGF-geo"):
        assert ("eager", name) in rows
    assert {("compiled", "dense"), ("compiled", "MDGF-exp")} <= rows
    inference = result["semi_structured"]
    if "skipped" in inference:
        assert "2:4 inference SKIPPED" in out
        assert inference["candidates"] == "2/2"
    assert "## Training step" in (tmp_path / "gpu_suite.md").read_text()


def test_one_shot_cost_bench_runs():
    out = run_script(
        "bench/one_shot_cost.py",
        *("--hidden", "64", "--intermediate", "128", "--layers", "2"),
        *("--samples", "2", "--tokens", "16", "--method", "wanda"),
    )
    row = next(line.split() for line in out.splitlines() if line.strip().startswith("wanda"))
    assert row[1:5] == ["2", "x", "16", "tokens"] and row[6].startswith("+")
    assert "layer blocks pruned: 14, kept 0.500, mean relative reconstruction error" in out


@pytest.mark.slow
def test_data_throughput_bench_runs(tmp_path):
    out = run_script(
        "bench/data_throughput.py",
        "--count",
        "8",
        "--batch",
        "4",
        "--workers",
        "1",
        "--out",
        str(tmp_path),
    )
    assert "randaugment m15-n2" in out and "TimmMixCollator" in out
    result = json.loads((tmp_path / "data_throughput.json").read_text())
    assert result["per_example_per_core"] > 0 and result["loader"]["1"] > 0


def test_authors_baseline_is_the_same_n_m_masking():
    """The benchmark's baseline (argsort per group, float mask) masks the same weights as
    `nm_mask` on a weight without ties, and passes the straight-through gradient (+ SR-STE)."""
    import importlib.util

    import torch

    from nmsparse_hf.masks import nm_mask

    spec = importlib.util.spec_from_file_location("step_overhead", ROOT / "bench/step_overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    weight = torch.randn(16, 32, requires_grad=True)
    for n, m in ((2, 4), (1, 8)):
        masked = module.ArgsortMasked.apply(weight, n, m, 0.0)
        assert torch.equal(masked, weight.detach() * nm_mask(weight, n, m))
        lam, grad = 0.5, torch.randn(16, 32)
        (g,) = torch.autograd.grad(module.ArgsortMasked.apply(weight, n, m, lam), weight, grad)
        keep = nm_mask(weight, n, m)
        assert torch.equal(g, grad + lam * weight.detach() * (~keep))
