"""names.py: the one map between module names and checkpoint names, used by targets, the export
metadata, verify_nm and the resume check."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from conftest import tiny_swin, tiny_vit
from safetensors import safe_open
from torch import nn

from nmsparse_hf import names
from nmsparse_hf.errors import NMSparsityError

PACKAGE = Path(__file__).resolve().parents[1] / "nmsparse_hf"


def _written_keys(model, tmp_path: Path) -> set[str]:
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as fh:
        return set(fh.keys())


@pytest.mark.parametrize(
    "factory, current, disk",
    [
        (tiny_vit, "vit.layers.0.mlp.fc1", "vit.encoder.layer.0.intermediate.dense"),
        (
            tiny_vit,
            "vit.layers.1.attention.q_proj",
            "vit.encoder.layer.1.attention.attention.query",
        ),
        (
            tiny_swin,
            "swin.encoder.layers.0.blocks.0.attention.q_proj",
            "swin.encoder.layers.0.blocks.0.attention.self.query",
        ),
    ],
)
def test_on_disk_names_are_what_save_pretrained_writes(factory, current, disk, tmp_path):
    model = factory()
    mapping = names.on_disk_names(model, [current])
    assert mapping == {current: disk}
    assert f"{disk}.weight" in _written_keys(model, tmp_path)
    assert names.checkpoint_names(model, [current]) == {current: disk}
    assert names.on_disk_names(model, [current], save_original_format=False) == {current: current}


def test_every_linear_of_a_vit_maps_to_a_written_key(tmp_path):
    model = tiny_vit()
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    mapping = names.on_disk_names(model, linears)
    assert {f"{d}.weight" for d in mapping.values()} <= _written_keys(model, tmp_path)
    assert len(set(mapping.values())) == len(linears)  # one name each, no collisions


def test_a_plain_module_has_no_other_names():
    plain = nn.Sequential(nn.Linear(4, 4))
    assert names.checkpoint_names(plain, ["0"]) == {}
    assert names.on_disk_names(plain, ["0"]) == {"0": "0"}  # nothing renames it
    with pytest.raises(NMSparsityError, match="no parameter 'nothing.weight'"):
        names.on_disk_names(plain, ["nothing"])


def test_a_transformed_weight_has_no_single_name():
    model = nn.Sequential(nn.Linear(4, 4))

    def fuse(model, state):  # a converter: a new tensor, not the same object renamed
        return {"fused.weight": torch.cat([state["0.weight"]]), "0.bias": state["0.bias"]}

    assert names.saved_keys(model, ["0"], fuse) == {"0": []}
    assert names.saved_keys(model, ["0"], lambda m, s: dict(s)) == {"0": ["0.weight"]}


def test_layers_for_model_takes_the_names_the_model_has():
    disk = {"vit.encoder.layer.0.intermediate.dense": [{"location": "FF"}]}
    current = {"vit.layers.0.mlp.fc1": [{"location": "FF"}]}
    meta = {"layers": disk, "layers_current": current}
    assert names.layers_for_model(meta, ["vit.layers.0.mlp.fc1", "x"]) is current
    assert names.layers_for_model(meta, ["vit.encoder.layer.0.intermediate.dense"]) is disk
    assert names.layers_for_model(meta, ["other"]) is current  # its missing names get reported
    assert names.layers_for_model({"layers": disk}, []) is disk
    assert names.layers_for_model({}, []) is None


def test_stored_under_other_names():
    model = nn.Linear(2, 2)
    assert not names.stored_under_other_names(model, ["weight", "bias", "extra"])
    assert names.stored_under_other_names(model, ["old.weight", "bias"])


def test_the_save_time_conversion_is_called_in_one_place_only():
    """Every module name <-> checkpoint name translation goes through names.py."""
    callers = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Name | ast.Attribute) and "revert_weight_conversion" in (
                getattr(node, "id", None),
                getattr(node, "attr", None),
            ):
                callers.append(path.relative_to(PACKAGE).as_posix())
            if isinstance(node, ast.ImportFrom) and any(
                a.name == "revert_weight_conversion" for a in node.names
            ):
                callers.append(path.relative_to(PACKAGE).as_posix())
    assert set(callers) == {"names.py"}, callers
    from nmsparse_hf import targets
    from nmsparse_hf.export import architecture, metadata

    assert targets.checkpoint_names is names.checkpoint_names
    assert metadata.on_disk_names is architecture.on_disk_names is names.on_disk_names
