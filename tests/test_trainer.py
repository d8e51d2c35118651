"""Transformers integration: arguments, callback, NMSparseTrainer, exact resume, sparse checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    RandomImages,
    tiny_swin,
    tiny_swinv2,
    tiny_timm_vit,
    tiny_training_args,
    tiny_vit,
)
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification, HfArgumentParser, Trainer

from nmsparse_hf import NMSparsityConfig, NMSparsityConfigError, verify_nm
from nmsparse_hf.integrations import NMSparseTrainer, NMSparsityCallback, SparseTrainingArguments

WORKER = Path(__file__).with_name("_trainer_worker.py")


def _args(tmp_path, **kw):
    return tiny_training_args(tmp_path / "out", **kw)


# ---------------------------------------------------------------------------- arguments
def test_arguments_parse_from_cli_yaml_and_json(tmp_path):
    parser = HfArgumentParser(SparseTrainingArguments)
    (cli,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--n_keep",
            "1",
            "--m",
            "8",
            "--locations",
            "FF,QKV",
            "--decay_type",
            "exp",
            "--decay_coef",
            "0.001",
            "--structure_decay",
            "true",
            "--structure_decay_type",
            "fine",
            "--dense_fraction",
            "0.1",
            "--target_modules",
            "fc1",
            "fc2",
        ]
    )
    expected = NMSparsityConfig(
        n_keep=1,
        m=8,
        locations="FF,QKV",
        decay_type="exp",
        decay_coef=0.001,
        structure_decay=True,
        structure_decay_type="fine",
        dense_fraction=0.1,
        target_modules=["fc1", "fc2"],
    )
    assert cli.sparsity_config() == expected
    values = {
        "output_dir": str(tmp_path),
        "n_keep": 1,
        "m": 8,
        "locations": "FF,QKV",
        "decay_type": "exp",
        "decay_coef": 0.001,
        "structure_decay": True,
        "structure_decay_type": "fine",
        "dense_fraction": 0.1,
        "target_modules": ["fc1", "fc2"],
    }
    (tmp_path / "a.yaml").write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in values.items()))
    (tmp_path / "a.json").write_text(json.dumps(values))
    (from_yaml,) = parser.parse_yaml_file(str(tmp_path / "a.yaml"))
    (from_json,) = parser.parse_json_file(str(tmp_path / "a.json"))
    assert from_yaml.sparsity_config() == expected == from_json.sparsity_config()


def test_single_regex_target_is_a_regex(tmp_path):
    args = _args(tmp_path, target_modules=[r".*\.mlp\.fc\d"])
    assert args.sparsity_config().target_modules == r".*\.mlp\.fc\d"


def test_bad_sparsity_argument_fails_at_parse_time(tmp_path):
    parser = HfArgumentParser(SparseTrainingArguments)
    with pytest.raises(NMSparsityConfigError, match="n_keep:m = 4:4"):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--n_keep", "4"])


def test_nm_trainer_needs_sparsity_settings(tmp_path):
    from transformers import TrainingArguments

    with pytest.raises(NMSparsityConfigError, match="SparseTrainingArguments"):
        NMSparseTrainer(model=tiny_vit(), args=TrainingArguments(output_dir=str(tmp_path)))


# ---------------------------------------------------------------------------- training + export
def _train_and_save(model, tmp_path, **kw):
    args = _args(tmp_path, **kw)
    trainer = NMSparseTrainer(
        model=model, args=args, train_dataset=RandomImages(), eval_dataset=RandomImages(16, seed=1)
    )
    trainer.train()
    out = tmp_path / "final"
    trainer.save_model(str(out))
    return trainer, out


@pytest.mark.parametrize(
    "factory",
    [tiny_vit, tiny_swin, tiny_swinv2, tiny_timm_vit],
    ids=["vit", "swin", "swinv2", "timm"],
)
def test_trainer_trains_finalizes_and_saves_a_sparse_checkpoint(factory, tmp_path):
    from nmsparse_hf.export import verify_checkpoint

    model = factory()
    trainer, out = _train_and_save(
        model,
        tmp_path,
        locations="FF,QKV",
        decay_type="exp",
        decay_coef=0.3,
        finetune_fraction=0.25,
    )
    assert trainer.sparsifier.finalized
    config = json.loads((out / "config.json").read_text())
    meta = config["nm_sparsity"]
    assert meta["n_keep"] == 2 and meta["m"] == 4 and meta["sparse_dim"] == "row"
    assert meta["recipe"] == "MDGF-exp"
    weights = load_file(out / "model.safetensors")
    for name in meta["layers"]:
        assert f"{name}.weight" in weights, name  # names as saved on disk
    assert verify_checkpoint(out).ok
    assert "| distributed mode | single |" in (out / "README.md").read_text()
    reloaded = AutoModelForImageClassification.from_pretrained(out).eval()
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(
        reloaded(pixel_values=x).logits, model(pixel_values=x).logits, rtol=0, atol=0
    )
    assert verify_nm(reloaded).ok  # from the nm_sparsity metadata on the reloaded config


def test_torch_compile_true_trains_like_eager_and_saves_a_sparse_checkpoint(tmp_path):
    """`torch_compile=True`: the Trainer compiles the model after NMSparseTrainer attached the
    sparsifier, so masks and schedule run inside the compiled graph (aot_eager here: the same
    tracing as inductor, no C++ compiler needed). Same weights as an eager run, same checkpoint."""
    from conftest import TINY_SPARSITY

    from nmsparse_hf.export import verify_checkpoint

    finals = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        extra = {"torch_compile": True, "torch_compile_backend": "aot_eager"} if compiled else {}
        trainer, out = _train_and_save(
            tiny_vit(), tmp_path / str(compiled), **TINY_SPARSITY, **extra
        )
        if compiled:
            assert type(trainer.model_wrapped).__name__ == "OptimizedModule"  # really compiled
            assert verify_checkpoint(out).ok
            keys = load_file(out / "model.safetensors").keys()
            assert not any("_orig_mod" in k for k in keys)  # saved unwrapped
        finals[compiled] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    torch._dynamo.reset()
    assert finals[True].keys() == finals[False].keys()
    for name, value in finals[False].items():
        torch.testing.assert_close(finals[True][name], value, msg=name, rtol=1e-4, atol=1e-5)


def test_logs_carry_phase_alpha_pattern_sparsity_and_flip_rate(tmp_path):
    trainer, _ = _train_and_save(
        tiny_vit(),
        tmp_path,
        n_keep=1,
        m=4,
        decay_type="linear",
        decay_coef=0.2,
        dense_fraction=0.25,
        finetune_fraction=0.25,
    )
    logs = {e["step"]: e for e in trainer.state.log_history if "loss" in e}
    assert sorted(logs) == [2, 4, 6, 8]
    # logged after optimizer step s: the plan of 0-based step s (sparse starts at 2, fine-tune at 6)
    assert [logs[s]["nm/phase"] for s in (2, 4, 6, 8)] == [1, 1, 2, 2]
    assert logs[2]["nm/alpha"] == pytest.approx(1.0) and logs[4]["nm/alpha"] == pytest.approx(0.6)
    assert logs[4]["nm/FF/n_keep"] == 1 and logs[4]["nm/FF/m"] == 4
    assert logs[4]["nm/FF/mask_sparsity"] == 0.75
    assert logs[4]["nm/FF/weight_zeros"] == 0.0  # alpha > 0: pruned weights still contribute
    assert logs[6]["nm/FF/weight_zeros"] == 0.75
    assert "nm/FF/mask_flip_rate" not in logs[2] and 0 <= logs[4]["nm/FF/mask_flip_rate"] < 1


def test_evaluate_after_training_matches_reloaded_checkpoint(tmp_path):
    trainer, out = _train_and_save(tiny_vit(), tmp_path, eval_strategy="steps", eval_steps=4)
    metrics = trainer.evaluate()
    reloaded = AutoModelForImageClassification.from_pretrained(out)
    plain = Trainer(
        model=reloaded, args=_args(tmp_path / "plain"), eval_dataset=RandomImages(16, seed=1)
    )
    assert plain.evaluate()["eval_loss"] == pytest.approx(metrics["eval_loss"], abs=1e-6)


def test_evaluation_during_training_uses_effective_weights(tmp_path):
    model = tiny_vit()
    args = _args(tmp_path, max_steps=4, n_keep=1, m=4)
    trainer = NMSparseTrainer(
        model=model, args=args, train_dataset=RandomImages(), eval_dataset=RandomImages(16, seed=1)
    )
    trainer.nm_callback.finalize_at_end = False
    trainer.train()
    during = trainer.evaluate()["eval_loss"]  # masked forward, dense weights underneath
    assert not trainer.sparsifier.finalized
    assert (model.vit.layers[0].mlp.fc1.weight != 0).all()
    trainer.sparsifier.finalize()
    assert trainer.evaluate()["eval_loss"] == pytest.approx(during, abs=1e-6)


def test_intermediate_checkpoints_stay_dense(tmp_path):
    _train_and_save(tiny_vit(), tmp_path, save_strategy="steps", save_steps=4)
    ckpt = tmp_path / "out" / "checkpoint-4"
    assert "nm_sparsity" not in json.loads((ckpt / "config.json").read_text())
    weights = load_file(ckpt / "model.safetensors")
    fc1 = next(v for k, v in weights.items() if "intermediate.dense.weight" in k)
    assert (fc1 != 0).all()


def test_stock_trainer_with_callback(tmp_path):
    model = tiny_vit()
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=RandomImages())
    callback = NMSparsityCallback.add_to(trainer, NMSparsityConfig(n_keep=1, m=4))
    assert trainer.callback_handler.callbacks[0] is callback
    trainer.train()
    assert callback.sparsifier.finalized and callback.sparsifier.verify().ok
    assert any("nm/FF/weight_zeros" in e for e in trainer.state.log_history)


def test_gradient_accumulation_follows_optimizer_steps(tmp_path):
    def run(batch, accum, sub):
        args = _args(
            tmp_path / sub,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accum,
            logging_steps=1,
            decay_type="exp",
            decay_coef=0.3,
            dense_fraction=0.25,
            finetune_fraction=0.25,
        )
        trainer = NMSparseTrainer(model=tiny_vit(), args=args, train_dataset=RandomImages(64))
        trainer.train()
        keys = (
            "step",
            "nm/phase",
            "nm/alpha",
            "nm/stage",
            "nm/FF/n_keep",
            "nm/FF/m",
            "nm/FF/mask_sparsity",
        )
        return [{k: e.get(k) for k in keys} for e in trainer.state.log_history if "loss" in e]

    a, b = run(2, 4, "a"), run(8, 1, "b")
    assert len(a) == 8 and a == b


# ---------------------------------------------------------------------------- resume
def _worker(out, *extra):
    cmd = [sys.executable, str(WORKER), str(out), "--max-steps", "12", "--save-steps", "6", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(proc):
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return out


def _final(path):
    return load_file(path / "final.safetensors")


def _nm_logs(path):
    history = json.loads((path / "log_history.json").read_text())
    return [
        {k: v for k, v in e.items() if k.startswith("nm/") or k == "step"}
        for e in history
        if "loss" in e
    ]


@pytest.mark.slow
def test_resume_is_exact_despite_renamed_modules(tmp_path):
    """2N steps in one go == N steps, save, and a fresh process resuming to 2N (bitwise)."""
    full, part = tmp_path / "full", tmp_path / "part"
    p_full = _worker(full)
    p_part = _worker(part, "--stop-at", "6")
    _wait(p_full)
    _wait(p_part)
    # the checkpoint holds the old on-disk names: the stock resume path would miss every weight
    keys = load_file(part / "checkpoint-6" / "model.safetensors").keys()
    assert any(".encoder.layer.0." in k for k in keys)
    out = _wait(_worker(part, "--resume", str(part / "checkpoint-6")))
    assert "reloading them through from_pretrained" in out
    a, b = _final(full), _final(part)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _nm_logs(full) == _nm_logs(part)
    assert [e["step"] for e in _nm_logs(part)] == [2, 4, 6, 8, 10, 12]


@pytest.mark.slow
def test_stock_trainer_resume_restarts_from_random_weights(tmp_path):
    """The upstream bug the test above guards against, shown on a stock Trainer (so that test
    can fail): resuming loads none of the renamed weights and the run diverges."""
    full, part = tmp_path / "full", tmp_path / "part"
    p_full = _worker(full, "--stock")
    p_part = _worker(part, "--stock", "--stop-at", "6")
    _wait(p_full)
    _wait(p_part)
    out = _wait(_worker(part, "--stock", "--resume", str(part / "checkpoint-6")))
    assert "missing keys" in out
    a, b = _final(full), _final(part)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_a_skipped_optimizer_step_still_counts(tmp_path):
    """Documented behaviour: the schedule follows ``state.global_step``, which the Trainer
    advances even when the optimizer skips an update (as a GradScaler does on non-finite
    gradients), exactly like the learning-rate schedule. Resume stays exact because the plan
    remains a pure function of global_step."""

    class SkipThird(torch.optim.AdamW):
        calls = 0

        def step(self, closure=None):
            type(self).calls += 1
            if type(self).calls == 3:
                return None  # skipped, as GradScaler.step does
            return super().step(closure)

    model = tiny_vit()
    args = _args(tmp_path, logging_steps=1, decay_type="exp", decay_coef=0.3, dense_fraction=0.25)
    optimizer = SkipThird(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    trainer = NMSparseTrainer(
        model=model, args=args, train_dataset=RandomImages(), optimizers=(optimizer, scheduler)
    )
    trainer.train()
    assert SkipThird.calls == 8
    schedule = trainer.sparsifier.schedule
    logged = [(e["step"], e["nm/alpha"]) for e in trainer.state.log_history if "loss" in e]
    assert logged == [(s, schedule.at(s).alpha) for s in range(1, 9)]


def test_push_to_hub_goes_through_the_trainer_path(tmp_path, monkeypatch):
    """The Trainer's own push path, mocked only at the Hub calls: what would be uploaded is the
    sparse checkpoint (metadata in config.json, exact zeros, our model card)."""
    from types import SimpleNamespace

    import huggingface_hub

    uploaded = {}

    def create_repo(self, repo_id, **kw):
        return SimpleNamespace(repo_id=f"me/{repo_id}")

    def upload_folder(self, repo_id, folder_path, **kw):
        folder = Path(folder_path)
        uploaded["repo_id"] = repo_id
        uploaded["files"] = sorted(p.name for p in folder.iterdir() if p.is_file())
        uploaded["config"] = json.loads((folder / "config.json").read_text())
        uploaded["weights"] = load_file(folder / "model.safetensors")
        uploaded["card"] = (folder / "README.md").read_text()
        return "commit"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    trainer, _ = _train_and_save(tiny_vit(), tmp_path, n_keep=1, m=4)
    assert trainer.push_to_hub() == "commit"
    assert uploaded["repo_id"] == "me/out"
    meta = uploaded["config"]["nm_sparsity"]
    assert meta["n_keep"] == 1 and meta["m"] == 4
    for name in meta["layers"]:
        w = uploaded["weights"][f"{name}.weight"]
        assert (w.reshape(-1, 4) != 0).sum(-1).max() <= 1
    assert "nmsparse_hf" in uploaded["card"] and "1:4" in uploaded["card"]


def test_sparsity_metrics_reach_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = _args(tmp_path, report_to=["tensorboard"], n_keep=1, m=4)
    trainer = NMSparseTrainer(model=tiny_vit(), args=args, train_dataset=RandomImages())
    trainer.train()
    (event_file,) = tmp_path.rglob("events.out.tfevents.*")
    events = EventAccumulator(str(event_file))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in (
        "train/nm/alpha",
        "train/nm/FF/weight_zeros",
        "train/nm/FF/mask_flip_rate",
        "train/nm/FF/n_keep",
        "train/nm/phase",
    ):
        assert tag in tags, sorted(tags)
    assert events.Scalars("train/nm/FF/weight_zeros")[-1].value == 0.75
