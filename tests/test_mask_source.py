"""``mask_source="weights"`` (hold each weight's non-zero pattern for the whole run) and +0.0:
finalize writes +0.0 zeros, verify counts -0.0 zeros and warns (in memory and on disk)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_vit
from safetensors.torch import load_file, save_file

from nmsparse_hf import (
    NMSparsifier,
    NMSparsityConfig,
    NMSparsityConfigError,
    NMTargetError,
    nm_mask,
    verify_nm,
)

FF = (
    "vit.layers.0.mlp.fc1",
    "vit.layers.0.mlp.fc2",
    "vit.layers.1.mlp.fc1",
    "vit.layers.1.mlp.fc2",
)


def _negative_zeros(weight: torch.Tensor) -> int:
    return int((torch.signbit(weight) & (weight == 0)).sum())


def _pruned_vit(n_keep: int, m: int = 4, seed: int = 0):
    """A tiny ViT whose FF weights are pruned to n_keep:m by magnitude (+0.0 zeros)."""
    model = tiny_vit(seed=seed)
    with torch.no_grad():
        for name in FF:
            weight = model.get_submodule(name).weight
            weight.masked_fill_(~nm_mask(weight, n_keep, m), 0)
    return model


# ---------------------------------------------------------------------------------- config
def test_default_is_magnitude_and_weights_round_trips():
    assert NMSparsityConfig().mask_source == "magnitude"
    cfg = NMSparsityConfig(mask_source="WEIGHTS")
    assert cfg.mask_source == "weights"
    assert NMSparsityConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(dense_fraction=0.1), "dense_fraction"),
        (dict(structure_decay=True), "structure_decay"),
        (dict(decay_type="exp"), "decay_type"),
        (dict(sparsity_type="srste"), "sparsity_type"),
    ],
)
def test_weights_refuses_what_a_held_pattern_cannot_do(kwargs, field):
    with pytest.raises(NMSparsityConfigError) as exc:
        NMSparsityConfig(mask_source="weights", **kwargs)
    msg = str(exc.value)
    assert field in msg and "mask_source='magnitude'" in msg and "held" in msg


def test_unknown_mask_source_is_refused():
    with pytest.raises(NMSparsityConfigError, match="mask_source.*'wanda'.*magnitude"):
        NMSparsityConfig(mask_source="wanda")


# ---------------------------------------------------------------------------------- attach
def test_weights_that_are_not_nm_are_refused_naming_the_layer():
    model = _pruned_vit(n_keep=2)
    with torch.no_grad():
        model.vit.layers[1].mlp.fc2.weight[0, :4] = 1.0  # one group of 4 with 4 non-zeros
    cfg = NMSparsityConfig(n_keep=2, m=4, mask_source="weights")
    with pytest.raises(NMTargetError) as exc:
        NMSparsifier(model, cfg, total_steps=4)
    msg = str(exc.value)
    groups = model.vit.layers[1].mlp.fc2.weight.numel() // 4
    assert f"vit.layers.1.mlp.fc2: 1 of {groups} groups hold more than 2" in msg
    assert "vit.layers.0" not in msg and "mask_source='magnitude'" in msg
    assert not hasattr(model.vit.layers[0].mlp.fc1, "_nm_sparse")  # nothing attached
    # a dense model fails on every layer
    with pytest.raises(NMTargetError, match="vit.layers.0.mlp.fc1"):
        NMSparsifier(tiny_vit(), cfg, total_steps=4)


def test_pattern_is_held_bit_for_bit_through_adamw_with_weight_decay(batch):
    """Pruned at 1:4 and held at a 2:4 target: a magnitude mask would keep one more weight per
    group (a zero) and let it grow; the held mask never does."""
    x, y = batch
    model = _pruned_vit(n_keep=1)
    start = {n: model.get_submodule(n).weight.detach().clone() for n in FF}
    cfg = NMSparsityConfig(n_keep=2, m=4, mask_source="weights")
    sp = NMSparsifier(model, cfg, total_steps=20)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(20):
        sp.update(step)
        assert sp.plan.alpha == 0.0
        model(pixel_values=x, labels=y).loss.backward()
        for name in FF:
            grad = model.get_submodule(name).weight.grad
            assert (grad[start[name] == 0] == 0).all(), name
        opt.step()
        opt.zero_grad()
    sp.update(20)
    for name in FF:
        weight = model.get_submodule(name).weight
        assert torch.equal(weight != 0, start[name] != 0), name
        assert not torch.equal(weight[start[name] != 0], start[name][start[name] != 0])
    report = sp.finalize()
    assert report.ok
    for name in FF:
        weight = model.get_submodule(name).weight
        assert torch.equal(weight != 0, start[name] != 0), name
        assert _negative_zeros(weight) == 0


def test_held_pattern_survives_set_total_steps_later(batch):
    """As the Trainer attaches it: no run length yet, then set_total_steps and update."""
    x, y = batch
    model = _pruned_vit(n_keep=2)
    before = model.vit.layers[0].mlp.fc1.weight != 0
    sp = NMSparsifier(model, NMSparsityConfig(mask_source="weights"), total_steps=None)
    sp.set_total_steps(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        sp.update(step)
        model(pixel_values=x, labels=y).loss.backward()
        opt.step()
        opt.zero_grad()
    sp.finalize()
    assert torch.equal(model.vit.layers[0].mlp.fc1.weight != 0, before)


# ---------------------------------------------------------------------------------- +0.0
def test_finalize_writes_positive_zeros_and_keeps_every_kept_bit():
    model = tiny_vit(seed=3)
    sp = NMSparsifier(model, NMSparsityConfig(n_keep=1, m=4, locations="FF,QKV"), total_steps=4)
    before = {t.name: t.module.weight.detach().clone() for t in sp.targets}
    masks = {t.name: sp.layers[t.name].mask(before[t.name], sp.layers[t.name].target_patterns)
             for t in sp.targets}  # fmt: skip
    negatives = sum(int((w < 0).logical_and(~masks[n]).sum()) for n, w in before.items())
    assert negatives > 100  # the old `weight.mul_(mask)` wrote this many -0.0
    sp.finalize()
    for target in sp.targets:
        weight = target.module.weight.detach()
        assert _negative_zeros(weight) == 0, target.name
        expected = torch.where(masks[target.name], before[target.name], 0.0)
        assert torch.equal(weight.view(torch.int32), expected.view(torch.int32)), target.name
        assert torch.equal(weight != 0, masks[target.name]), target.name


def test_verify_counts_negative_zeros_and_warns():
    model = tiny_vit()
    sp = NMSparsifier(model, NMSparsityConfig(n_keep=1, m=4), total_steps=4)
    sp.finalize()
    clean = verify_nm(model)
    assert clean.negative_zeros == 0 and clean.warnings() == [] and "warning" not in str(clean)
    fc2 = model.vit.layers[1].mlp.fc2.weight
    with torch.no_grad():
        fc2[fc2 == 0] = -0.0
    count = int((fc2 == 0).sum())
    report = verify_nm(model)
    assert report.ok  # still N:M: a warning, not a failure
    assert report.negative_zeros == count
    (row,) = [c for c in report.layers if c.negative_zeros]
    assert row.name == "vit.layers.1.mlp.fc2" and row.negative_zeros == count
    assert f"warning: {count} zero weight(s) are stored as -0.0" in str(report)
    assert "vit.layers.1.mlp.fc2" in str(report).splitlines()[-1]


def test_verify_checkpoint_and_cli_warn_about_negative_zeros(tmp_path, capsys):
    from nmsparse_hf.cli import main as cli
    from nmsparse_hf.export import save_sparse_pretrained, verify_checkpoint

    model = tiny_vit()
    sp = NMSparsifier(model, NMSparsityConfig(n_keep=1, m=4), total_steps=4)
    sp.finalize()
    path = save_sparse_pretrained(model, sp, tmp_path / "ckpt")
    report = verify_checkpoint(path)
    assert report.ok and report.negative_zeros == 0
    tensors = load_file(path / "model.safetensors")
    (key,) = [k for k in tensors if k.endswith("layer.0.output.dense.weight")]
    weight = tensors[key]
    count = int((weight == 0).sum())
    tensors[key] = weight.masked_fill(weight == 0, -0.0)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    report = verify_checkpoint(path)
    assert report.ok and report.negative_zeros == count
    assert [c.negative_zeros for c in report.layers if c.negative_zeros] == [count]
    assert cli(["verify", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"warning: {count} zero weight(s) are stored as -0.0" in out
    assert cli(["verify", str(path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["negative_zeros"] for r in result["layers"] if r["negative_zeros"]] == [count]
    assert any("-0.0" in w for w in result["warnings"])
