"""Which layers are targeted, at which location, for each model family and for explicit patterns."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_swin, tiny_swinv2, tiny_timm_vit, tiny_vit
from torch import nn

from nmsparse_hf import NMSparsifier, NMSparsityConfig, NMTargetError, find_targets


def _locs(model, **cfg):
    targets, skipped = find_targets(model, NMSparsityConfig(**cfg))
    return {t.name: t.locations for t in targets}, {s.name: s.reason for s in skipped}


def test_vit_current_names_each_location():
    model = tiny_vit()
    got, skipped = _locs(model, locations="FF,Q,K,V,O")
    assert got == {
        f"vit.layers.{i}.{suffix}": [loc]
        for i in range(2)
        for suffix, loc in [
            ("attention.q_proj", "Q"),
            ("attention.k_proj", "K"),
            ("attention.v_proj", "V"),
            ("attention.o_proj", "O"),
            ("mlp.fc1", "FF"),
            ("mlp.fc2", "FF"),
        ]
    }
    assert "patch embedding" in skipped["vit.embeddings.patch_embeddings.projection"]
    assert "classifier" in skipped["classifier"]


@pytest.mark.parametrize(
    "locations, expected",
    [
        ("FF", {"mlp.fc1", "mlp.fc2"}),
        ("Q", {"attention.q_proj"}),
        ("K", {"attention.k_proj"}),
        ("V", {"attention.v_proj"}),
        ("FF,Q,K", {"mlp.fc1", "mlp.fc2", "attention.q_proj", "attention.k_proj"}),
        ("QKV", {"attention.q_proj", "attention.k_proj", "attention.v_proj"}),
        ("O", {"attention.o_proj"}),
    ],
)
def test_vit_locations_select_exactly(locations, expected):
    got, skipped = _locs(tiny_vit(), locations=locations)
    assert set(got) == {f"vit.layers.{i}.{s}" for i in range(2) for s in expected}
    not_in = [n for n, r in skipped.items() if "not in locations" in r]
    assert len(not_in) == 2 * (6 - len(expected))


class _OldViTAttention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attention = nn.ModuleDict(
            {"query": nn.Linear(d, d), "key": nn.Linear(d, d), "value": nn.Linear(d, d)}
        )
        self.output = nn.ModuleDict({"dense": nn.Linear(d, d)})


class _OldViTLayer(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attention = _OldViTAttention(d)
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(d, 2 * d)})
        self.output = nn.ModuleDict({"dense": nn.Linear(2 * d, d)})
        self.layernorm_before = nn.LayerNorm(d)


class OldNamesViT(nn.Module):
    """The module tree of transformers < 5 ViT (and of the keys save_pretrained still writes)."""

    def __init__(self, d=16):
        super().__init__()
        from transformers import ViTConfig

        self.config = ViTConfig(hidden_size=d)
        self.vit = nn.Module()
        self.vit.embeddings = nn.Module()
        self.vit.embeddings.patch_embeddings = nn.Module()
        self.vit.embeddings.patch_embeddings.projection = nn.Conv2d(3, d, 4, 4)
        self.vit.encoder = nn.Module()
        self.vit.encoder.layer = nn.ModuleList([_OldViTLayer(d), _OldViTLayer(d)])
        self.classifier = nn.Linear(d, 10)


def test_vit_older_module_names():
    got, skipped = _locs(OldNamesViT(), locations="FF,Q,K,V,O")
    expected = {}
    for i in range(2):
        p = f"vit.encoder.layer.{i}."
        expected.update(
            {
                p + "attention.attention.query": ["Q"],
                p + "attention.attention.key": ["K"],
                p + "attention.attention.value": ["V"],
                p + "attention.output.dense": ["O"],
                p + "intermediate.dense": ["FF"],
                p + "output.dense": ["FF"],
            }
        )
    assert got == expected
    assert set(skipped) == {"vit.embeddings.patch_embeddings.projection", "classifier"}


def test_swin_targets_and_patch_merging_dense():
    got, skipped = _locs(tiny_swin(), locations="FF,QKV")
    assert set(got) == {
        f"swin.encoder.layers.{s}.blocks.0.{x}"
        for s in range(2)
        for x in ["attention.q_proj", "attention.k_proj", "attention.v_proj", "mlp.fc1", "mlp.fc2"]
    }
    assert "patch merging" in skipped["swin.encoder.layers.0.downsample.reduction"]


def test_swinv2_targets_and_position_bias_mlp_dense():
    got, skipped = _locs(tiny_swinv2(), locations="FF,Q,K,V,O")
    for s in range(2):
        p = f"swinv2.encoder.layers.{s}.blocks.0."
        assert got[p + "attention.self.query"] == ["Q"]
        assert got[p + "attention.self.key"] == ["K"]
        assert got[p + "attention.self.value"] == ["V"]
        assert got[p + "attention.output.dense"] == ["O"]
        assert got[p + "intermediate.dense"] == ["FF"]
        assert got[p + "output.dense"] == ["FF"]
        for k in (0, 2):
            reason = skipped[p + f"attention.self.continuous_position_bias_mlp.{k}"]
            assert "position-bias" in reason
    assert not any("continuous_position_bias" in n for n in got)


def test_timm_fused_qkv_row_blocks():
    model = tiny_timm_vit()
    targets, _ = find_targets(model, NMSparsityConfig(locations="FF,Q,V"))
    by_name = {t.name: t for t in targets}
    qkv = by_name["timm_model.blocks.0.attn.qkv"]
    assert [(b.location, b.rows) for b in qkv.blocks] == [("Q", (0, 64)), ("V", (128, 192))]
    assert by_name["timm_model.blocks.0.mlp.fc1"].locations == ["FF"]
    assert "timm_model.blocks.0.attn.proj" not in by_name
    assert "timm_model.head" not in by_name


def test_timm_qkv_masks_each_block_with_its_pattern():
    model = tiny_timm_vit()
    cfg = NMSparsityConfig(n_keep=1, m=8, n_keep_qkv=2, m_qkv=4, locations="FF,Q,K")
    sp = NMSparsifier(model, cfg, total_steps=10)
    sp.finalize()
    w = model.timm_model.blocks[0].attn.qkv.weight.detach()
    q, k, v = w[:64], w[64:128], w[128:]
    assert (q.reshape(-1, 4) != 0).sum(-1).max() == 2 and (q == 0).float().mean() == 0.5
    assert (k == 0).float().mean() == 0.5
    assert (v != 0).all(), "V is not a configured location and must stay dense"
    fc1 = model.timm_model.blocks[0].mlp.fc1.weight
    assert (fc1 == 0).float().mean() == 0.875


def test_explicit_patterns_regex_and_suffix_list():
    model = tiny_vit()
    got, _ = _locs(model, target_modules=["fc1", "q_proj"])
    assert set(got) == {
        f"vit.layers.{i}.{s}" for i in range(2) for s in ("mlp.fc1", "attention.q_proj")
    }
    assert got["vit.layers.0.attention.q_proj"] == ["Q"]
    got, _ = _locs(model, target_modules=r"vit\.layers\.1\.mlp\.fc\d")
    assert set(got) == {"vit.layers.1.mlp.fc1", "vit.layers.1.mlp.fc2"}
    # a regex must match the whole name
    with pytest.raises(NMTargetError, match="matches no"):
        find_targets(model, NMSparsityConfig(target_modules=r"fc1"))
    # a suffix matches only at a dot boundary
    with pytest.raises(NMTargetError, match="matches no"):
        find_targets(model, NMSparsityConfig(target_modules=["c1"]))


def test_exclude_modules_overrides_preset():
    got, skipped = _locs(tiny_vit(), locations="FF", exclude_modules=["vit.layers.0.mlp.fc1"])
    assert set(got) == {"vit.layers.0.mlp.fc2", "vit.layers.1.mlp.fc1", "vit.layers.1.mlp.fc2"}
    assert skipped["vit.layers.0.mlp.fc1"] == "excluded by exclude_modules"


class PlainMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
        self.conv = nn.Conv2d(8, 8, 3)

    def forward(self, x):
        return self.net(x)


def test_any_model_by_patterns_and_unknown_family_error():
    model = PlainMLP()
    with pytest.raises(NMTargetError, match="has no nmsparse_hf preset.*target_modules"):
        find_targets(model, NMSparsityConfig())
    got, skipped = _locs(model, target_modules=r"net\.\d|conv")
    assert got == {"net.0": ["FF"], "net.2": ["FF"], "conv": ["C"]}


def test_location_matching_no_layer_is_an_error():
    with pytest.raises(NMTargetError, match=r"locations \['C'\] match no layer"):
        find_targets(tiny_vit(), NMSparsityConfig(locations="FF,C"))


def test_target_pattern_matching_non_linear_is_an_error():
    with pytest.raises(NMTargetError, match="neither nn.Linear nor nn.Conv2d"):
        find_targets(tiny_vit(), NMSparsityConfig(target_modules=r".*layernorm_before"))


def test_report_lists_targeted_and_skipped_with_reason():
    sp = NMSparsifier(tiny_vit(), NMSparsityConfig(locations="FF"), total_steps=10)
    text = sp.report()
    assert "vit.layers.0.mlp.fc1  FF  target 2:4" in text
    assert "vit.layers.0.attention.q_proj  linear 64x64  location Q not in locations" in text
    assert "patch embedding (always dense)" in text
    assert "classifier head (always dense)" in text


def test_shape_error_names_layer_shape_and_m_at_setup():
    model = tiny_vit(hidden=48)  # fc1 in=48, fc2 in=96; 1:32 needs 32 | 48 -> fails on fc1
    with pytest.raises(NMTargetError) as err:
        NMSparsifier(model, NMSparsityConfig(n_keep=1, m=32), total_steps=10)
    msg = str(err.value)
    assert "vit.layers.0.mlp.fc1" in msg and "(96, 48)" in msg and "M=32" in msg
    assert "vit.layers.0.mlp.fc2" not in msg  # 96 is a multiple of 32
    # nothing was attached
    assert not hasattr(model.vit.layers[0].mlp.fc2, "_nm_sparse")


def test_sdgf_stage_that_does_not_fit_errors_or_falls_back():
    # geometric 1:8 from k=8 has an 8:64 stage: fc1 (in=32) cannot take M=64
    cfg = dict(n_keep=1, m=8, structure_decay=True, structure_decay_type="fine")
    with pytest.raises(NMTargetError, match="SDGF stage 8:64.*structure_decay_fallback"):
        NMSparsifier(tiny_vit(hidden=32), NMSparsityConfig(**cfg), total_steps=40)
    model = tiny_vit(hidden=32)
    sp = NMSparsifier(model, NMSparsityConfig(**cfg, structure_decay_fallback=True), total_steps=40)
    fc1, fc2 = sp.layers["vit.layers.0.mlp.fc1"], sp.layers["vit.layers.0.mlp.fc2"]
    sp.update(0)  # stage 0 (8:64): fc1 (in 32) falls back to the next stage that fits, 4:32
    assert fc1.patterns == [(4, 32)] and fc2.patterns == [(8, 64)]
    sp.update(39)
    assert fc1.patterns == [(1, 8)] == fc2.patterns


def test_attaching_twice_is_an_error():
    model = tiny_vit()
    NMSparsifier(model, NMSparsityConfig(), total_steps=10)
    with pytest.raises(NMTargetError, match="already has an NMSparsifier"):
        NMSparsifier(model, NMSparsityConfig(), total_steps=10)


def test_biases_are_kept(batch):
    model = tiny_vit()
    biases = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("bias")}
    sp = NMSparsifier(model, NMSparsityConfig(n_keep=1, m=4, locations="FF,QKV,O"), 10)
    sp.update(5)
    model(pixel_values=batch[0])
    sp.finalize()
    for n, p in model.named_parameters():
        if n.endswith("bias"):
            assert torch.equal(p, biases[n]), n


def test_fused_qkv_row_blocks_refuse_a_sharded_weight():
    """Under FSDP2 a weight is a dim-0 shard between steps: fused-qkv row ranges would hit the
    wrong rows, so finalize refuses (a stand-in for a DTensor: anything with ``to_local``)."""
    model = tiny_timm_vit()
    sp = NMSparsifier(model, NMSparsityConfig(locations="FF,Q"), total_steps=4)
    qkv = model.timm_model.blocks[0].attn.qkv.weight
    qkv.to_local = lambda: qkv.data[:96]
    with pytest.raises(NMTargetError, match=r"qkv.*FSDP2 shard"):
        sp.finalize()
