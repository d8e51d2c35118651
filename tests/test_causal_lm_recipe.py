"""The causal-LM recipe (`recipes/train_causal_lm.py`): TRL's SFTTrainer on the built-in
tiny-llama with a tokenizer trained offline, the shipped toy text, one-shot starts, TRL's PEFT
flags, resume and overwrite, and the held-out perplexity in the summary and the card."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nmsparse_hf.errors import NMSparsityConfigError
from nmsparse_hf.recipes import causal_lm
from nmsparse_hf.recipes.arguments import RecipeConfigError, parse_args

ROOT = Path(__file__).parents[1]
QUICK = ["--max_steps", "4", "--disable_tqdm", "true", "--max_train_samples", "64"]
QUICK += ["--max_eval_samples", "16", "--logging_steps", "2"]


def _run(out: Path, *flags: str) -> dict:
    return causal_lm.run(["--output_dir", str(out), *QUICK, *flags])


@pytest.mark.slow
def test_the_default_runs_offline_under_accelerate_launch(tmp_path):
    """``accelerate launch --cpu recipes/train_causal_lm.py`` with no config: the shipped
    causal_lm_tiny.yaml (tiny-llama, the shipped text) ends with a verified checkpoint whose
    summary and card give the held-out perplexity, exp of the evaluation loss."""
    from transformers import AutoTokenizer, pipeline

    from nmsparse_hf.export import verify_checkpoint

    out = tmp_path / "out"
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--cpu", "--num_processes", "1", "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += [str(ROOT / "recipes" / "train_causal_lm.py"), "--output_dir", str(out), *QUICK]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((out / "final" / "nmsparse_summary.json").read_text())
    evals = summary["eval"]
    assert evals["eval_perplexity"] == pytest.approx(math.exp(evals["eval_loss"]), rel=1e-3)
    assert summary["steps"] == 4 and summary["verified"] and summary["distributed_mode"] == "single"
    assert summary["pattern"] == {loc: "2:4" for loc in ("FF", "K", "O", "Q", "V")}
    assert verify_checkpoint(out / "final").ok and "perplexity=" in proc.stdout
    card = (out / "final" / "README.md").read_text()
    assert "perplexity" in card and "causal_lm_tiny_train.txt" in card
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    assert tokenizer.decode(tokenizer("The baker waits.")["input_ids"]) == "The baker waits."
    generate = pipeline("text-generation", model=str(out / "final"), device="cpu")
    assert generate("The baker", max_new_tokens=3)[0]["generated_text"].startswith("The baker")


def test_perplexity_is_exp_of_the_eval_loss():
    assert causal_lm.perplexity({"eval_loss": 2.0}) == {"eval_perplexity": math.exp(2.0)}
    assert causal_lm.perplexity({"eval_loss": 1e4}) == {"eval_perplexity": math.inf}
    assert causal_lm.perplexity({"eval_accuracy": 0.5}) == {}


def test_json_lines_text_and_the_text_field(tmp_path):
    """JSON lines with a ``text`` field (empty ones dropped), or the field TRL's
    ``--dataset_text_field`` names; a missing field is named."""
    rows = [{"text": "a b c", "body": "x"}, {"text": "  ", "body": "y"}, {"text": "d", "body": "z"}]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = causal_lm.CausalLMDataArguments(train_file=str(path))
    train, evaluation = causal_lm.load_texts(data, "text")
    assert train["text"] == ["a b c", "d"] and evaluation is None
    assert causal_lm.load_texts(data, "body")[0]["body"] == ["x", "y", "z"]
    with pytest.raises(NMSparsityConfigError, match="dataset_text_field='content'"):
        causal_lm.load_texts(data, "content")


def test_trl_peft_flags_give_the_lora_config():
    from trl import get_peft_config

    argv = ["--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8"]
    model_args = parse_args([*argv, "--lora_target_modules", "q_proj", "v_proj"], "causal_lm").model
    lora = get_peft_config(model_args)
    assert (lora.r, lora.lora_alpha, set(lora.target_modules)) == (4, 8, {"q_proj", "v_proj"})
    assert get_peft_config(parse_args([], "causal_lm").model) is None
    with pytest.raises(RecipeConfigError, match="one_shot='obs'"):
        parse_args(["--one_shot", "obs"], "causal_lm")
    with pytest.raises(RecipeConfigError, match="model_config='tiny-bert'.*tiny-llama"):
        parse_args(["--model_config", "tiny-bert"], "causal_lm")


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_one_shot_start_prunes_to_the_target_pattern_before_training(method, tmp_path, monkeypatch):
    """The model handed to the trainer is already 2:4 on every targeted layer (a one-shot start),
    calibrated on the first --calibration_samples training texts."""
    from nmsparse_hf.recipes.sft import NMSparseSFTTrainer

    seen = {}
    original = NMSparseSFTTrainer.__init__

    def record(self, model=None, args=None, **kwargs):
        layers = {n: m.weight for n, m in model.named_modules() if n.endswith("mlp.up_proj")}
        groups = [w.detach().reshape(-1, 4) for w in layers.values()]
        seen["kept"] = {int(k) for g in groups for k in (g != 0).sum(dim=1)}
        original(self, model=model, args=args, **kwargs)

    monkeypatch.setattr(NMSparseSFTTrainer, "__init__", record)
    summary = _run(tmp_path / "out", "--one_shot", method, "--calibration_samples", "6")
    assert seen["kept"] == {2}  # every group of 4 keeps exactly 2 before step 1
    assert any(
        f"one-shot {method} start" in n and "6 calibration texts" in n for n in summary["notes"]
    )
    assert summary["verified"]
    # the final model records its one-shot start, and that sparse training followed it
    final = tmp_path / "out" / "final"
    meta = json.loads((final / "config.json").read_text())["nm_sparsity"]
    assert (meta["one_shot"]["method"], meta["one_shot"]["trained"]) == (method, True)
    assert meta["one_shot"]["samples"] == 6
    assert f"pruned one-shot by nmsparse_hf ({method}" in (final / "README.md").read_text()


def test_lora_adapters_train_and_export_the_merged_sparse_model(tmp_path):
    """TRL's --use_peft: LoRA adapters on q_proj / v_proj (PEFT's Llama preset) train under the
    masks; the export is the plain model with the adapters merged in, exactly 2:4 where the
    adapters were (checked on the reloaded weights)."""
    from transformers import AutoModelForCausalLM

    summary = _run(tmp_path / "out", "--use_peft", "true", "--lora_r", "4")
    final = tmp_path / "out" / "final"
    assert summary["verified"] and not (final / "adapter_config.json").exists()
    assert any("LoRA adapters r=4" in n for n in summary["notes"])
    assert summary["eval"]["eval_perplexity"] == pytest.approx(
        math.exp(summary["eval"]["eval_loss"]), rel=1e-3
    )  # evaluated after the merge
    model = AutoModelForCausalLM.from_pretrained(final)
    for name in ("q_proj", "v_proj", "o_proj"):
        weight = dict(model.named_modules())[f"model.layers.0.self_attn.{name}"].weight
        assert set((weight.detach().reshape(-1, 4) != 0).sum(dim=1).tolist()) == {2}, name


def test_overwrite_resume_and_an_incomplete_final(tmp_path, monkeypatch):
    """A finished final/ is refused without --overwrite_output_dir and still there while the
    overwriting run trains (replaced only when the new one is saved); an interrupted run
    resumes from its last checkpoint; an incomplete final/ does not stop a run."""
    from nmsparse_hf.export import checkpoint_state
    from nmsparse_hf.recipes.sft import NMSparseSFTTrainer

    out = tmp_path / "out"
    first = _run(out, "--save_strategy", "steps", "--save_steps", "2")
    assert first["verified"] and checkpoint_state(out / "final") == "finished"
    with pytest.raises(RecipeConfigError, match="already holds a finished sparse model"):
        _run(out)
    states = []
    train = NMSparseSFTTrainer.train

    def train_and_look(self, *args, **kwargs):
        states.append(checkpoint_state(out / "final"))
        return train(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(NMSparseSFTTrainer, "train", train_and_look)
        again = _run(out, "--overwrite_output_dir", "true", "--seed", "1")
    assert states == ["finished"] and again["verified"]
    assert checkpoint_state(out / "final") == "finished"

    resumed_dir = tmp_path / "resumed"
    _run(resumed_dir, "--save_strategy", "steps", "--save_steps", "2")
    for name in ("final", "checkpoint-4"):
        shutil.rmtree(resumed_dir / name)  # as if killed after step 2
    (resumed_dir / "final").mkdir()
    (resumed_dir / "final" / "model.safetensors").write_bytes(b"half")  # an interrupted save
    resumed = _run(resumed_dir, "--save_strategy", "steps", "--save_steps", "2",
                   "--resume_from_checkpoint", "true")  # fmt: skip
    assert resumed["steps"] == 4 and resumed["verified"]
    assert any(f"resuming from {resumed_dir / 'checkpoint-2'}" in n for n in resumed["notes"])
    assert any("incomplete save" in n for n in resumed["notes"])
