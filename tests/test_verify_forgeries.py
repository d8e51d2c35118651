"""verify_checkpoint against forgeries built the way an attacker would: start from a real saved
sparse checkpoint, edit config.json / safetensors / index, and keep the metadata's own counts
consistent (recomputed from the edited weights). Each must fail with one line naming the layer
(or the file), and nothing may hang."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_vit
from safetensors.torch import load_file, save_file

from nmsparse_hf import NMSparsifier, NMSparsityConfig, nm_mask
from nmsparse_hf.cli import main as cli
from nmsparse_hf.errors import NMCheckpointError
from nmsparse_hf.export import save_sparse_pretrained, verify_checkpoint
from nmsparse_hf.export.checkpoint import location_summaries

ROOT = Path(__file__).resolve().parents[1]
FC1 = "vit.encoder.layer.0.intermediate.dense"  # on disk; the module is vit.layers.0.mlp.fc1


def _save(path: Path, **save_kwargs) -> Path:
    model = tiny_vit(seed=0)
    sparsifier = NMSparsifier(model, NMSparsityConfig(n_keep=1, m=4, locations="FF,QKV"), 4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    sparsifier.finalize()
    return save_sparse_pretrained(model, sparsifier, path, **save_kwargs)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("forge")
    return {
        "single": _save(root / "single"),
        "sharded": _save(root / "sharded", max_shard_size="40KB"),
    }


@pytest.fixture
def single(saved, tmp_path):
    return Path(shutil.copytree(saved["single"], tmp_path / "single"))


@pytest.fixture
def sharded(saved, tmp_path):
    return Path(shutil.copytree(saved["sharded"], tmp_path / "sharded"))


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def _write_config(path: Path, config: dict) -> None:
    (path / "config.json").write_text(json.dumps(config))


def _edit_meta(path: Path, edit) -> None:
    config = _config(path)
    edit(config["nm_sparsity"])
    _write_config(path, config)


def _fix_counts(path: Path) -> None:
    """What a careful forger does last: make nonzeros, numel, achieved_sparsity and
    location_sparsity those of the weights the metadata now names."""
    report = verify_checkpoint(path)
    nonzeros = sum(c.nonzeros for c in report.layers)
    numel = sum(c.numel for c in report.layers)

    def fix(meta):
        meta.update(nonzeros=nonzeros, numel=numel, achieved_sparsity=1 - nonzeros / numel)
        meta["location_sparsity"] = {k: v.to_dict() for k, v in location_summaries(report).items()}

    _edit_meta(path, fix)


def _verify_cli(path: Path, capsys) -> tuple[int, str]:
    code = cli(["verify", str(path)])
    out = capsys.readouterr()
    return code, out.out + out.err


def _only_problem(path: Path, *needles: str) -> str:
    """The checkpoint fails, and only with problems that contain every needle (the counts and
    every other claim were kept consistent)."""
    report = verify_checkpoint(path)
    assert not report.ok
    assert all(c.ok for c in report.layers), [c.name for c in report.layers if not c.ok]
    assert len(report.problems) == 1, report.problems
    assert all(n in report.problems[0] for n in needles), report.problems
    assert "\n" not in report.problems[0]
    return report.problems[0]


def _current(path: Path, disk: str) -> str:
    return _config(path)["nm_sparsity"]["current_names"][disk]


# ---------------------------------------------------------------------------------- 1. rows
def test_blocks_covering_one_row_of_a_dense_layer_are_refused(single, capsys):
    tensors = load_file(single / "model.safetensors")
    dense = torch.randn_like(tensors[f"{FC1}.weight"])
    dense[:1] *= nm_mask(dense[:1], 1, 4)  # only row 0 is 1:4
    tensors[f"{FC1}.weight"] = dense
    save_file(tensors, single / "model.safetensors", metadata={"format": "pt"})
    block = {"location": "FF", "rows": [0, 1], "n_keep": 1, "m": 4}
    current = _current(single, FC1)

    def claim_row_0(meta):
        meta["layers"][FC1] = [block]
        meta["layers_current"][current] = [block]

    _edit_meta(single, claim_row_0)
    _fix_counts(single)
    problem = _only_problem(single, FC1, "rows [0, 1]", "FF rows [0, 128]")
    assert _verify_cli(single, capsys)[0] == 1
    assert problem.startswith(FC1)


def test_overlapping_blocks_are_refused(single):
    from nmsparse_hf.export.checkpoint import overlap_problems
    from nmsparse_hf.export.metadata import LayerBlock

    blocks = [LayerBlock("Q", 1, 4, (0, 64)), LayerBlock("K", 1, 4, (32, 96))]
    assert overlap_problems("qkv", blocks) == [
        "qkv: metadata blocks overlap (rows [0, 64] and [32, 96])"
    ]
    whole = [LayerBlock("FF", 1, 4), LayerBlock("FF", 1, 4, (0, 1))]
    assert "whole weight" in overlap_problems("fc1", whole)[0]
    assert (
        overlap_problems("qkv", [LayerBlock("Q", 1, 4, (0, 32)), LayerBlock("K", 1, 4, (32, 64))])
        == []
    )


# ---------------------------------------------------------------------------------- 2. axis
def test_fan_in_fan_out_claimed_on_a_linear_is_refused(single, capsys):
    """A Linear made 1:4 along its output dimension (the wrong axis) passes the group check once
    the metadata says the weight is stored transposed; the architecture says it is a Linear."""
    tensors = load_file(single / "model.safetensors")
    weight = torch.randn_like(tensors[f"{FC1}.weight"])
    wrong_axis = (weight.t() * nm_mask(weight.t(), 1, 4)).t().contiguous()
    assert not bool((nm_mask(wrong_axis, 1, 4) | (wrong_axis == 0)).all())  # not 1:4 along in
    tensors[f"{FC1}.weight"] = wrong_axis
    save_file(tensors, single / "model.safetensors", metadata={"format": "pt"})
    current = _current(single, FC1)

    def flip(meta):
        for key, name in (("layers", FC1), ("layers_current", current)):
            meta[key][name][0]["fan_in_fan_out"] = True

    _edit_meta(single, flip)
    _fix_counts(single)
    _only_problem(single, FC1, "fan_in_fan_out", "Linear")
    assert _verify_cli(single, capsys)[0] == 1


# ---------------------------------------------------------------------------------- 3. shards
def test_a_dense_copy_in_a_second_shard_is_refused(sharded, capsys):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    key = f"{FC1}.weight"
    sparse_shard = index[key]
    other = next(s for s in sorted(set(index.values())) if s != sparse_shard)
    tensors = load_file(sharded / other)
    dense = torch.randn_like(load_file(sharded / sparse_shard)[key])
    tensors[key] = dense
    save_file(tensors, sharded / other, metadata={"format": "pt"})
    # what from_pretrained makes of it: whichever copy it takes, verify must not pass
    from transformers import ViTForImageClassification

    loaded = ViTForImageClassification.from_pretrained(sharded).vit.layers[0].mlp.fc1.weight
    assert torch.equal(loaded, dense) or torch.equal(loaded, load_file(sharded / sparse_shard)[key])
    problem = _only_problem(sharded, key, sparse_shard, other, "stored in 2 weight files")
    assert problem.startswith(key)
    assert _verify_cli(sharded, capsys)[0] == 1


# ---------------------------------------------------------------------------------- 4. coverage
@pytest.mark.parametrize(
    "remove, reason",
    [
        (("config", "architectures"), "records no sparsity config"),
        (("config",), "records no sparsity config"),
        (("architectures",), "architectures [] name no class"),
    ],
)
def test_a_layer_dropped_with_config_or_architecture_removed_is_refused(
    single, capsys, remove, reason
):
    tensors = load_file(single / "model.safetensors")
    tensors[f"{FC1}.weight"] = torch.randn_like(tensors[f"{FC1}.weight"])  # dense now
    save_file(tensors, single / "model.safetensors", metadata={"format": "pt"})
    config = _config(single)
    meta = config["nm_sparsity"]
    current = meta["current_names"].pop(FC1)
    meta["layers"].pop(FC1)
    meta["layers_current"].pop(current)
    if "config" in remove:
        meta.pop("config")
    if "architectures" in remove:
        config.pop("architectures")
    _write_config(single, config)
    _fix_counts(single)
    _only_problem(single, "coverage cannot be checked", reason)
    assert _verify_cli(single, capsys)[0] == 1


def test_an_architecture_that_is_not_a_transformers_class_is_a_failure(single):
    config = _config(single)
    config["architectures"] = ["MyOwnViTFromRemoteCode"]
    _write_config(single, config)
    _only_problem(single, "coverage cannot be checked", "MyOwnViTFromRemoteCode")


# ---------------------------------------------------------------------------------- 5. files
def _verify_in_child(path: Path) -> subprocess.CompletedProcess:
    code = f"from nmsparse_hf.cli import main; raise SystemExit(main(['verify', {str(path)!r}]))"
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


def test_a_fifo_in_place_of_a_shard_is_refused_without_hanging(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    shard = index[f"{FC1}.weight"]
    (sharded / shard).unlink()
    os.mkfifo(sharded / shard)
    result = _verify_in_child(sharded)  # the old verify blocked here forever
    assert result.returncode == 2, result.stderr
    assert shard in result.stderr and "not a regular file" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_fifo_in_place_of_config_json_is_refused(single):
    (single / "config.json").unlink()
    os.mkfifo(single / "config.json")
    with pytest.raises(NMCheckpointError, match="not a regular file"):
        verify_checkpoint(single)


def test_a_config_json_symlinked_outside_is_refused(single, tmp_path):
    outside = tmp_path / "config.json"
    shutil.move(single / "config.json", outside)
    os.symlink(outside, single / "config.json")
    with pytest.raises(NMCheckpointError, match="outside the checkpoint directory"):
        verify_checkpoint(single)


# ---------------------------------------------------------------------------------- -0.0
def test_negative_zeros_are_counted_and_warned_not_failed(single, capsys):
    tensors = load_file(single / "model.safetensors")
    weight = tensors[f"{FC1}.weight"]
    zeros = (weight == 0).nonzero()[:5]
    weight[zeros[:, 0], zeros[:, 1]] = -0.0
    save_file(tensors, single / "model.safetensors", metadata={"format": "pt"})
    report = verify_checkpoint(single)
    assert report.ok
    assert {c.name: c.negative_zeros for c in report.layers if c.negative_zeros} == {FC1: 5}
    (warning,) = report.warnings()
    assert "5 zero weight(s) are stored as -0.0" in warning and FC1 in warning
    code, text = _verify_cli(single, capsys)
    assert code == 0 and f"warning: {warning}" in text
    assert text.strip().splitlines()[-1].startswith("OK:")
    assert cli(["verify", str(single), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["warnings"] == [warning]
