"""Executable spec of the sparsity schedule (docs/METHOD.md §5): phases, MDGF alpha, SDGF stages.

``SparsitySchedule(config, total_steps).at(step)`` is a pure function of the 0-based optimizer
step. sparse_start = round-half-up(dense_fraction * T), finetune_start = T -
round-half-up(finetune_fraction * T); each phase is inclusive at its start.
"""

from __future__ import annotations

import math
import random

import pytest

from nmsparse_hf import NMSparsityConfig, NMSparsityConfigError, SparsitySchedule, StepPlan


def _cfg(**kw) -> NMSparsityConfig:
    kw.setdefault("n_keep", 1)
    kw.setdefault("m", 8)
    return NMSparsityConfig(**kw)


def _phases(schedule: SparsitySchedule, steps) -> str:
    return "".join(schedule.at(t).phase[0].upper() for t in steps)


# ----------------------------------------------------------------------------- phases
@pytest.mark.parametrize(
    "total,dense,finetune,expected",
    [
        # 0.25*10 = 2.5 -> 3 (round half up; Python's round() would give 2)
        (10, 0.25, 0.25, "DDDSSSSFFF"),
        # 0.125*4 = 0.5 -> 1 (round() would give 0)
        (4, 0.125, 0.125, "DSSF"),
        # 0.5*7 = 3.5 -> 4; 0.125*7 = 0.875 -> 1
        (7, 0.5, 0.125, "DDDDSSF"),
        (6, 0.0, 0.0, "SSSSSS"),
        (5, 0.2, 0.0, "DSSSS"),
        (5, 0.0, 0.4, "SSSFF"),
    ],
)
def test_phase_boundaries(total, dense, finetune, expected):
    s = SparsitySchedule(_cfg(dense_fraction=dense, finetune_fraction=finetune), total)
    assert _phases(s, range(total)) == expected
    assert s.sparse_start == expected.index("S")
    assert s.finetune_start == (expected.index("F") if "F" in expected else total)


def test_phase_boundaries_large_total():
    s = SparsitySchedule(_cfg(dense_fraction=0.1, finetune_fraction=0.3), 1000)
    assert (s.sparse_start, s.finetune_start) == (100, 700)
    assert [s.at(t).phase for t in (0, 99, 100, 699, 700, 999)] == [
        "dense",
        "dense",
        "sparse",
        "sparse",
        "finetune",
        "finetune",
    ]
    assert s.at(1000).phase == "finetune"  # past the end stays in fine-tune
    assert s.at(5000).phase == "finetune"


def test_dense_plan_and_masked_flag():
    s = SparsitySchedule(_cfg(dense_fraction=0.5), 10)
    plan = s.at(4)
    assert plan == StepPlan(step=4, phase="dense", alpha=1.0, patterns={}, stage=0, j=0)
    assert not plan.masked
    assert s.at(5).masked and s.at(5).j == 0


def test_dense_sparsity_type_is_always_dense():
    s = SparsitySchedule(NMSparsityConfig(sparsity_type="dense"), 10)
    assert _phases(s, range(12)) == "D" * 12
    assert all(s.at(t).alpha == 1.0 and s.at(t).patterns == {} for t in range(10))


def test_negative_step_is_an_error():
    with pytest.raises(NMSparsityConfigError, match="-1"):
        SparsitySchedule(_cfg(), 10).at(-1)


@pytest.mark.parametrize("total", [0, -5, 2.5, True, "100"])
def test_total_steps_must_be_a_positive_int(total):
    with pytest.raises(NMSparsityConfigError, match="total_steps"):
        SparsitySchedule(_cfg(), total)


# ----------------------------------------------------------------------------- MDGF alpha
def test_linear_alpha_counts_from_sparse_start():
    # T=40, dense 0.25 -> sparse_start 10; finetune 0.25 -> finetune_start 30; beta 0.1
    cfg = _cfg(decay_type="linear", decay_coef=0.1, dense_fraction=0.25, finetune_fraction=0.25)
    s = SparsitySchedule(cfg, 40)
    expected = {
        0: 1.0,  # dense
        9: 1.0,  # dense
        10: 1.0,  # j = 0 (a step-origin would give max(1 - 1.0, 0) = 0 here)
        13: 0.7,  # j = 3
        15: 0.5,  # j = 5
        19: 0.1,  # j = 9
        20: 0.0,  # j = 10
        25: 0.0,  # j = 15: clamped at 0, never negative
        29: 0.0,
        30: 0.0,  # fine-tune: binary
        39: 0.0,
    }
    for step, alpha in expected.items():
        assert s.at(step).alpha == pytest.approx(alpha, abs=1e-12), step
    assert [s.at(t).j for t in (9, 10, 13, 30, 39)] == [0, 0, 3, 20, 29]


def test_exp_alpha_counts_from_sparse_start():
    cfg = _cfg(decay_type="exp", decay_coef=0.05, dense_fraction=0.25, finetune_fraction=0.25)
    s = SparsitySchedule(cfg, 40)
    assert s.at(9).alpha == 1.0
    assert s.at(10).alpha == pytest.approx(1.0)
    assert s.at(14).alpha == pytest.approx(math.exp(-0.2))
    assert s.at(20).alpha == pytest.approx(math.exp(-0.5))
    assert s.at(29).alpha == pytest.approx(math.exp(-0.95))
    assert s.at(30).alpha == 0.0  # fine-tune
    assert s.at(30).phase == "finetune"


def test_alpha_method_matches_formulas():
    lin = SparsitySchedule(_cfg(decay_type="linear", decay_coef=0.25), 100)
    assert [lin.alpha(j) for j in (0, 1, 2, 4, 8)] == [1.0, 0.75, 0.5, 0.0, 0.0]
    exp = SparsitySchedule(_cfg(decay_type="exp", decay_coef=0.5), 100)
    assert exp.alpha(4) == pytest.approx(math.exp(-2.0))


@pytest.mark.parametrize(
    "kw",
    [
        {"sparsity_type": "structure_nm", "decay_type": "step", "decay_coef": 0.5},
        {"sparsity_type": "srste", "decay_coef": 0.5},
        {"sparsity_type": "structure_nm", "structure_decay": True},
    ],
    ids=["ste", "srste", "sdgf"],
)
def test_alpha_is_zero_without_mask_decay(kw):
    s = SparsitySchedule(_cfg(dense_fraction=0.2, finetune_fraction=0.2, **kw), 20)
    assert [s.at(t).alpha for t in range(4)] == [1.0] * 4  # dense
    assert [s.at(t).alpha for t in range(4, 20)] == [0.0] * 16


def test_target_pattern_without_structure_decay():
    s = SparsitySchedule(_cfg(finetune_fraction=0.5), 10)
    assert all(s.at(t).patterns == {"FF": (1, 8)} for t in range(10))
    assert all(s.at(t).stage == 0 for t in range(10))


# ----------------------------------------------------------------------------- SDGF stages
@pytest.mark.parametrize(
    "n,m,expected",
    [
        (1, 8, [(7, 8), (4, 8), (2, 8), (1, 8)]),
        (2, 4, [(3, 4), (2, 4)]),
        (1, 4, [(3, 4), (2, 4), (1, 4)]),
        (1, 32, [(31, 32), (16, 32), (8, 32), (4, 32), (2, 32), (1, 32)]),
    ],
)
def test_stepwise_sequence(n, m, expected):
    total = 6 * len(expected)
    s = SparsitySchedule(
        _cfg(n_keep=n, m=m, structure_decay=True, structure_decay_type="sparsify"), total
    )
    seen = [s.at(t).patterns["FF"] for t in range(total)]
    assert [seen[i * 6] for i in range(len(expected))] == expected  # K equal stages of 6 steps
    assert seen == [p for p in expected for _ in range(6)]


@pytest.mark.parametrize(
    "start_k,expected",
    [
        (8, [(8, 64), (4, 32), (2, 16), (1, 8)]),
        (16, [(16, 128), (8, 64), (4, 32), (2, 16), (1, 8)]),
        (1, [(1, 8)]),
    ],
)
def test_geometric_sequence(start_k, expected):
    cfg = _cfg(structure_decay=True, structure_decay_type="fine", structure_decay_start_k=start_k)
    total = 2 * len(expected)
    s = SparsitySchedule(cfg, total)
    assert [s.at(t).patterns["FF"] for t in range(total)] == [p for p in expected for _ in "ab"]
    assert [s.at(t).stage for t in range(total)] == [i for i in range(len(expected)) for _ in "ab"]


def test_stage_boundaries_floor_j_k_over_l():
    # L = 10 steps, K = 4 stages: stage(j) = floor(4j/10) -> 0,0,0,1,1,2,2,2,3,3
    s = SparsitySchedule(_cfg(structure_decay=True), 10)
    assert [s.at(t).stage for t in range(10)] == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    p = [(7, 8), (4, 8), (2, 8), (1, 8)]
    assert [s.at(t).patterns["FF"] for t in range(10)] == [
        p[0], p[0], p[0], p[1], p[1], p[2], p[2], p[2], p[3], p[3]
    ]  # fmt: skip


def test_stage_boundaries_with_dense_and_finetune():
    # T=100: sparse [20, 80), L=60, K=4: stages start at 20, 35, 50, 65; target held in fine-tune
    cfg = _cfg(structure_decay=True, dense_fraction=0.2, finetune_fraction=0.2)
    s = SparsitySchedule(cfg, 100)
    steps = (19, 20, 34, 35, 49, 50, 64, 65, 79, 80, 99, 150)
    got = {t: (s.at(t).phase, s.at(t).patterns.get("FF"), s.at(t).stage) for t in steps}
    assert got == {
        19: ("dense", None, 0),
        20: ("sparse", (7, 8), 0),
        34: ("sparse", (7, 8), 0),
        35: ("sparse", (4, 8), 1),
        49: ("sparse", (4, 8), 1),
        50: ("sparse", (2, 8), 2),
        64: ("sparse", (2, 8), 2),
        65: ("sparse", (1, 8), 3),
        79: ("sparse", (1, 8), 3),
        80: ("finetune", (1, 8), 3),
        99: ("finetune", (1, 8), 3),
        150: ("finetune", (1, 8), 3),
    }
    assert s.boundaries() == {
        "dense": 0,
        "sparse": 20,
        "finetune": 80,
        "FF:stage1": 35,
        "FF:stage2": 50,
        "FF:stage3": 65,
    }


def test_sdgf_with_mdgf_alpha_keeps_decaying_across_stages():
    cfg = _cfg(
        structure_decay=True,
        decay_type="exp",
        decay_coef=0.1,
        dense_fraction=0.2,
        finetune_fraction=0.2,
    )
    s = SparsitySchedule(cfg, 100)
    for t in (20, 34, 35, 36, 50, 65, 79):
        plan = s.at(t)
        assert plan.alpha == pytest.approx(math.exp(-0.1 * (t - 20))), t
    assert s.at(35).alpha < s.at(34).alpha  # no reset to 1 at the stage boundary
    assert s.at(80).alpha == 0.0
    assert cfg.recipe_name == "SDGF-stepwise+MDGF-exp"


def test_qkv_pattern_is_independent_of_ff():
    cfg = _cfg(n_keep=1, m=32, n_keep_qkv=2, m_qkv=8, locations="FF,QKV")
    plan = SparsitySchedule(cfg, 10).at(3)
    assert plan.patterns == {"FF": (1, 32), "Q": (2, 8), "K": (2, 8), "V": (2, 8)}
    # without an explicit qkv pattern, Q/K/V use the FF one
    plan = SparsitySchedule(_cfg(n_keep=1, m=32, locations="FF,Q"), 10).at(3)
    assert plan.patterns == {"FF": (1, 32), "Q": (1, 32)}
    # a qkv pattern never leaks into FF (the reference's bug)
    only_ff = SparsitySchedule(_cfg(n_keep=1, m=32, n_keep_qkv=1, m_qkv=4), 10).at(3)
    assert only_ff.patterns == {"FF": (1, 32)}


def test_qkv_and_ff_stage_sequences_are_separate():
    # FF 1:32 stepwise has 6 stages, Q 2:8 has 3 (7:8, 4:8, 2:8); each cuts L=12 its own way
    cfg = _cfg(n_keep=1, m=32, n_keep_qkv=2, m_qkv=8, locations="FF,Q", structure_decay=True)
    s = SparsitySchedule(cfg, 12)
    ff = [s.at(t).patterns["FF"][0] for t in range(12)]
    q = [s.at(t).patterns["Q"] for t in range(12)]
    assert ff == [31, 31, 16, 16, 8, 8, 4, 4, 2, 2, 1, 1]
    assert q == [(7, 8)] * 4 + [(4, 8)] * 4 + [(2, 8)] * 4
    assert s.at(12).patterns == {"FF": (1, 32), "Q": (2, 8)}


def test_locations_argument_overrides_config():
    s = SparsitySchedule(_cfg(n_keep_qkv=1, m_qkv=4), 10, locations=("FF", "V", "O"))
    assert s.at(0).patterns == {"FF": (1, 8), "V": (1, 4), "O": (1, 8)}


# ----------------------------------------------------------------------------- purity
def _rich_config() -> NMSparsityConfig:
    return _cfg(
        n_keep=1,
        m=32,
        n_keep_qkv=1,
        m_qkv=8,
        locations="FF,QKV",
        structure_decay=True,
        structure_decay_type="fine",
        decay_type="linear",
        decay_coef=0.03,
        dense_fraction=0.125,
        finetune_fraction=0.25,
    )


def test_plan_is_a_pure_function_of_the_step():
    total = 64
    s = SparsitySchedule(_rich_config(), total)
    in_order = [s.at(t) for t in range(total + 3)]
    steps = list(range(total + 3))
    random.Random(0).shuffle(steps)
    shuffled = {t: s.at(t) for t in steps}
    assert [shuffled[t] for t in range(total + 3)] == in_order
    assert [s.at(t) for t in reversed(range(total + 3))] == in_order[::-1]
    # a fresh object (a resumed run) agrees step by step, starting anywhere
    for t in (0, 7, 8, 20, 47, 48, 63):
        assert SparsitySchedule(_rich_config(), total).at(t) == in_order[t]
    assert len({p.phase for p in in_order}) == 3  # the test covered every phase


def test_boundaries_agree_with_at():
    for cfg, total in (
        (_rich_config(), 64),
        (_rich_config(), 101),
        (_cfg(structure_decay=True), 10),
    ):
        s = SparsitySchedule(cfg, total)
        b = s.boundaries()
        assert s.at(b["sparse"]).phase == "sparse"
        if b["sparse"] > 0:
            assert s.at(b["sparse"] - 1).phase == "dense"
        assert s.at(b["finetune"] - 1).phase == "sparse"
        assert b["finetune"] >= total or s.at(b["finetune"]).phase == "finetune"
        for key, first in b.items():
            if ":stage" not in key:
                continue
            loc, i = key.split(":stage")
            seq = s.stages[loc]
            assert s.at(first).patterns[loc] == seq[int(i)], key
            assert s.at(first - 1).patterns[loc] == seq[int(i) - 1], key


# ----------------------------------------------------------------------------- too short
def test_too_short_sparse_phase_for_the_stages_raises():
    SparsitySchedule(_cfg(structure_decay=True), 4)  # 4 stages in 4 steps: fine
    with pytest.raises(NMSparsityConfigError, match="stage"):
        SparsitySchedule(_cfg(structure_decay=True), 3)
    with pytest.raises(NMSparsityConfigError, match="total_steps=6"):
        SparsitySchedule(_cfg(structure_decay=True, dense_fraction=0.5), 6)  # 3 sparse steps
    geo16 = _cfg(structure_decay=True, structure_decay_type="fine", structure_decay_start_k=16)
    SparsitySchedule(geo16, 5)
    with pytest.raises(NMSparsityConfigError):
        SparsitySchedule(geo16, 4)


def test_rounding_that_leaves_no_sparse_step_raises():
    # 0.45*10 = 4.5 -> 5 dense steps and 5 fine-tune steps: no sparse step at all
    with pytest.raises(NMSparsityConfigError):
        SparsitySchedule(_cfg(dense_fraction=0.45, finetune_fraction=0.45), 10)
