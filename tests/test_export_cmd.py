"""``nmsparse export CHECKPOINT OUT``: the sparse model of a Trainer checkpoint-N."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import RandomImages, tiny_training_args, tiny_vit
from transformers import Trainer, TrainerCallback, ViTForImageClassification

from nmsparse_hf.cli import main
from nmsparse_hf.export import verify_checkpoint
from nmsparse_hf.integrations import NMSparseTrainer


def accuracy(pred):
    return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step >= self.step:
            control.should_training_stop = True


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A 1:4 run of 8 steps (binary masks from step 0) stopped at step 4, right after saving and
    evaluating checkpoint-4: the model it finalized at the end is finalize() at step 4."""
    out = tmp_path_factory.mktemp("run") / "out"
    args = tiny_training_args(
        out,
        n_keep=1,
        m=4,
        locations="FF,QKV",
        save_strategy="steps",
        save_steps=4,
        eval_strategy="steps",
        eval_steps=4,
        per_device_eval_batch_size=16,
    )
    trainer = NMSparseTrainer(
        model=tiny_vit(),
        args=args,
        train_dataset=RandomImages(),
        eval_dataset=RandomImages(64, seed=1),
        compute_metrics=accuracy,
        callbacks=[StopAt(4)],
    )
    trainer.train()
    assert trainer.state.global_step == 4 and trainer.sparsifier.finalized
    logged = next(e for e in trainer.state.log_history if "eval_loss" in e)
    assert logged["step"] == 4
    return trainer, out / "checkpoint-4", logged


def _plain_eval(model, tmp_path):
    args = tiny_training_args(tmp_path / "eval", per_device_eval_batch_size=16)
    evaluator = Trainer(model=model, args=args, compute_metrics=accuracy)
    return evaluator.evaluate(RandomImages(64, seed=1))


def test_export_of_a_checkpoint_is_finalize_at_that_step(stopped, tmp_path, capsys):
    trainer, checkpoint, logged = stopped
    out = tmp_path / "sparse"
    assert main(["export", str(checkpoint), str(out)]) == 0
    assert "verified" in capsys.readouterr().out
    assert verify_checkpoint(out).ok
    exported = ViTForImageClassification.from_pretrained(out)
    live = trainer.model.state_dict()
    for name, tensor in exported.state_dict().items():
        assert torch.equal(tensor, live[name]), name
    fc1 = exported.vit.layers[0].mlp.fc1.weight
    assert int((fc1 != 0).sum()) == fc1.numel() // 4
    # a plain evaluation of the export is the evaluation logged at step 4 (masks applied) ...
    metrics = _plain_eval(exported, tmp_path)
    assert metrics["eval_loss"] == pytest.approx(logged["eval_loss"], abs=1e-5)
    assert metrics["eval_accuracy"] == logged["eval_accuracy"]
    # ... and its card says so, while the dense checkpoint, loaded as it is, does not give it
    assert "eval_accuracy" in (out / "README.md").read_text()
    dense = _plain_eval(ViTForImageClassification.from_pretrained(checkpoint), tmp_path)
    assert dense["eval_loss"] != pytest.approx(logged["eval_loss"], abs=1e-5)


def test_export_refuses_bad_input_in_one_line(stopped, tmp_path, capsys):
    _, checkpoint, _ = stopped
    foreign = tmp_path / "foreign"
    shutil.copytree(checkpoint, foreign)
    (foreign / "nm_sparsity_state.json").unlink()
    assert main(["export", str(foreign), str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "records no sparsity settings" in err and len(err.strip().splitlines()) == 1
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert main(["export", str(checkpoint), str(busy)]) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert (busy / "notes.txt").read_text() == "mine"
    assert main(["export", str(checkpoint), str(busy), "--overwrite"]) == 0
    assert verify_checkpoint(busy).ok and (busy / "notes.txt").read_text() == "mine"
