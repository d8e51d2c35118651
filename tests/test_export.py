"""The export layer: one save path for every writer, a verify that checks what from_pretrained
loads and cross-checks every claim, unreadable input as exit 2, the push, the lazy public API."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import RandomImages, tiny_training_args, tiny_vit
from safetensors.torch import load_file, save_file

from nmsparse_hf import NMSparseTrainer, NMSparsifier, NMSparsityConfig
from nmsparse_hf.cli import main as cli
from nmsparse_hf.errors import NMCheckpointError
from nmsparse_hf.export import push_sparse_to_hub, save_sparse_pretrained, verify_checkpoint
from nmsparse_hf.export.metadata import (
    FORMAT_VERSION,
    LayerBlock,
    SparseCheckpointMetadata,
    load_sparse_metadata,
)

ROOT = Path(__file__).resolve().parents[1]


def _finalized_vit(n_keep: int = 1, m: int = 4, seed: int = 0):
    model = tiny_vit(seed=seed)
    sparsifier = NMSparsifier(model, NMSparsityConfig(n_keep=n_keep, m=m, locations="FF,QKV"), 4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    sparsifier.finalize()
    return model, sparsifier


@pytest.fixture(scope="module")
def sparse_dir(tmp_path_factory):
    model, sparsifier = _finalized_vit()
    return save_sparse_pretrained(model, sparsifier, tmp_path_factory.mktemp("s") / "ckpt")


@pytest.fixture
def ckpt(sparse_dir, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(sparse_dir, dst)
    return dst


def _edit_meta(path: Path, edit) -> None:
    config = json.loads((path / "config.json").read_text())
    edit(config["nm_sparsity"])
    (path / "config.json").write_text(json.dumps(config))


def _verify_cli(path: Path, capsys) -> tuple[int, str]:
    code = cli(["verify", str(path)])
    out = capsys.readouterr()
    return code, out.out + out.err


# ---------------------------------------------------------------------------------- typed metadata
def test_metadata_round_trips_through_its_dataclass(sparse_dir):
    meta = load_sparse_metadata(sparse_dir)
    assert isinstance(meta, SparseCheckpointMetadata) and meta.format_version == FORMAT_VERSION
    assert meta.format == f"nmsparse_hf/{FORMAT_VERSION}"
    raw = json.loads((sparse_dir / "config.json").read_text())["nm_sparsity"]
    assert meta.to_dict() == raw
    again = SparseCheckpointMetadata.from_dict(json.loads(json.dumps(meta.to_dict())))
    assert again == meta
    block = next(iter(meta.layers.values()))[0]
    assert isinstance(block, LayerBlock) and block.pattern in {(1, 4)}
    assert sum(s.blocks for s in meta.location_sparsity.values()) == sum(
        len(b) for b in meta.layers.values()
    )


def test_a_newer_format_is_refused_with_the_fix(ckpt):
    _edit_meta(ckpt, lambda m: m.update(format=f"nmsparse_hf/{FORMAT_VERSION + 1}"))
    with pytest.raises(NMCheckpointError, match="newer nmsparse_hf.*pip install -U"):
        verify_checkpoint(ckpt)


# ---------------------------------------------------------------------------------- what loads
def _dense_copy(ckpt: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(ckpt / "model.safetensors")
    return {k: torch.randn_like(v) if v.dim() == 2 else v for k, v in tensors.items()}


def test_verify_reads_the_single_file_that_from_pretrained_loads(ckpt, tmp_path, capsys):
    """A dense model.safetensors beside an index pointing at a sparse file outside the folder:
    from_pretrained loads the dense file, so verify must check the dense file and fail."""
    from transformers import ViTForImageClassification

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(ckpt / "model.safetensors", elsewhere / "model.safetensors")
    keys = list(load_file(ckpt / "model.safetensors"))
    save_file(_dense_copy(ckpt), ckpt / "model.safetensors", metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": dict.fromkeys(keys, "../elsewhere/model.safetensors")}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = ViTForImageClassification.from_pretrained(ckpt)
    fc1 = loaded.vit.layers[0].mlp.fc1.weight
    assert (fc1 != 0).all()  # what loads is dense
    code, text = _verify_cli(ckpt, capsys)
    assert code == 1 and "not N:M" in text


def test_an_index_leaving_the_folder_is_unreadable(ckpt, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(ckpt / "model.safetensors", elsewhere / "model.safetensors")
    keys = list(load_file(elsewhere / "model.safetensors"))
    index = {"weight_map": dict.fromkeys(keys, "../elsewhere/model.safetensors")}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    code, text = _verify_cli(ckpt, capsys)
    assert code == 2 and "outside the checkpoint directory" in text
    assert "Traceback" not in text and len(text.strip().splitlines()) == 1


def test_a_symlinked_weight_file_pointing_outside_is_refused(ckpt, tmp_path, capsys):
    outside = tmp_path / "outside.safetensors"
    shutil.move(ckpt / "model.safetensors", outside)
    os.symlink(outside, ckpt / "model.safetensors")
    code, text = _verify_cli(ckpt, capsys)
    assert code == 2 and "outside the checkpoint directory" in text


def test_transformers_weights_in_config_takes_precedence(ckpt, capsys):
    """config.json's transformers_weights names the file from_pretrained loads first."""
    shutil.copy(ckpt / "model.safetensors", ckpt / "sparse.safetensors")
    save_file(_dense_copy(ckpt), ckpt / "dense.safetensors", metadata={"format": "pt"})
    config = json.loads((ckpt / "config.json").read_text())
    config["transformers_weights"] = "dense.safetensors"
    (ckpt / "config.json").write_text(json.dumps(config))
    assert _verify_cli(ckpt, capsys)[0] == 1
    config["transformers_weights"] = "sparse.safetensors"
    (ckpt / "config.json").write_text(json.dumps(config))
    save_file(_dense_copy(ckpt), ckpt / "model.safetensors", metadata={"format": "pt"})
    assert _verify_cli(ckpt, capsys)[0] == 0


def test_a_sharded_checkpoint_verifies_and_pushes_every_shard(tmp_path):
    model, sparsifier = _finalized_vit()
    path = save_sparse_pretrained(model, sparsifier, tmp_path / "sharded", max_shard_size="40KB")
    shards = sorted(p.name for p in path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (path / "model.safetensors.index.json").is_file()
    assert verify_checkpoint(path).ok
    from nmsparse_hf.export.hub import upload_files

    assert set(shards) | {"model.safetensors.index.json", "config.json"} <= set(upload_files(path))


# ---------------------------------------------------------------------------------- every claim
@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda m: m.update(m=8), "top-level pattern for FF is 1:8"),
        (lambda m: m.update(n_keep_qkv=2), "top-level pattern for Q is 2:4"),
        (lambda m: m["locations"].update(FF=[2, 4]), "differs from location FF's pattern 2:4"),
        (lambda m: m["locations"].pop("FF"), "differ from the locations of the layer blocks"),
        (lambda m: m["location_sparsity"]["FF"].update(sparsity=0.5), "location_sparsity[FF]"),
        (lambda m: m["location_sparsity"]["FF"].update(blocks=1), "location_sparsity[FF]"),
        (lambda m: m["location_sparsity"].pop("Q"), "location_sparsity covers"),
        (lambda m: m.update(recipe="MDGF-exp"), "recipe = 'MDGF-exp' but its config says 'STE'"),
        (lambda m: m["config"].update(m=8), "m = 4 but its config says 8"),
        (lambda m: m["config"].update(sparsity_type="bogus"), "not a valid sparsity config"),
    ],
)
def test_every_top_level_claim_is_cross_checked(ckpt, capsys, edit, expected):
    _edit_meta(ckpt, edit)
    report = verify_checkpoint(ckpt)
    assert not report.ok and any(expected in p for p in report.problems), report.problems
    assert _verify_cli(ckpt, capsys)[0] == 1


def test_a_layer_left_out_of_the_metadata_is_caught(ckpt, capsys):
    """Dropping a layer from every map and fixing up all the counts still does not hide it: the
    recorded config targets it in the saved architecture."""

    def edit(meta):
        disk = "vit.encoder.layer.1.intermediate.dense"
        current = meta["current_names"].pop(disk)
        meta["layers"].pop(disk)
        meta["layers_current"].pop(current)

    _edit_meta(ckpt, edit)
    # make the counts consistent with what is left, as a careful forger would
    report = verify_checkpoint(ckpt)
    layers = report.layers
    nonzeros, numel = sum(c.nonzeros for c in layers), sum(c.numel for c in layers)
    from nmsparse_hf.export.checkpoint import location_summaries

    def fix_counts(meta):
        meta.update(nonzeros=nonzeros, numel=numel, achieved_sparsity=1 - nonzeros / numel)
        meta["location_sparsity"] = {k: v.to_dict() for k, v in location_summaries(report).items()}

    _edit_meta(ckpt, fix_counts)
    report = verify_checkpoint(ckpt)
    assert not report.ok
    assert report.problems == [p for p in report.problems if "omits 1 layer" in p], report.problems
    assert "vit.layers.1.mlp.fc1" in report.problems[0]
    assert _verify_cli(ckpt, capsys)[0] == 1


def test_a_block_claimed_8_of_8_is_not_sparse(ckpt, capsys):
    """Claiming 8:8 everywhere (every weight 'passes' a dense pattern) must not verify."""

    def edit(meta):
        for key in ("layers", "layers_current"):
            for blocks in meta[key].values():
                for block in blocks:
                    block.update(n_keep=8, m=8)
        meta.update(n_keep=8, m=8, n_keep_qkv=8, m_qkv=8)
        meta["locations"] = {k: [8, 8] for k in meta["locations"]}

    _edit_meta(ckpt, edit)
    report = verify_checkpoint(ckpt)
    assert all(c.ok for c in report.layers)  # every group of 8 has at most 8 non-zeros...
    assert any("8:8 is not an N:M-sparse pattern" in p for p in report.problems)  # ...but no
    assert _verify_cli(ckpt, capsys)[0] == 1


# ---------------------------------------------------------------------------------- unreadable
def _deep_json(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda p: (p / "config.json").write_text(_deep_json(200_000)), "nested too deeply"),
        (lambda p: (p / "config.json").write_text("[1, 2"), "not valid JSON (line 1"),
        (lambda p: (p / "config.json").write_bytes(b"\xff\xfe{}"), "not UTF-8"),
        (lambda p: _edit_meta(p, lambda m: m.update(nonzeros="many")), "nonzeros = 'many'"),
        (lambda p: _edit_meta(p, lambda m: m.update(achieved_sparsity=None)), "achieved_sparsi"),
        (lambda p: _edit_meta(p, lambda m: m.update(locations=[])), "locations = []"),
        (lambda p: _edit_meta(p, lambda m: m.update(layers=[1])), "'layers' must map"),
        (
            lambda p: _edit_meta(
                p, lambda m: next(iter(m["layers"].values()))[0].update(rows="0:4")
            ),
            "rows = '0:4'",
        ),
        (
            lambda p: (p / "model.safetensors").write_bytes((2**62).to_bytes(8, "little") + b"{}"),
            "unreadable safetensors",
        ),
        (lambda p: (p / "model.safetensors").unlink(), "no model.safetensors"),
    ],
)
def test_unreadable_input_exits_2_with_one_line(ckpt, capsys, damage, expected):
    damage(ckpt)
    code, text = _verify_cli(ckpt, capsys)
    assert code == 2, text
    assert expected in text and "Traceback" not in text
    assert len(text.strip().splitlines()) == 1


def test_a_weight_of_the_wrong_rank_is_a_failure_not_a_crash(ckpt, capsys):
    tensors = load_file(ckpt / "model.safetensors")
    tensors["vit.encoder.layer.0.intermediate.dense.weight"] = torch.zeros(8)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    code, text = _verify_cli(ckpt, capsys)
    assert code == 1 and "not a layer's weight" in text and "Traceback" not in text


def test_pickled_weights_are_never_loaded(ckpt, capsys):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    code, text = _verify_cli(ckpt, capsys)
    assert code == 2 and "never unpickled" in text


# ---------------------------------------------------------------------------------- one save path
def _hub_mock(monkeypatch):
    import huggingface_hub

    calls = []

    def create_repo(self, repo_id, **kw):
        return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"me/{repo_id}")

    def upload_folder(self, repo_id, folder_path, allow_patterns=None, **kw):
        from huggingface_hub.utils import filter_repo_objects

        root = Path(folder_path)
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        sent = sorted(filter_repo_objects(files, allow_patterns=allow_patterns))
        calls.append(
            {
                "repo_id": repo_id,
                "files": sent,
                "card": (root / "README.md").read_text(),
                "commit_message": kw.get("commit_message"),
            }
        )
        return "commit"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return calls


def _trainer(tmp_path, **overrides):
    from transformers import ViTImageProcessor

    args = tiny_training_args(tmp_path / "out", n_keep=1, m=4, **overrides)
    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    return NMSparseTrainer(
        model=tiny_vit(), args=args, train_dataset=RandomImages(), processing_class=processor
    )


def test_trainer_saves_through_the_one_export_path_and_push_accepts_it(tmp_path, monkeypatch):
    calls = _hub_mock(monkeypatch)
    trainer = _trainer(tmp_path)
    trainer.train()
    final = tmp_path / "out" / "final"
    trainer.save_model(str(final))
    assert verify_checkpoint(final).ok
    assert (final / ".nmsparse_manifest.json").is_file()  # written by save_sparse_pretrained
    assert (final / "preprocessor_config.json").is_file()  # the processor travels along
    (final / "notes.txt").write_text("local only")
    push_sparse_to_hub(final, "me/vit")
    (call,) = calls
    assert call["files"] == [
        "README.md",
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]


def test_push_accepts_a_checkpoint_that_no_manifest_describes(ckpt, monkeypatch):
    calls = _hub_mock(monkeypatch)
    (ckpt / ".nmsparse_manifest.json").unlink()
    push_sparse_to_hub(ckpt, "me/vit")
    assert calls[0]["files"] == ["README.md", "config.json", "model.safetensors"]


def test_trainer_push_to_hub_uploads_once_without_a_duplicate_folder(tmp_path, monkeypatch):
    calls = _hub_mock(monkeypatch)
    trainer = _trainer(tmp_path, push_to_hub=True, hub_model_id="me/vit-1of4")
    trainer.train()
    final = tmp_path / "out" / "final"
    trainer.save_model(str(final))  # with push_to_hub=True this pushes, once
    assert len(calls) == 1
    assert calls[0]["files"] == [
        "README.md",
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    trainer.push_to_hub(
        tags=["my-tag"], finetuned_from="google/vit-base-patch16-224", dataset="ylecun/digits"
    )
    assert len(calls) == 2 and not any("/" in f for f in calls[1]["files"])
    card = calls[1]["card"]
    assert "my-tag" in card and "google/vit-base-patch16-224" in card and "ylecun/digits" in card


# ---------------------------------------------------------------------------------- public API
def test_import_is_light_and_the_lazy_names_resolve():
    code = (
        "import sys, nmsparse_hf\n"
        "assert 'transformers' not in sys.modules, 'import nmsparse_hf imported transformers'\n"
        "from nmsparse_hf import (NMSparseTrainer, SparseTrainingArguments, NMSparsityCallback,\n"
        "    save_sparse_pretrained, push_sparse_to_hub, verify_checkpoint)\n"
        "import transformers\n"
        "assert issubclass(NMSparseTrainer, transformers.Trainer)\n"
        "assert issubclass(SparseTrainingArguments, transformers.TrainingArguments)\n"
        "assert issubclass(NMSparsityCallback, transformers.TrainerCallback)\n"
        "assert all(map(callable, (save_sparse_pretrained, push_sparse_to_hub, verify_checkpoint)))\n"
        "assert 'NMSparseTrainer' in dir(nmsparse_hf)\n"
        "try:\n    nmsparse_hf.nothing_here\nexcept AttributeError as e:\n    print('ok', e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")
