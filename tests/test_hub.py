"""Sparse checkpoints (hub.py): on-disk names, save, reload, verify, tampering, card, push."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_swin, tiny_swinv2, tiny_timm_vit, tiny_vit
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nmsparse_hf import (
    NMSparsifier,
    NMSparsityConfig,
    NMSparsityError,
    NMVerificationError,
    verify_nm,
)
from nmsparse_hf.export import (
    load_sparse_metadata,
    push_sparse_to_hub,
    save_sparse_pretrained,
    verify_checkpoint,
)
from nmsparse_hf.export.checkpoint import build_metadata
from nmsparse_hf.export.metadata import MANIFEST, on_disk_names

FACTORIES = {"vit": tiny_vit, "swin": tiny_swin, "swinv2": tiny_swinv2, "timm": tiny_timm_vit}
# one layer per family: (current module name, name in the files save_pretrained writes)
KNOWN_NAMES = {
    "vit": [
        ("vit.layers.0.mlp.fc1", "vit.encoder.layer.0.intermediate.dense"),
        ("vit.layers.1.mlp.fc2", "vit.encoder.layer.1.output.dense"),
        ("vit.layers.0.attention.q_proj", "vit.encoder.layer.0.attention.attention.query"),
    ],
    "swin": [
        (
            "swin.encoder.layers.0.blocks.0.mlp.fc1",
            "swin.encoder.layers.0.blocks.0.intermediate.dense",
        ),
        (
            "swin.encoder.layers.1.blocks.0.attention.v_proj",
            "swin.encoder.layers.1.blocks.0.attention.self.value",
        ),
    ],
    "swinv2": [
        (
            "swinv2.encoder.layers.0.blocks.0.intermediate.dense",
            "swinv2.encoder.layers.0.blocks.0.intermediate.dense",
        ),
        (
            "swinv2.encoder.layers.0.blocks.0.attention.self.key",
            "swinv2.encoder.layers.0.blocks.0.attention.self.key",
        ),
    ],
    "timm": [
        ("timm_model.blocks.0.attn.qkv", "timm_model.blocks.0.attn.qkv"),
        ("timm_model.blocks.1.mlp.fc2", "timm_model.blocks.1.mlp.fc2"),
    ],
}
PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def train_sparse(family: str = "vit", steps: int = 4, **config):
    """A tiny model of ``family`` trained ``steps`` real AdamW steps with N:M masking, finalized."""
    model = FACTORIES[family]()
    cfg = NMSparsityConfig(**{"n_keep": 2, "m": 4, "locations": "FF,QKV", **config})
    sparsifier = NMSparsifier(model, cfg, total_steps=steps)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        sparsifier.update(step)
        x = torch.randn(4, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (4,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(pixel_values=x).logits, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    sparsifier.finalize()
    model.eval()
    return model, sparsifier


def train_and_save(path: Path, family: str = "vit", **save_kwargs):
    """`train_sparse`, then `save_sparse_pretrained` into ``path``; returns (model, sparsifier)."""
    model, sparsifier = train_sparse(family)
    save_sparse_pretrained(model, sparsifier, path, eval_results={"top1": 0.625}, **save_kwargs)
    return model, sparsifier


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One finalized, saved checkpoint per family: {family: (model, sparsifier, dir)}."""
    out = {}
    for family in FACTORIES:
        path = tmp_path_factory.mktemp(family) / "ckpt"
        model, sparsifier = train_and_save(path, family)
        out[family] = (model, sparsifier, path)
    return out


def copy_ckpt(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def corrupt_one_pruned_weight(path: Path, layer: str) -> None:
    """Set one exact zero of ``<layer>.weight`` to 1.0 in the safetensors file (rewritten)."""
    file = path / "model.safetensors"
    tensors = load_file(file)
    weight = tensors[f"{layer}.weight"].clone()
    idx = (weight == 0).nonzero()[0]
    weight[tuple(idx)] = 1.0
    tensors[f"{layer}.weight"] = weight
    save_file(tensors, file, metadata={"format": "pt"})


def edit_metadata(path: Path, edit) -> None:
    config = path / "config.json"
    data = json.loads(config.read_text())
    edit(data["nm_sparsity"])
    config.write_text(json.dumps(data))


# ---------------------------------------------------------------------------------- names
@pytest.mark.parametrize("family", FACTORIES)
def test_on_disk_names_are_the_keys_save_pretrained_writes(saved, family):
    model, sparsifier, path = saved[family]
    with safe_open(str(path / "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
    mapping = on_disk_names(model, sparsifier.layers)
    # 2 blocks x (Q, K, V, fc1, fc2); timm's fused qkv is one layer of three row blocks
    assert len(mapping) == len(sparsifier.layers) == (6 if family == "timm" else 10)
    assert all(f"{disk}.weight" in keys for disk in mapping.values())
    for current, disk in KNOWN_NAMES[family]:
        assert mapping[current] == disk
    meta = load_sparse_metadata(path)
    assert meta.current_names == {disk: current for current, disk in mapping.items()}
    assert set(meta.layers_current) == set(mapping)
    assert all(meta.layers[d] == meta.layers_current[c] for c, d in mapping.items())


def test_on_disk_names_of_a_reloaded_model_and_without_original_format(saved):
    from transformers import AutoModelForImageClassification

    model, sparsifier, path = saved["vit"]
    reloaded = AutoModelForImageClassification.from_pretrained(path)
    assert on_disk_names(reloaded, sparsifier.layers) == on_disk_names(model, sparsifier.layers)
    same = on_disk_names(model, ["vit.layers.0.mlp.fc1"], save_original_format=False)
    assert same == {"vit.layers.0.mlp.fc1": "vit.layers.0.mlp.fc1"}


def test_on_disk_names_rejects_a_name_without_weight(vit):
    with pytest.raises(NMSparsityError, match="vit.nothing.*no parameter 'vit.nothing.weight'"):
        on_disk_names(vit, ["vit.nothing"])


# ---------------------------------------------------------------------------------- save / reload
@pytest.mark.parametrize("family", FACTORIES)
def test_plain_from_pretrained_gives_identical_logits_and_keeps_metadata(saved, family):
    from transformers import AutoModelForImageClassification

    model, sparsifier, path = saved[family]
    reloaded = AutoModelForImageClassification.from_pretrained(path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=PIXELS).logits, model(pixel_values=PIXELS).logits)
    on_disk = json.loads((path / "config.json").read_text())["nm_sparsity"]
    assert reloaded.config.nm_sparsity == on_disk
    assert on_disk["n_keep"] == 2 and on_disk["m"] == 4 and on_disk["sparse_dim"] == "row"
    assert on_disk["locations"] == {"FF": [2, 4], "Q": [2, 4], "K": [2, 4], "V": [2, 4]}
    assert on_disk["recipe"] == "STE" and on_disk["library_version"]
    assert on_disk["achieved_sparsity"] == pytest.approx(0.5)
    assert on_disk["nonzeros"] * 2 == on_disk["numel"]
    assert on_disk["location_sparsity"]["FF"] == {"pattern": [2, 4], "blocks": 4, "sparsity": 0.5}
    # the reloaded model verifies through its config's layers_current
    assert verify_nm(reloaded).ok


@pytest.mark.parametrize("family", FACTORIES)
def test_saved_checkpoint_verifies(saved, family):
    _, _, path = saved[family]
    report = verify_checkpoint(path)
    assert report.ok, str(report)
    assert len(report.layers) == 10 and not report.problems
    assert {c.location for c in report.layers} == {"FF", "Q", "K", "V"}


def test_timm_fused_qkv_blocks_are_checked_per_row_block(saved):
    report = verify_checkpoint(saved["timm"][2])
    names = [c.name for c in report.layers]
    assert "timm_model.blocks.0.attn.qkv[Q]" in names and "timm_model.blocks.0.attn.qkv[V]" in names
    assert next(c for c in report.layers if c.name.endswith("qkv[K]")).shape == (64, 64)


def test_exported_weights_are_exact_zeros(saved):
    _, _, path = saved["vit"]
    tensors = load_file(path / "model.safetensors")
    fc1 = tensors["vit.encoder.layer.0.intermediate.dense.weight"]
    groups = fc1.reshape(-1, 4)
    assert ((groups != 0).sum(dim=1) <= 2).all()
    assert int((fc1 == 0).sum()) == fc1.numel() // 2
    # never sparse: patch embedding, classifier, biases keep their non-zeros
    assert (tensors["classifier.weight"] != 0).all()
    assert (tensors["vit.encoder.layer.0.intermediate.dense.bias"] != 0).all()


def test_sharded_checkpoint_verifies_and_catches_corruption(tmp_path):
    path = tmp_path / "sharded"
    train_and_save(path, "vit", max_shard_size="50KB")
    assert (path / "model.safetensors.index.json").is_file()
    assert not (path / "model.safetensors").exists()
    assert verify_checkpoint(path).ok
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    key = "vit.encoder.layer.1.output.dense.weight"
    shard = path / index[key]
    tensors = load_file(shard)
    weight = tensors[key].clone()
    weight[0, :4] = 1.0
    tensors[key] = weight
    save_file(tensors, shard, metadata={"format": "pt"})
    report = verify_checkpoint(path)
    assert not report.ok
    assert [c.name for c in report.layers if not c.ok] == ["vit.encoder.layer.1.output.dense"]


def test_save_with_current_names_verifies(tmp_path):
    path = tmp_path / "current"
    train_and_save(path, "vit", save_original_format=False)
    meta = load_sparse_metadata(path)
    assert "vit.layers.0.mlp.fc1" in meta.layers
    assert verify_checkpoint(path).ok


# ---------------------------------------------------------------------------------- tampering
@pytest.mark.parametrize("family", ["vit", "timm"])
def test_one_corrupted_pruned_weight_is_caught(saved, tmp_path, family):
    _, _, src = saved[family]
    path = copy_ckpt(src, tmp_path)
    layer = KNOWN_NAMES[family][1][1]
    corrupt_one_pruned_weight(path, layer)
    report = verify_checkpoint(path)
    assert not report.ok
    bad = [c for c in report.layers if not c.ok]
    assert [c.name for c in bad] == [layer]
    assert bad[0].violations == 1 and bad[0].max_nonzeros == 3
    assert any("achieved_sparsity" in p for p in report.problems)
    with pytest.raises(NMVerificationError, match=layer):
        report.raise_if_failed()


def _first(meta):
    return next(iter(meta["layers"]))


@pytest.mark.parametrize(
    "edit, expected",
    [
        # wrong M in one layer (2:8): inconsistent with its location, and the weights violate 2:8
        (lambda m: m["layers"][_first(m)][0].update(m=8), "differs from location"),
        # wrong M everywhere, consistently: the weights are not 2:8
        (
            lambda m: (
                [
                    b.update(m=8)
                    for key in ("layers", "layers_current")
                    for bs in m[key].values()
                    for b in bs
                ]
                + [m["locations"].update({k: [2, 8] for k in m["locations"]})]
            ),
            None,
        ),
        # an M that cannot group the weight's shape
        (lambda m: m["layers"][_first(m)][0].update(m=3), "does not match the weights"),
        # a layer renamed to a tensor that does not exist
        (lambda m: m["layers"].update({"vit.ghost": m["layers"].pop(_first(m))}), "vit.ghost"),
        # a layer removed from both name maps: the recorded counts no longer add up
        (
            lambda m: (m["layers"].pop(_first(m)), m["layers_current"].popitem()),
            "metadata numel",
        ),
        # achieved sparsity that the weights do not have
        (lambda m: m.update(achieved_sparsity=0.75), "achieved_sparsity = 0.75"),
        (lambda m: m.update(nonzeros=m["nonzeros"] - 1), "metadata nonzeros"),
        # the two name maps disagree
        (lambda m: m["layers_current"].popitem(), "do not describe the same blocks"),
        (
            lambda m: m["layers_current"]["vit.layers.0.mlp.fc1"][0].update(location="Q"),
            "do not describe the same blocks",
        ),
    ],
)
def test_tampered_metadata_is_caught(saved, tmp_path, edit, expected):
    path = copy_ckpt(saved["vit"][2], tmp_path)
    edit_metadata(path, edit)
    report = verify_checkpoint(path)
    assert not report.ok
    if expected is None:  # the weights are not 2:8, and the top-level claims still say 2:4
        assert any(c.violations for c in report.layers)
        assert any("top-level pattern for FF is 2:4" in p for p in report.problems)
    else:
        assert any(expected in p for p in report.problems), report.problems


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda cfg: cfg.pop("nm_sparsity"), "no 'nm_sparsity' block"),
        (lambda cfg: cfg["nm_sparsity"].update(sparse_dim="diag"), "sparse_dim = 'diag'"),
        (lambda cfg: cfg["nm_sparsity"].update(layers={}), "'layers' must map"),
        (lambda cfg: cfg["nm_sparsity"].update(format="other/1"), "format = 'other/1'"),
        (
            lambda cfg: next(iter(cfg["nm_sparsity"]["layers"].values()))[0].update(m="four"),
            "has block",
        ),
    ],
)
def test_invalid_metadata_is_an_unreadable_input(saved, tmp_path, edit, match):
    path = copy_ckpt(saved["vit"][2], tmp_path)
    data = json.loads((path / "config.json").read_text())
    edit(data)
    (path / "config.json").write_text(json.dumps(data))
    with pytest.raises(NMSparsityError, match=match):
        verify_checkpoint(path)


def test_unreadable_inputs(tmp_path, saved):
    with pytest.raises(NMSparsityError, match="no such file"):
        load_sparse_metadata(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(NMSparsityError, match="not valid JSON"):
        load_sparse_metadata(tmp_path / "bad")
    path = copy_ckpt(saved["vit"][2], tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(NMSparsityError, match="no model.safetensors"):
        verify_checkpoint(path)
    (path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(NMSparsityError, match="unreadable safetensors"):
        verify_checkpoint(path)


# ---------------------------------------------------------------------------------- save rules
def test_save_requires_a_finalized_sparsifier(tmp_path, vit):
    sparsifier = NMSparsifier(vit, NMSparsityConfig(n_keep=2, m=4), total_steps=4)
    with pytest.raises(NMSparsityError, match=r"not finalized.*sparsifier.finalize\(\)"):
        save_sparse_pretrained(vit, sparsifier, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_save_never_overwrites_user_files(tmp_path):
    model, sparsifier = train_sparse("vit")
    path = tmp_path / "out"
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    with pytest.raises(NMSparsityError, match=r"notes.txt.*overwrite=True"):
        save_sparse_pretrained(model, sparsifier, path)
    assert sorted(p.name for p in path.iterdir()) == ["notes.txt"]
    save_sparse_pretrained(model, sparsifier, path, overwrite=True)
    assert (path / "notes.txt").read_text() == "mine"
    manifest = json.loads((path / MANIFEST).read_text())["files"]
    assert sorted(manifest) == ["README.md", "config.json", "model.safetensors"]


def test_resave_replaces_our_files_but_not_edited_ones(tmp_path):
    model, sparsifier = train_sparse("vit")
    path = tmp_path / "out"
    save_sparse_pretrained(model, sparsifier, path, max_shard_size="50KB")
    assert (path / "model.safetensors.index.json").is_file()
    # a re-save of ours replaces the previous one, stale shards included
    save_sparse_pretrained(model, sparsifier, path)
    assert sorted(p.name for p in path.iterdir()) == [
        MANIFEST,
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    # a file of ours that the user edited is theirs now
    (path / "README.md").write_text("my own card")
    with pytest.raises(NMSparsityError, match="README.md"):
        save_sparse_pretrained(model, sparsifier, path)
    assert (path / "README.md").read_text() == "my own card"


def test_sparse_metadata_keys_both_names(saved):
    model, sparsifier, _ = saved["swin"]
    meta = build_metadata(model, sparsifier, model.state_dict()).to_dict()
    assert json.loads(json.dumps(meta)) == meta
    assert [meta["layers_current"][c] for c in meta["current_names"].values()] == list(
        meta["layers"].values()
    )
    assert "swin.encoder.layers.0.blocks.0.attention.q_proj" in meta["layers_current"]
    assert "swin.encoder.layers.0.blocks.0.attention.self.query" in meta["layers"]


# ---------------------------------------------------------------------------------- model card
def test_model_card(saved):
    from huggingface_hub import ModelCard

    _, _, path = saved["vit"]
    card = ModelCard.load(path / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "image-classification"
    assert {"nmsparse_hf", "n:m-sparsity", "image-classification", "vit"} <= set(card.data.tags)
    text = card.text
    assert "| FF | 2:4 | 4 | 0.5000 |" in text and "| Q | 2:4 | 2 | 0.5000 |" in text
    assert "| `vit.encoder.layer.0.intermediate.dense` | FF | 2:4 | 128x64 | 0.5000 |" in text
    assert "| sparsity_type | structure_nm |" in text and "| decay_coef | 0.0001 |" in text
    assert "| top1 | 0.625 |" in text
    assert "recipe: STE" in text and "nmsparse verify" in text


# ---------------------------------------------------------------------------------- push
class _FakeUpload(Exception):
    pass


def test_push_uploads_exactly_the_saved_files(saved, tmp_path, monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.utils import filter_repo_objects

    path = copy_ckpt(saved["vit"][2], tmp_path)
    (path / "private_notes.txt").write_text("not for the Hub")
    calls = {}
    monkeypatch.setattr(
        HfApi, "create_repo", lambda self, repo_id, **kw: calls.setdefault("create", (repo_id, kw))
    )
    monkeypatch.setattr(
        HfApi, "upload_folder", lambda self, **kw: calls.setdefault("upload", kw) and "commit"
    )
    assert push_sparse_to_hub(path, "me/vit-2of4", token="hf_x", private=True) == "commit"
    assert calls["create"] == (
        "me/vit-2of4",
        {"private": True, "exist_ok": True, "repo_type": "model"},
    )
    upload = calls["upload"]
    assert upload["repo_id"] == "me/vit-2of4" and Path(upload["folder_path"]) == path
    files = sorted(p.name for p in path.iterdir())
    sent = sorted(filter_repo_objects(files, allow_patterns=upload["allow_patterns"]))
    assert sent == ["README.md", "config.json", "model.safetensors"]
    # what would be uploaded: metadata, exact zeros, the card
    assert json.loads((path / "config.json").read_text())["nm_sparsity"]["m"] == 4
    tensors = load_file(path / "model.safetensors")
    assert (
        (tensors["vit.encoder.layer.0.output.dense.weight"].reshape(-1, 4) != 0).sum(1) <= 2
    ).all()
    assert "n:m-sparsity" in (path / "README.md").read_text()


def test_push_refuses_a_failing_checkpoint(saved, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    path = copy_ckpt(saved["vit"][2], tmp_path)
    corrupt_one_pruned_weight(path, "vit.encoder.layer.0.intermediate.dense")

    def fail(*args, **kwargs):
        raise _FakeUpload("network must not be reached")

    monkeypatch.setattr(HfApi, "create_repo", fail)
    monkeypatch.setattr(HfApi, "upload_folder", fail)
    with pytest.raises(NMVerificationError, match="vit.encoder.layer.0.intermediate.dense"):
        push_sparse_to_hub(path, "me/bad")
