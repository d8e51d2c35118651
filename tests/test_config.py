"""Executable spec of `NMSparsityConfig` (docs/METHOD.md §2): defaults, our keys and the seed's keys and enum
spellings, round trips, and one clear error per invalid setting."""

from __future__ import annotations

import dataclasses
import textwrap

import pytest
import yaml

from nmsparse_hf import NMSparsityConfig, NMSparsityConfigError

# The sparsity keys that end the seed's real (timm) training YAML, preceded by some timm keys.
SEED_YAML = textwrap.dedent(
    """\
    model: vit_base_patch16_224
    lr_base: 0.001
    epochs: 350
    weight_decay: 0.01
    decay_rate: 0.1
    sched: cosine
    warmup_epochs: 15
    mixup: 0.5
    drop_path: 0.1
    bce_loss: true
    sparsity_type: STRUCTURED_NM
    decay_type: EXP
    decay_coef: 0.0001
    dense_steps: 0
    fine_tune_steps: 0
    structure_decay_flag: False
    structure_decay_type: fine
    n_sparsity: 1
    m_sparsity: 32
    sparsity_loc: FF
    n_sparsity_qkv: 1
    m_sparsity_qkv: 8
    sparse_dim: ROW
    """
)

SEED_TIMM_KEYS = {
    "model": "vit_base_patch16_224",
    "lr_base": 0.001,
    "epochs": 350,
    "weight_decay": 0.01,
    "decay_rate": 0.1,
    "sched": "cosine",
    "warmup_epochs": 15,
    "mixup": 0.5,
    "drop_path": 0.1,
    "bce_loss": True,
}


def test_defaults():
    cfg = NMSparsityConfig()
    assert (cfg.n_keep, cfg.m) == (2, 4)
    assert (cfg.n_keep_qkv, cfg.m_qkv) == (2, 4)  # None resolves to the FF pattern
    assert cfg.sparse_dim == "row"
    assert cfg.locations == ("FF",)
    assert cfg.sparsity_type == "structure_nm"
    assert cfg.decay_type == "step"
    assert cfg.decay_coef == 1e-4
    assert cfg.structure_decay is False
    assert cfg.structure_decay_type == "sparsify"
    assert cfg.structure_decay_start_k == 8
    assert cfg.structure_decay_fallback is False
    assert cfg.srste_lambda == 2e-4
    assert cfg.dense_fraction == 0.0 and cfg.finetune_fraction == 0.0
    assert cfg.finetune_mask == "recompute"
    assert cfg.target_modules is None and cfg.exclude_modules is None
    assert cfg.extra == {}
    assert cfg.enabled and not cfg.mask_decay
    assert cfg.recipe_name == "STE"


def test_target_pattern_per_location():
    cfg = NMSparsityConfig(n_keep=1, m=32, n_keep_qkv=1, m_qkv=8, locations="FF,QKV,O,C")
    assert [cfg.target_pattern(loc) for loc in ("FF", "Q", "K", "V", "O", "C")] == [
        (1, 32),
        (1, 8),
        (1, 8),
        (1, 8),
        (1, 32),
        (1, 32),
    ]


# ----------------------------------------------------------------------------- round trips
def _rich() -> NMSparsityConfig:
    return NMSparsityConfig(
        n_keep=1,
        m=16,
        n_keep_qkv=2,
        m_qkv=8,
        sparse_dim="col",
        locations=["FF", "Q", "K"],
        decay_type="linear",
        decay_coef=3e-4,
        structure_decay=True,
        structure_decay_type="fine",
        structure_decay_start_k=16,
        structure_decay_fallback=True,
        srste_lambda=1e-3,
        dense_fraction=0.1,
        finetune_fraction=0.2,
        finetune_mask="frozen",
        target_modules=["fc1", "fc2"],
        exclude_modules=r".*layer\.0\..*",
    )


def test_dict_round_trip():
    cfg = _rich()
    d = cfg.to_dict()
    assert d["locations"] == "FF,Q,K"
    assert d["target_modules"] == ["fc1", "fc2"]
    assert "extra" not in d
    back = NMSparsityConfig.from_dict(d)
    assert back == cfg
    assert back.to_dict() == d
    assert {f.name for f in dataclasses.fields(cfg)} - {"extra"} == set(d)


def test_yaml_round_trip(tmp_path):
    cfg = _rich()
    path = tmp_path / "sparsity.yaml"
    cfg.to_yaml(path)
    assert yaml.safe_load(path.read_text()) == cfg.to_dict()
    assert NMSparsityConfig.from_yaml(path) == cfg


def test_from_yaml_our_keys(tmp_path):
    path = tmp_path / "ours.yaml"
    path.write_text(
        "n_keep: 1\nm: 8\nlocations: FF,Q\ndecay_type: exp\ndecay_coef: 1e-4\ndense_fraction: 0.1\n"
    )
    cfg = NMSparsityConfig.from_yaml(path)
    assert (cfg.n_keep, cfg.m, cfg.locations) == (1, 8, ("FF", "Q"))
    # YAML reads "1e-4" (no dot) as a string; it must still become the float 1e-4
    assert cfg.decay_coef == 1e-4 and isinstance(cfg.decay_coef, float)
    assert cfg.recipe_name == "MDGF-exp"


def test_from_yaml_nested_section(tmp_path):
    path = tmp_path / "nested.yaml"
    path.write_text("sparsity:\n  n_sparsity: 1\n  m_sparsity: 4\n  sparsity_type: SRSTE\n")
    cfg = NMSparsityConfig.from_yaml(path)
    assert (cfg.n_keep, cfg.m, cfg.sparsity_type) == (1, 4, "srste")


def test_from_yaml_missing_file(tmp_path):
    with pytest.raises(NMSparsityConfigError, match="nope.yaml"):
        NMSparsityConfig.from_yaml(tmp_path / "nope.yaml")


# ----------------------------------------------------------------------------- seed spellings
def test_seed_timm_yaml_loads_with_ignore_unknown(tmp_path):
    path = tmp_path / "vit_b_1_32.yaml"
    path.write_text(SEED_YAML)
    cfg = NMSparsityConfig.from_yaml(path, ignore_unknown=True)
    assert cfg == NMSparsityConfig(
        n_keep=1,
        m=32,
        n_keep_qkv=1,
        m_qkv=8,
        sparse_dim="row",
        locations=("FF",),
        sparsity_type="structure_nm",
        decay_type="exp",
        decay_coef=1e-4,
        structure_decay=False,
        structure_decay_type="fine",
        dense_fraction=0.0,
        finetune_fraction=0.0,
    )
    assert cfg.extra == SEED_TIMM_KEYS
    assert cfg.mask_decay and cfg.recipe_name == "MDGF-exp"
    assert cfg.target_pattern("FF") == (1, 32) and cfg.target_pattern("Q") == (1, 8)


def test_seed_timm_yaml_without_ignore_unknown_raises(tmp_path):
    path = tmp_path / "vit_b_1_32.yaml"
    path.write_text(SEED_YAML)
    with pytest.raises(NMSparsityConfigError) as err:
        NMSparsityConfig.from_yaml(path)
    msg = str(err.value)
    assert "lr_base" in msg and "ignore_unknown" in msg and str(path) in msg


def test_split_known_keys():
    known, rest = NMSparsityConfig.split_known_keys(yaml.safe_load(SEED_YAML))
    assert rest == SEED_TIMM_KEYS
    assert known["n_keep"] == 1 and known["m"] == 32 and known["dense_fraction"] == 0
    assert known["locations"] == "FF" and known["structure_decay"] is False


@pytest.mark.parametrize(
    "key,value,field,expected",
    [
        ("sparsity_type", "SRSTE", "sparsity_type", "srste"),
        ("sparsity_type", "STRUCTURED_NM", "sparsity_type", "structure_nm"),
        ("sparsity_type", "DENSE", "sparsity_type", "dense"),
        ("decay_type", "LINEAR", "decay_type", "linear"),
        ("decay_type", "EXP", "decay_type", "exp"),
        ("decay_type", "STEP", "decay_type", "step"),
        ("structure_decay_type", "SPARSIFY", "structure_decay_type", "sparsify"),
        ("structure_decay_type", "FINE", "structure_decay_type", "fine"),
        ("sparse_dim", "COL", "sparse_dim", "col"),
        ("sparse_dim", "ROW", "sparse_dim", "row"),
        ("sparsity_loc", "FF,QKV", "locations", ("FF", "Q", "K", "V")),
        ("sparsity_loc", "FF, Q, K", "locations", ("FF", "Q", "K")),
        ("sparsity_loc", "qkv", "locations", ("Q", "K", "V")),
        ("structure_decay_flag", "True", "structure_decay", True),
        ("dense_steps", 0.1, "dense_fraction", 0.1),
        ("fine_tune_steps", 0.2, "finetune_fraction", 0.2),
    ],
)
def test_seed_enum_spellings(key, value, field, expected):
    data = {"n_sparsity": 1, "m_sparsity": 8, key: value}
    if value == "SRSTE":
        data["decay_type"] = "STEP"
    cfg = NMSparsityConfig.from_dict(data)
    assert getattr(cfg, field) == expected


def test_seed_dict_and_our_dict_give_equal_configs():
    seed = {
        "sparsity_type": "STRUCTURED_NM",
        "decay_type": "LINEAR",
        "decay_coef": 0.0002,
        "dense_steps": 0.1,
        "fine_tune_steps": 0.2,
        "structure_decay_flag": True,
        "structure_decay_type": "SPARSIFY",
        "n_sparsity": 1,
        "m_sparsity": 16,
        "sparsity_loc": "FF,QKV",
        "n_sparsity_qkv": 2,
        "m_sparsity_qkv": 8,
        "sparse_dim": "COL",
    }
    ours = {
        "sparsity_type": "structure_nm",
        "decay_type": "linear",
        "decay_coef": 2e-4,
        "dense_fraction": 0.1,
        "finetune_fraction": 0.2,
        "structure_decay": True,
        "structure_decay_type": "sparsify",
        "n_keep": 1,
        "m": 16,
        "locations": ["FF", "Q", "K", "V"],
        "n_keep_qkv": 2,
        "m_qkv": 8,
        "sparse_dim": "col",
    }
    a, b = NMSparsityConfig.from_dict(seed), NMSparsityConfig.from_dict(ours)
    assert a == b
    assert a.recipe_name == "SDGF-stepwise+MDGF-linear"
    # keys are case-insensitive and accept '-' for '_'
    assert (
        NMSparsityConfig.from_dict({k.upper().replace("_", "-"): v for k, v in seed.items()}) == a
    )


def test_unknown_key_raises_with_did_you_mean():
    with pytest.raises(NMSparsityConfigError) as err:
        NMSparsityConfig.from_dict({"n_sparisty": 1, "m_sparsity": 8})
    assert "n_sparisty" in str(err.value) and "did you mean 'n_sparsity'" in str(err.value)
    with pytest.raises(NMSparsityConfigError, match="did you mean 'decay_coef'"):
        NMSparsityConfig.from_dict({"decay_cof": 1e-4})


def test_ignore_unknown_keeps_them_in_extra():
    cfg = NMSparsityConfig.from_dict({"n_keep": 1, "m": 8, "lr": 0.1}, ignore_unknown=True)
    assert cfg.extra == {"lr": 0.1}
    assert cfg == NMSparsityConfig(n_keep=1, m=8)  # extra does not take part in equality


def test_conflicting_duplicate_spellings_raise():
    with pytest.raises(NMSparsityConfigError) as err:
        NMSparsityConfig.from_dict({"n_sparsity": 1, "n_keep": 2, "m": 8})
    msg = str(err.value)
    assert "n_sparsity" in msg and "n_keep" in msg
    with pytest.raises(NMSparsityConfigError, match="dense_fraction"):
        NMSparsityConfig.from_dict({"dense_steps": 0.1, "dense_epochs": 0.2})
    # the same value under two spellings is not a conflict
    cfg = NMSparsityConfig.from_dict({"n_sparsity": 1, "n_keep": 1, "m": 8})
    assert cfg.n_keep == 1


def test_from_dict_rejects_a_non_mapping():
    with pytest.raises(NMSparsityConfigError, match="mapping"):
        NMSparsityConfig.from_dict(["n_keep", 1])


# ----------------------------------------------------------------------------- validation errors
@pytest.mark.parametrize(
    "kw,field,value",
    [
        ({"n_keep": 4, "m": 4}, "n_keep", "4:4"),
        ({"n_keep": 5, "m": 4}, "n_keep", "5:4"),
        ({"n_keep": 0, "m": 4}, "n_keep", "0:4"),
        ({"n_keep": -1, "m": 4}, "n_keep", "-1:4"),
        ({"n_keep_qkv": 8, "m_qkv": 8}, "n_keep_qkv", "8:8"),
        ({"n_keep": 1.5}, "n_keep", "1.5"),
        ({"sparsity_type": "magnitude"}, "sparsity_type", "magnitude"),
        ({"decay_type": "cosine"}, "decay_type", "cosine"),
        ({"structure_decay_type": "coarse"}, "structure_decay_type", "coarse"),
        ({"locations": "FF,MLP"}, "location", "MLP"),
        ({"locations": ""}, "locations", "empty"),
        ({"sparse_dim": "diag"}, "sparse_dim", "diag"),
        ({"finetune_mask": "sticky"}, "finetune_mask", "sticky"),
        ({"dense_fraction": -0.1}, "dense_fraction", "-0.1"),
        ({"dense_fraction": 1.5}, "dense_fraction", "1.5"),
        ({"finetune_fraction": 2.0}, "finetune_fraction", "2.0"),
        ({"finetune_fraction": float("nan")}, "finetune_fraction", "nan"),
        ({"dense_fraction": 0.5, "finetune_fraction": 0.5}, "dense_fraction + finetune", "0.5"),
        ({"dense_fraction": 0.7, "finetune_fraction": 0.6}, "dense_fraction + finetune", "0.7"),
        ({"decay_coef": -1e-4}, "decay_coef", "-0.0001"),
        ({"decay_coef": "fast"}, "decay_coef", "fast"),
        ({"dense_fraction": None}, "dense_fraction", "None"),
        ({"srste_lambda": -1.0}, "srste_lambda", "-1.0"),
        ({"sparsity_type": "srste", "decay_type": "linear"}, "decay_type", "linear"),
        ({"sparsity_type": "srste", "decay_type": "exp"}, "decay_type", "exp"),
        ({"structure_decay_start_k": 3}, "structure_decay_start_k", "3"),
        ({"structure_decay_start_k": 0}, "structure_decay_start_k", "0"),
        ({"structure_decay": "maybe"}, "structure_decay", "maybe"),
        ({"target_modules": 5}, "target_modules", "5"),
    ],
)
def test_validation_error_names_field_and_value(kw, field, value):
    with pytest.raises(NMSparsityConfigError) as err:
        NMSparsityConfig(**kw)
    msg = str(err.value)
    assert field in msg, msg
    assert value in msg, msg


def test_validation_errors_via_seed_keys():
    with pytest.raises(NMSparsityConfigError, match="1:1"):
        NMSparsityConfig.from_dict({"n_sparsity": 1, "m_sparsity": 1})
    with pytest.raises(NMSparsityConfigError, match="'BOGUS'"):
        NMSparsityConfig.from_dict({"sparsity_type": "BOGUS"})


def test_dense_type_allows_no_sparse_phase_and_no_locations():
    cfg = NMSparsityConfig(sparsity_type="dense", dense_fraction=1.0, locations="")
    assert not cfg.enabled and cfg.recipe_name == "dense"


def test_integral_floats_become_ints():
    cfg = NMSparsityConfig(n_keep=1.0, m=8.0)
    assert (cfg.n_keep, cfg.m) == (1, 8) and isinstance(cfg.n_keep, int)


# ----------------------------------------------------------------------------- recipe names
@pytest.mark.parametrize(
    "kw,name",
    [
        ({"sparsity_type": "dense"}, "dense"),
        ({}, "STE"),
        ({"decay_type": "step", "decay_coef": 0.5}, "STE"),
        ({"sparsity_type": "srste"}, "SR-STE"),
        ({"decay_type": "linear"}, "MDGF-linear"),
        ({"decay_type": "exp"}, "MDGF-exp"),
        ({"structure_decay": True}, "SDGF-stepwise"),
        ({"structure_decay": True, "structure_decay_type": "fine"}, "SDGF-geometric"),
        ({"structure_decay": True, "decay_type": "exp"}, "SDGF-stepwise+MDGF-exp"),
        ({"structure_decay": True, "sparsity_type": "srste"}, "SDGF-stepwise+SR-STE"),
        (
            {"structure_decay": True, "structure_decay_type": "fine", "decay_type": "linear"},
            "SDGF-geometric+MDGF-linear",
        ),
    ],
)
def test_recipe_name(kw, name):
    assert NMSparsityConfig(**kw).recipe_name == name


def test_from_yaml_refuses_unreadable_files_in_one_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("n_keep: 1\nm: [8\n")
    with pytest.raises(NMSparsityConfigError, match=r"broken\.yaml:3: YAML syntax error"):
        NMSparsityConfig.from_yaml(path)
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(NMSparsityConfigError, match="not UTF-8 text"):
        NMSparsityConfig.from_yaml(path)
    with pytest.raises(NMSparsityConfigError, match="does not exist"):
        NMSparsityConfig.from_yaml(tmp_path)
