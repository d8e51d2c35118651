"""Pushes during and after NMSparseTrainer training: only verified N:M models reach the Hub.

Only the network calls are mocked (``HfApi.create_repo`` / ``HfApi.upload_folder``); each upload
is inspected as the Hub would receive it: the files its ``allow_patterns`` select."""

from __future__ import annotations

import concurrent.futures
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import RandomImages, tiny_training_args, tiny_vit
from huggingface_hub.utils import filter_repo_objects
from safetensors.torch import load_file
from transformers import TrainerCallback

from nmsparse_hf import NMSparsityConfigError, NMSparsityError
from nmsparse_hf.integrations import NMSparseTrainer


@pytest.fixture
def hub(monkeypatch):
    """HfApi's network calls replaced by recorders of what would be uploaded."""
    import huggingface_hub

    uploads: list[dict] = []

    def create_repo(self, repo_id, **kw):
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, **kw):
        folder = Path(folder_path)
        names = [p.name for p in folder.iterdir() if p.is_file()]
        sent = sorted(filter_repo_objects(names, allow_patterns=kw.get("allow_patterns")))
        uploads.append(
            {
                "repo_id": repo_id,
                "folder": folder,
                "path_in_repo": kw.get("path_in_repo"),
                "message": kw.get("commit_message"),
                "files": sent,
                "config": json.loads((folder / "config.json").read_text()),
                "weights": {
                    k: v
                    for f in sent
                    if f.endswith(".safetensors")
                    for k, v in load_file(folder / f).items()
                },
                "readme": (folder / "README.md").read_bytes() if "README.md" in sent else None,
                "delete": kw.get("delete_patterns"),
            }
        )
        if kw.get("run_as_future"):
            done: concurrent.futures.Future = concurrent.futures.Future()
            done.set_result("commit")
            return done
        return "commit"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return uploads


def _trainer(tmp_path, callbacks=(), **kw):
    from transformers import ViTImageProcessor

    kw = {"push_to_hub": True, "hub_model_id": "me/vit-1of4", **kw}
    args = tiny_training_args(tmp_path / "out", n_keep=1, m=4, **kw)
    return NMSparseTrainer(
        model=tiny_vit(),
        args=args,
        train_dataset=RandomImages(),
        processing_class=ViTImageProcessor(size={"height": 32, "width": 32}),
        callbacks=list(callbacks),
    )


def _assert_sparse_upload(upload):
    """What the Hub would hold: a model whose config claims N:M and whose every targeted weight
    has at most 1 non-zero in each group of 4 along the input dimension."""
    assert upload["path_in_repo"] is None and upload["repo_id"] == "me/vit-1of4"
    assert "model.safetensors" in upload["files"] and "README.md" in upload["files"]
    assert not any(f in upload["files"] for f in ("optimizer.pt", "trainer_state.json"))
    meta = upload["config"]["nm_sparsity"]
    assert (meta["n_keep"], meta["m"]) == (1, 4) and len(meta["layers"]) == 4
    for name in meta["layers"]:
        weight = upload["weights"][f"{name}.weight"]
        assert int((weight.reshape(-1, 4) != 0).sum(-1).max()) <= 1, name
        assert int((weight != 0).sum()) == weight.numel() // 4, name
    assert upload["delete"] and "last-checkpoint/*" in upload["delete"]


class _WatchTraining(TrainerCallback):
    """Records whether the targeted training weights are still dense after each save."""

    def __init__(self):
        self.dense_after_save: list[bool] = []
        self.model = None

    def on_save(self, args, state, control, model=None, **kw):
        fc1 = model.vit.layers[0].mlp.fc1.weight
        self.dense_after_save.append(bool((fc1 != 0).all()))


def test_every_save_pushes_the_verified_sparse_model_and_the_final_card(tmp_path, hub):
    watch = _WatchTraining()
    trainer = _trainer(tmp_path, callbacks=[watch], save_strategy="steps", save_steps=4)
    trainer.train()
    final = tmp_path / "out" / "final"
    trainer.save_model(str(final))
    trainer.create_model_card(dataset="ylecun/digits", dataset_tags="ylecun/digits")
    messages = [u["message"] for u in hub]
    assert messages[0].startswith("Training in progress, step 4")
    assert messages[1].startswith("Training in progress, step 8")
    assert messages[2:] == ["Model save", "Update model card"]
    for upload in hub:
        _assert_sparse_upload(upload)
    # the checkpoints stayed dense, and so did the training weights after each sparse push
    assert watch.dense_after_save == [True, True]
    assert all(Path(u["folder"]).name != "checkpoint-4" for u in hub)
    # the last push carries the final card, byte for byte the local one
    assert hub[-1]["readme"] == (final / "README.md").read_bytes()
    assert b"ylecun/digits" in hub[-1]["readme"]
    assert hub[-1]["folder"] == final


def test_hub_strategy_end_pushes_only_the_final_model(tmp_path, hub):
    trainer = _trainer(tmp_path, save_strategy="steps", save_steps=4, hub_strategy="end")
    trainer.train()
    trainer.save_model(str(tmp_path / "out" / "final"))
    assert [u["message"] for u in hub] == ["Model save"]
    _assert_sparse_upload(hub[0])


@pytest.mark.parametrize("strategy", ["checkpoint", "all_checkpoints"])
def test_hub_strategies_that_upload_checkpoints_are_refused_at_setup(tmp_path, hub, strategy):
    with pytest.raises(NMSparsityConfigError, match=f"hub_strategy='{strategy}'.*dense"):
        _trainer(tmp_path, save_strategy="steps", save_steps=4, hub_strategy=strategy)
    assert hub == []


def test_nothing_is_saved_or_pushed_before_the_model_is_finalized(tmp_path, hub):
    trainer = _trainer(tmp_path)
    with pytest.raises(NMSparsityError, match="not finalized"):
        trainer.save_model(str(tmp_path / "early"))
    with pytest.raises(NMSparsityError, match="not finalized"):
        trainer.push_to_hub()
    assert not (tmp_path / "early").exists() and hub == []


def test_a_second_train_on_a_finalized_model_is_refused(tmp_path, hub):
    trainer = _trainer(tmp_path, push_to_hub=False)
    trainer.train()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(NMSparsityError, match="finalized.*detach"):
        trainer.train()
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_sparse_snapshot_during_training_leaves_training_weights_untouched(tmp_path, hub):
    from nmsparse_hf.export import verify_checkpoint

    model = tiny_vit()
    trainer = NMSparseTrainer(
        model=model,
        args=tiny_training_args(tmp_path / "o2", n_keep=1, m=4),
        train_dataset=RandomImages(),
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.save_sparse_snapshot(str(tmp_path / "snap"))
    assert verify_checkpoint(tmp_path / "snap").ok
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert "nm_sparsity" not in model.config.to_dict()
