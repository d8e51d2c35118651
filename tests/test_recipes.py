"""Recipes: argument files (ours and the seed's), model building, and short real runs on digits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_RECIPE_FLAGS
from safetensors.torch import load_file

from nmsparse_hf import NMSparsityConfigError
from nmsparse_hf.export import verify_checkpoint
from nmsparse_hf.recipes.image_classification import format_summary, parse_args, run
from nmsparse_hf.recipes.models import ModelArguments, build_model, parse_overrides
from nmsparse_hf.recipes.seed import seed_yaml_to_args

ROOT = Path(__file__).parents[1]
CONFIGS = ROOT / "nmsparse_hf" / "recipes" / "configs"


def test_no_arguments_means_the_embedded_default():
    model_args, data_args, args, _, notes = parse_args([], "vit")
    assert "embedded default vit_digits.yaml" in notes[0]
    assert model_args.model_config == "vit-digits" and data_args.source == "digits"
    cfg = args.sparsity_config()
    assert (cfg.n_keep, cfg.m, cfg.recipe_name) == (1, 8, "MDGF-exp")


def test_flags_without_a_file_tweak_the_embedded_default(tmp_path):
    """`train_vit.py --seed 1` is the default run with seed 1, not a run from the argument
    classes' defaults (TrainingArguments' lr 5e-5 and 3 epochs learn nothing here)."""
    _, data_args, default, _, _ = parse_args([], "vit")
    model_args, data_args, args, _, notes = parse_args(
        ["--seed", "1", "--output_dir", str(tmp_path)], "vit"
    )
    assert "flags applied on top of the embedded default vit_digits.yaml" in notes[0]
    assert model_args.model_config == "vit-digits" and data_args.source == "digits"
    assert (args.seed, args.output_dir) == (1, str(tmp_path))
    assert (args.learning_rate, args.num_train_epochs) == (
        default.learning_rate,
        default.num_train_epochs,
    )
    assert args.sparsity_config() == default.sparsity_config()


def test_flags_choosing_a_model_or_dataset_start_from_the_defaults(tmp_path):
    model_args, data_args, args, _, notes = parse_args(
        ["--model_config", "vit-s16", "--output_dir", str(tmp_path), "--data_dir", str(tmp_path)],
        "vit",
    )
    assert not any("embedded default" in n for n in notes)
    assert model_args.model_config == "vit-s16" and data_args.data_dir == str(tmp_path)
    assert args.learning_rate == 5e-5  # TrainingArguments' own default, not the digits recipe's


SHIPPED = sorted(CONFIGS.glob("*.yaml"))
RECIPE_OF = {"t5_": "text_classification", "causal_lm": "causal_lm"}  # by prefix; else vit


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_parses(path):
    # GPU recipes ask for bf16, which TrainingArguments accepts on this CPU-only machine only
    # with use_cpu
    recipe = next((r for p, r in RECIPE_OF.items() if path.name.startswith(p)), "vit")
    model_args, data_args, args, _, _ = parse_args([str(path), "--use_cpu", "true"], recipe)
    assert args.sparsity_config().enabled


def test_paper_recipe_matches_spec():
    model_args, data_args, args, _, _ = parse_args(
        [str(CONFIGS / "vit_b16_imagenet_mdgf_exp_1of32.yaml"), "--use_cpu", "true"], "vit"
    )
    cfg = args.sparsity_config()
    assert (cfg.n_keep, cfg.m, cfg.locations, cfg.sparse_dim) == (1, 32, ("FF",), "row")
    assert cfg.recipe_name == "MDGF-exp" and cfg.decay_coef == 1e-4
    assert args.learning_rate == 1e-3 and args.weight_decay == 0.01 and args.max_grad_norm == 1.0
    assert args.bf16 and args.lr_scheduler_type == "cosine"
    assert args.per_device_train_batch_size * 8 * args.gradient_accumulation_steps == 4096
    assert data_args.mixup_alpha == 0.5 and data_args.randaugment == "m15-n2"
    assert data_args.streaming and args.max_steps > 0
    assert model_args.bce_loss and parse_overrides(model_args.config_overrides) == {
        "drop_path_rate": 0.1
    }


def test_flags_after_a_file_override_it(tmp_path):
    _, _, args, _, _ = parse_args(
        [
            str(CONFIGS / "vit_digits.yaml"),
            "--max_steps",
            "7",
            "--m",
            "4",
            "--output_dir",
            str(tmp_path),
        ],
        "vit",
    )
    assert args.max_steps == 7 and args.m == 4 and args.n_keep == 1
    assert args.output_dir == str(tmp_path)


def test_seed_yaml_translation():
    data = yaml.safe_load((CONFIGS / "vit_b16_seed_style.yaml").read_text())
    out, ignored = seed_yaml_to_args(data, world_size=16)
    assert out["learning_rate"] == pytest.approx(1e-3 * 256 * 16 / 4096)
    assert out["num_train_epochs"] == 350 and out["per_device_train_batch_size"] == 256
    assert out["warmup_steps"] == pytest.approx(15 / 350)
    assert out["bf16"] is True and out["max_grad_norm"] == 1.0 and out["optim"] == "adamw_torch"
    assert out["mixup_alpha"] == 0.5 and out["randaugment"] == "m15-n2"
    assert out["model_config"] == "timm:vit_base_patch16_224"
    assert out["config_overrides"] == "drop_path_rate=0.1" and out["bce_loss"] is True
    assert out["dataset_name"] == "imagefolder" and out["data_dir"] == "/data/imagenet"
    assert out["n_keep"] == 1 and out["m"] == 32 and out["decay_type"] == "EXP"
    assert "clip_mode" not in ignored and "dataset" not in ignored


def test_seed_yaml_with_a_misspelt_key_is_refused(tmp_path):
    data = yaml.safe_load((CONFIGS / "vit_b16_seed_style.yaml").read_text())
    data["n_sparsityy"] = 2
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(NMSparsityConfigError, match="n_sparsityy"):
        parse_args([str(path)], "vit")


def test_unknown_model_config_is_a_clear_error():
    with pytest.raises(NMSparsityConfigError, match="model_config='vit-huge'"):
        build_model(ModelArguments(model_config="vit-huge"), "vit", None, 10)


def test_overrides_parse_yaml_values():
    assert parse_overrides("a=1,b=0.5,c=[2, 2],d=x") == {"a": 1, "b": 0.5, "c": [2, 2], "d": "x"}
    with pytest.raises(NMSparsityConfigError, match="key=value"):
        parse_overrides("oops")


def _tiny_run(tmp_path, config, *flags, family="vit"):
    out = tmp_path / "out"
    summary = run(
        [str(config), *TINY_RECIPE_FLAGS, "--output_dir", str(out), *flags],
        family=family,
    )
    final = out / "final"
    assert summary["verified"] and verify_checkpoint(final).ok
    assert json.loads((final / "nmsparse_summary.json").read_text())["steps"] == 6
    assert "verified N:M: PASS" in format_summary(summary)
    return summary


@pytest.mark.slow
def test_vit_recipe_runs_on_digits(tmp_path):
    summary = _tiny_run(tmp_path, CONFIGS / "vit_digits.yaml")
    assert summary["pattern"] == {"FF": "1:8"}
    assert 0.0 <= summary["eval"]["eval_accuracy"] <= 1.0


def test_same_seed_same_run_whatever_the_rng_state_before(tmp_path):
    """The recipe seeds before building the from-scratch model (the Trainer seeds only in its
    __init__, after the model exists): two runs with the same --seed give the same weights and
    losses even when the global RNG was left elsewhere by whatever ran before."""
    results = []
    for i, disturb in enumerate((1, 2)):
        torch.manual_seed(disturb)
        _tiny_run(tmp_path / str(i), CONFIGS / "vit_digits.yaml")
        final = tmp_path / str(i) / "out" / "final"
        logs = json.loads((final / "nmsparse_summary.json").read_text())
        quality = {
            k: v for k, v in logs["eval"].items() if "runtime" not in k and "per_second" not in k
        }
        results.append((load_file(final / "model.safetensors"), quality))
    (w0, e0), (w1, e1) = results
    assert w0.keys() == w1.keys()
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert e0 == e1 and "eval_loss" in e0


@pytest.mark.slow
@pytest.mark.parametrize("model_config", ["swin-digits", "swinv2-digits"])
def test_swin_recipes_run_on_digits(tmp_path, model_config):
    summary = _tiny_run(
        tmp_path,
        CONFIGS / "swin_digits.yaml",
        "--model_config",
        model_config,
        "--locations",
        "FF,QKV",
        family="swin",
    )
    assert set(summary["pattern"]) == {"FF", "Q", "K", "V"}


@pytest.mark.slow
def test_seed_style_yaml_runs_through_timm_wrapper(tmp_path):
    data = yaml.safe_load((CONFIGS / "vit_b16_seed_style.yaml").read_text())
    for key in ("dataset", "data_dir", "amp", "amp_dtype", "workers"):
        data.pop(key)  # the embedded digits, fp32 on CPU
    data.update(model="vit_tiny_patch16_224", m_sparsity=8, batch_size=16, epochs=1, workers=0)
    path = tmp_path / "seed.yaml"
    path.write_text(yaml.safe_dump(data))
    summary = _tiny_run(
        tmp_path,
        path,
        "--config_overrides",
        "img_size=16,patch_size=4,embed_dim=64,depth=2,num_heads=2,drop_path_rate=0.1",
        "--image_size",
        "16",
    )
    assert summary["recipe"] == "MDGF-exp" and summary["pattern"] == {"FF": "1:8"}
    assert any("seed (timm) keys translated" in n for n in summary["notes"])


@pytest.mark.slow
def test_streaming_without_max_steps_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="max_steps"):
        run(
            [
                str(CONFIGS / "vit_digits.yaml"),
                "--streaming",
                "true",
                "--output_dir",
                str(tmp_path),
            ],
            family="vit",
        )
    assert not (tmp_path / "final").exists()


@pytest.mark.slow
def test_paper_style_bce_mixup_randaugment_run(tmp_path):
    """The paper's training choices on the embedded data: BCE on soft labels, mixup, RandAugment;
    evaluation sees one-hot labels and unmixed images."""
    summary = _tiny_run(
        tmp_path,
        CONFIGS / "vit_digits.yaml",
        "--mixup_alpha",
        "0.5",
        "--randaugment",
        "m9-n2",
        "--bce_loss",
        "true",
    )
    config = json.loads((tmp_path / "out" / "final" / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    assert 0.0 <= summary["eval"]["eval_accuracy"] <= 1.0


@pytest.mark.slow
def test_streaming_run_with_max_steps(tmp_path):
    summary = _tiny_run(
        tmp_path, CONFIGS / "vit_digits.yaml", "--streaming", "true", "--shuffle_buffer_size", "64"
    )
    assert summary["steps"] == 6 and summary["verified"]


@pytest.mark.multiprocess
def test_default_recipe_under_ddp_two_cpu_processes(tmp_path):
    """`accelerate launch --config_file accelerate_configs/multi_cpu.yaml recipes/train_vit.py`:
    two gloo processes, a DDP-wrapped model, identical sparse weights on both ranks, and a
    checkpoint that verifies."""
    from conftest import free_port

    accelerate = Path(sys.executable).with_name("accelerate")
    out = tmp_path / "o"
    cmd = [
        str(accelerate),
        "launch",
        "--config_file",
        str(ROOT / "accelerate_configs" / "multi_cpu.yaml"),
        "--main_process_port",
        str(free_port()),
        str(ROOT / "recipes" / "train_vit.py"),
        str(CONFIGS / "vit_digits.yaml"),
        "--max_steps",
        "4",
        "--output_dir",
        str(out),
        "--eval_strategy",
        "no",
        "--max_train_samples",
        "128",
        "--max_eval_samples",
        "32",
        "--per_device_train_batch_size",
        "16",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((out / "final" / "nmsparse_summary.json").read_text())
    assert summary["distributed"] == {
        "world_size": 2,
        "wrapper": "DistributedDataParallel",
        "backend": "gloo",
        "ranks_agree": True,
    }
    assert summary["distributed_mode"] == "DDP"  # what really ran, not what was asked for
    assert "processes: 2 (DDP, DistributedDataParallel" in proc.stdout
    assert summary["verified"] and verify_checkpoint(out / "final").ok
