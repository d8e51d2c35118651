"""Resuming NMSparseTrainer checkpoints: the sparsity settings must match, damaged checkpoints
are skipped by ``resume_from_checkpoint=True``, one line instead of transformers' key warnings,
and the steps run now are told from the steps in all."""

from __future__ import annotations

import json

import pytest
import transformers.trainer
from conftest import RandomImages, tiny_training_args, tiny_vit

from nmsparse_hf import NMSparsityConfigError, NMSparsityError
from nmsparse_hf.integrations import NMSparseTrainer, resume


def _trainer(out, **kw):
    values = dict(n_keep=1, m=8, max_steps=4, save_strategy="steps", save_steps=2)
    values.update(kw)
    args = tiny_training_args(out, **values)
    return NMSparseTrainer(model=tiny_vit(), args=args, train_dataset=RandomImages())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 1:8 run with checkpoint-2 and checkpoint-4."""
    out = tmp_path_factory.mktemp("run") / "out"
    _trainer(out).train()
    return out


def _copy(run, tmp_path):
    import shutil

    shutil.copytree(run, tmp_path / "out")
    return tmp_path / "out"


@pytest.fixture
def warnings(monkeypatch):
    """Warnings of our resume module and of transformers' Trainer, as they would be printed."""
    seen: list[str] = []
    for module in (resume, transformers.trainer):
        monkeypatch.setattr(module.logger, "warning", lambda msg, *a, **k: seen.append(str(msg)))
    return seen


def test_checkpoint_records_the_sparsity_settings_and_says_how_to_export(run):
    state = resume.read_sparsity_state(run / "checkpoint-2")
    assert state["step"] == 2 and state["total_steps"] == 4
    assert (state["config"].n_keep, state["config"].m) == (1, 8)
    readme = (run / "checkpoint-2" / "README.md").read_text()
    assert "dense master weights" in readme and "nmsparse export checkpoint-2 OUT_DIR" in readme


@pytest.mark.parametrize(
    "change, named",
    [
        (dict(n_keep=2, m=4), ["n_keep: checkpoint 1, this run 2", "m: checkpoint 8, this run 4"]),
        (dict(locations="FF,QKV"), ["locations: checkpoint 'FF', this run 'FF,Q,K,V'"]),
        (dict(sparsity_type="srste"), ["sparsity_type: checkpoint 'structure_nm'"]),
    ],
)
def test_resume_under_other_sparsity_settings_is_refused_before_step_1(
    run, tmp_path, change, named
):
    trainer = _trainer(tmp_path / "new", max_steps=6, **change)
    with pytest.raises(NMSparsityConfigError) as err:
        trainer.train(resume_from_checkpoint=str(run / "checkpoint-2"))
    for field in named:
        assert field in str(err.value)
    assert trainer.state.global_step == 0 and not list((tmp_path / "new").glob("checkpoint-*"))


def test_resume_true_skips_a_damaged_last_checkpoint(run, tmp_path, warnings):
    out = _copy(run, tmp_path)
    weights = out / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    trainer = _trainer(out, max_steps=6)
    trainer.train(resume_from_checkpoint=True)
    assert any(
        "skipping damaged checkpoint checkpoint-4" in w and str(weights) in w for w in warnings
    )
    assert trainer.state.global_step == 6 and trainer.steps_this_run == 4


def test_a_damaged_trainer_state_is_skipped_too_and_a_damaged_path_is_named(run, tmp_path):
    out = _copy(run, tmp_path)
    (out / "checkpoint-4" / "trainer_state.json").write_text("{not json")
    assert resume.last_readable_checkpoint(out) == str(out / "checkpoint-2")
    (out / "checkpoint-2" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(
        NMSparsityError, match="cannot be resumed: .*checkpoint-2/model.safetensors"
    ):
        _trainer(out, max_steps=6).train(resume_from_checkpoint=str(out / "checkpoint-2"))
    with pytest.raises(NMSparsityError, match="no checkpoint .* can be read"):
        _trainer(out, max_steps=6).train(resume_from_checkpoint=True)


def test_resume_logs_one_line_instead_of_the_key_warnings(run, tmp_path, warnings):
    trainer = _trainer(tmp_path / "new", max_steps=6)
    trainer.train(resume_from_checkpoint=str(run / "checkpoint-4"))
    assert not any("missing keys" in w or "unexpected keys" in w for w in warnings), warnings
    (line,) = [w for w in warnings if "from_pretrained" in w]
    assert "reloading them through from_pretrained restored all" in line
    assert trainer.steps_this_run == 2 and trainer.state.global_step == 6


def test_a_checkpoint_without_recorded_settings_resumes_with_a_warning(run, tmp_path, warnings):
    out = _copy(run, tmp_path)
    (out / "checkpoint-4" / resume.SPARSITY_STATE).unlink()
    trainer = _trainer(out, max_steps=6)
    trainer.train(resume_from_checkpoint=True)
    assert any("records no sparsity settings" in w for w in warnings)
    assert json.loads((out / "checkpoint-6" / resume.SPARSITY_STATE).read_text())["step"] == 6


def test_the_summary_tells_steps_run_now_from_steps_in_all():
    from nmsparse_hf.recipes.common import format_summary

    summary = {
        "recipe": "STE",
        "pattern": {"FF": "1:8"},
        "sparse_dim": "row",
        "steps": 150,
        "steps_now": 100,
        "seconds": 3.0,
        "eval": {},
        "sparsity_by_location": {"FF": 0.875},
        "achieved_sparsity": 0.875,
        "verified": True,
        "layers_verified": "4/4",
        "distributed": {"world_size": 1, "wrapper": "ViTForImageClassification"},
        "checkpoint": "/out/final",
    }
    assert "trained 100 optimizer steps now (150 in all) in 3.0 s" in format_summary(summary)


def test_distributed_mode_reads_the_wrapper_not_the_configuration(tmp_path, monkeypatch):
    from torch.distributed.fsdp import FSDPModule

    trainer = _trainer(tmp_path / "out")
    mode = trainer.distributed_mode()
    assert (mode["mode"], mode["processes"], mode["note"]) == ("single", 1, None)
    # FSDP configured, but the model is not sharded (what accelerate does with FSDP flags on CPU)
    monkeypatch.setattr(trainer, "is_fsdp_enabled", True)
    assert "not sharded" in trainer.distributed_mode()["note"]
    # fully_shard swaps each sharded module's class for an FSDPModule subclass
    vit = trainer.model.vit
    vit.__class__ = type(f"FSDP{type(vit).__name__}", (FSDPModule, type(vit)), {})
    assert trainer.distributed_mode()["mode"] == "FSDP2"


def test_fsdp_and_adapter_checkpoints_are_not_judged_by_model_safetensors(tmp_path):
    fsdp = tmp_path / "checkpoint-2"
    (fsdp / "pytorch_model_fsdp_0").mkdir(parents=True)
    (fsdp / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    assert resume.checkpoint_problem(fsdp) is None
    (fsdp / "trainer_state.json").write_text("")
    assert "trainer_state.json cannot be read" in resume.checkpoint_problem(fsdp)
    plain = tmp_path / "checkpoint-4"
    plain.mkdir()
    (plain / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    assert "model.safetensors" in resume.checkpoint_problem(plain)
