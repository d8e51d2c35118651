"""The seed's recipe files load unchanged and mean what the seed meant (`recipes.seed`).

``tests/seed_configs/`` holds the two training configs shipped by the paper's research repository,
unchanged: the ViT-B/16 run (timm train.py keys + sparsity keys) and the Swin-v2 run (sparsity keys
only, SR-STE with a ``decay_type`` the seed ignores).
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from nmsparse_hf import NMSparsityConfig
from nmsparse_hf.config import parse_locations
from nmsparse_hf.errors import NMSparsityConfigError
from nmsparse_hf.recipes.arguments import parse_args
from nmsparse_hf.recipes.seed import (
    INERT_KEYS,
    REQUIRED_VALUES,
    SCHEDULE_KEYS,
    SEED_DEFAULTS,
    is_seed_yaml,
    seed_yaml_to_args,
)

HERE = Path(__file__).resolve().parent
SEED_CONFIGS = HERE / "seed_configs"
VIT = SEED_CONFIGS / "vit_base_training.yaml"
SWIN = SEED_CONFIGS / "swin_v2_base_training.yaml"


def _parse(path, family="vit", *flags):
    return parse_args([str(path), "--use_cpu", "true", *flags], family)


def _write(tmp_path, data: dict, name="seed.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


# ---------------------------------------------------------------------------------------------
# Both seed files


def test_seed_vit_file_loads_as_the_seed_meant():
    recipe = _parse(VIT)
    cfg = recipe.training.sparsity_config()
    assert cfg.recipe_name == "MDGF-exp" and cfg.decay_coef == 1e-4
    assert (cfg.n_keep, cfg.m, cfg.n_keep_qkv, cfg.m_qkv) == (1, 32, 1, 8)
    assert (cfg.locations, cfg.sparse_dim, cfg.structure_decay) == (("FF",), "row", False)
    args = recipe.training
    # on 16 processes (16 x 256 = the seed's global batch 4096): timm's lr_base x (4096 / 4096)
    assert seed_yaml_to_args(yaml.safe_load(VIT.read_text()), 16)[0]["learning_rate"] == 1e-3
    assert args.per_device_train_batch_size == 256 and args.weight_decay == 0.01
    assert args.num_train_epochs == 352  # 350 + timm's 2 cool-down epochs
    assert args.lr_scheduler_kwargs == {"min_lr": 1e-7}
    assert args.max_grad_norm == 1.0 and args.bf16 and args.adam_epsilon == 1e-8
    assert recipe.model.model_config == "timm:vit_base_patch16_224" and recipe.model.bce_loss
    assert "drop_path_rate=0.1" in recipe.model.config_overrides
    assert recipe.data.randaugment == "m15-n2" and recipe.data.mixup_alpha == 0.5
    # decay_rate & co are not used by timm's cosine schedule either: said, not dropped silently
    assert any("decay_rate" in n and "cosine" in n for n in recipe.notes)


def test_timm_learning_rate_rule_sqrt_for_adaptive_optimizers():
    data = yaml.safe_load(VIT.read_text())
    out, _ = seed_yaml_to_args(data, world_size=1)
    assert out["learning_rate"] == pytest.approx(1e-3 * (256 / 4096) ** 0.5)  # adamw: sqrt
    out, _ = seed_yaml_to_args({**data, "lr_base_scale": "linear"}, world_size=1)
    assert out["learning_rate"] == pytest.approx(1e-3 * 256 / 4096)
    out, _ = seed_yaml_to_args({**data, "lr": 0.01}, world_size=1)
    assert out["learning_rate"] == 0.01


def test_seed_swin_file_srste_with_a_decay_type_warns_once_and_trains_srste():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recipe = _parse(SWIN, "swinv2")
    said = [w for w in caught if "does not apply under sparsity_type=SRSTE" in str(w.message)]
    assert len(said) == 1 and "decay_type='linear'" in str(said[0].message)
    cfg = recipe.training.sparsity_config()
    assert cfg.recipe_name == "SR-STE" and cfg.decay_type == "step"
    assert (cfg.n_keep, cfg.m, cfg.locations, cfg.sparse_dim) == (2, 4, ("FF",), "col")
    assert cfg.decay_coef == 0.0008
    assert (cfg.n_keep_qkv, cfg.m_qkv) == (2, 4)  # the seed's QKV default, not the FF pattern
    assert any("does not apply" in n for n in recipe.notes)


def test_our_own_keys_still_refuse_srste_with_mask_decay(tmp_path):
    """The relaxation lives in the seed translation only."""
    with pytest.raises(NMSparsityConfigError, match="decay_type"):
        NMSparsityConfig(sparsity_type="srste", decay_type="linear")
    ours = _write(tmp_path, {"sparsity_type": "srste", "decay_type": "linear", "m": 4})
    with pytest.raises(NMSparsityConfigError, match="decay_type"):
        _parse(ours)


# ---------------------------------------------------------------------------------------------
# The seed's defaults and spellings


def test_omitted_sparsity_keys_take_the_seed_defaults(tmp_path):
    path = _write(tmp_path, {"sparsity_type": "STRUCTURED_NM", "sparsity_loc": "QKVFF"})
    assert is_seed_yaml(yaml.safe_load(path.read_text()), set())
    cfg = _parse(path).training.sparsity_config()
    assert cfg.decay_coef == 2e-4  # the seed's default (ours is 1e-4)
    assert (cfg.n_keep, cfg.m, cfg.n_keep_qkv, cfg.m_qkv) == (2, 4, 2, 4)
    assert cfg.locations == ("FF", "Q", "K", "V") and cfg.decay_type == "step"
    dense = _parse(_write(tmp_path, {"n_sparsity": 1, "m_sparsity": 8}, "d.yaml"))
    assert dense.training.sparsity_config().sparsity_type == "dense"  # the seed's None


def test_omitted_timm_keys_take_timms_train_py_defaults():
    minimal = {"model": "vit_tiny_patch16_224", "opt": "adamw", "sparsity_type": "SRSTE"}
    out, _ = seed_yaml_to_args({**minimal, "sparsity_loc": "FF"})
    assert out["label_smoothing_factor"] == 0.1 and out["train_interpolation"] == "random"
    assert out["per_device_train_batch_size"] == 128 and out["num_train_epochs"] == 300
    assert out["seed"] == 42 and out["color_jitter"] == 0.4 and out["hflip"] == 0.5
    assert out["max_grad_norm"] == 0.0  # timm clips only when clip_grad is set
    assert SEED_DEFAULTS["decay_coef"] == 2e-4 and SEED_DEFAULTS["n_sparsity_qkv"] == 2


@pytest.mark.parametrize(
    ("spelling", "expected"),
    [
        ("KQFF", ("FF", "Q", "K")),
        ("QKVFF", ("FF", "Q", "K", "V")),
        ("FF,Q,K", ("FF", "Q", "K")),
        ("ffkq", ("FF", "Q", "K")),
        ("FF,QKV", ("FF", "Q", "K", "V")),
        (["ff", "o"], ("FF", "O")),
    ],
)
def test_seed_location_spellings(spelling, expected):
    assert parse_locations(spelling) == expected
    assert NMSparsityConfig(locations=spelling).locations == expected


@pytest.mark.parametrize("spelling", ["FN", "ATTN", "FFF", "QKX"])
def test_location_typos_are_refused_not_ignored(spelling):
    with pytest.raises(NMSparsityConfigError, match=f"unknown location '{spelling}'"):
        parse_locations(spelling)


def test_seed_file_with_kqff_locations(tmp_path):
    data = {**yaml.safe_load(SWIN.read_text()), "sparsity_loc": "KQFF", "sparsity_type": "SRSTE"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = _parse(_write(tmp_path, data), "swinv2").training.sparsity_config()
    assert cfg.locations == ("FF", "Q", "K")


def test_a_sparse_seed_file_without_locations_is_refused(tmp_path):
    with pytest.raises(NMSparsityConfigError, match="sparsity_loc is not set"):
        _parse(_write(tmp_path, {"sparsity_type": "STRUCTURED_NM", "n_sparsity": 1}))


# ---------------------------------------------------------------------------------------------
# Every timm key is translated, inert, schedule-bound or refused: never dropped silently


def test_every_key_of_the_seed_file_is_accounted_for():
    data = yaml.safe_load(VIT.read_text())
    sparsity, rest = NMSparsityConfig.split_known_keys(data)
    handled = set(SEED_DEFAULTS) | INERT_KEYS | set(SCHEDULE_KEYS) | set(REQUIRED_VALUES)
    assert set(rest) <= handled


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sched": "step"}, "sched='step'.*decay_rate"),
        ({"sched": "multistep"}, "sched='multistep'"),
        ({"opt": "sgd"}, "opt='sgd'"),
        ({"model_ema": True}, "model_ema=True"),
        ({"mixup_off_epoch": 100}, "mixup_off_epoch=100"),
        ({"layer_decay": 0.75}, "layer_decay=0.75"),
        ({"lr_cycle_limit": 3}, "lr_cycle_limit=3"),
        ({"bce_target_thresh": 0.2}, "bce_target_thresh=0.2"),
        ({"clip_mode": "agc"}, "clip_mode='agc'"),
        ({"aug_repeats": 3}, "aug_repeats=3"),
    ],
)
def test_timm_settings_we_cannot_reproduce_fail_clearly(tmp_path, change, message):
    data = {**yaml.safe_load(VIT.read_text()), **change}
    with pytest.raises(NMSparsityConfigError, match=message):
        _parse(_write(tmp_path, data))


def test_timm_augmentation_keys_are_translated(tmp_path):
    change = {
        "cutmix": 1.0,
        "mixup_switch_prob": 0.3,
        "mixup_mode": "pair",
        "smoothing": 0.1,
        "reprob": 0.25,
        "remode": "const",
        "recount": 2,
        "scale": [0.35, 1.0],
        "ratio": [0.8, 1.25],
        "hflip": 0.0,
        "color_jitter": 0.3,
        "interpolation": "bilinear",
        "train_interpolation": "bicubic",
        "crop_pct": 0.95,
        "aa": "rand-m9-n2-mstd0.5",
    }
    data = {**yaml.safe_load(VIT.read_text()), **change}
    recipe = _parse(_write(tmp_path, data))
    d = recipe.data
    assert (d.cutmix_alpha, d.mixup_switch_prob, d.mixup_mode) == (1.0, 0.3, "pair")
    assert (d.random_erasing, d.random_erasing_mode, d.random_erasing_count) == (0.25, "const", 2)
    assert (d.crop_scale, d.crop_ratio, d.hflip, d.color_jitter) == (
        [0.35, 1.0],
        [0.8, 1.25],
        0.0,
        0.3,
    )
    assert (d.interpolation, d.train_interpolation, d.crop_pct) == ("bilinear", "bicubic", 0.95)
    assert d.randaugment == "rand-m9-n2-mstd0.5"
    assert recipe.training.label_smoothing_factor == 0.1


def test_seed_module_passes_the_complexity_check():
    ruff = Path(sys.executable).with_name("ruff")
    if not ruff.exists():
        pytest.skip("ruff is not installed next to this Python")
    seed = HERE.parent / "nmsparse_hf" / "recipes" / "seed.py"
    proc = subprocess.run(
        [str(ruff), "check", "--select", "C901", "--config", "lint.mccabe.max-complexity=10", seed],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_cli_reads_a_seed_file_through_the_recipes_one_reader(tmp_path):
    """``nmsparse report`` takes the model a seed file names from the recipes' translation (the
    same model a run builds) and refuses what the recipes refuse (a duplicate key)."""
    from nmsparse_hf.cli import _named_model

    named = _named_model(str(VIT))
    recipe = _parse(VIT)
    assert named["model_config"] == recipe.model.model_config == "timm:vit_base_patch16_224"
    assert named["config_overrides"] == recipe.model.config_overrides
    twice = tmp_path / "twice.yaml"
    twice.write_text(VIT.read_text() + "\nepochs: 10\n")
    with pytest.raises(NMSparsityConfigError, match="duplicate key 'epochs'"):
        _named_model(str(twice))
