"""The one recipe front end, the same for the three recipe scripts (image classification, text
classification, causal LM): config files and flags, resume, never replacing a finished model,
metrics that run code, one run per output directory, and every setting error as one line on
stderr with exit code 2, before any data is read.

Each behaviour is one test parametrized over the recipes; most call the scripts' entry point
in process (`common.recipe_cli`), the refusal to replace a finished model goes through
``accelerate launch --cpu`` for each script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nmsparse_hf.recipes.arguments import RecipeConfigError, parse_args
from nmsparse_hf.recipes.common import LOCK_NAME, recipe_cli

ROOT = Path(__file__).parents[1]
SCRIPTS = {
    "vit": "train_vit.py",
    "text_classification": "train_text_classification.py",
    "causal_lm": "train_causal_lm.py",
}
RECIPES = list(SCRIPTS)


def _main(recipe: str):
    from nmsparse_hf.recipes import causal_lm, image_classification, text_classification

    module = {"vit": image_classification, "text_classification": text_classification}
    return module.get(recipe, causal_lm).main


def _cli_error(recipe: str, argv: list[str], capsys) -> str:
    """Run the recipe's entry point; it must exit with code 2 and one line on stderr."""
    with pytest.raises(SystemExit) as info:
        recipe_cli(recipe, _main(recipe), argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ---------------------------------------------------------------------------------- config files
@pytest.mark.parametrize("recipe", RECIPES)
def test_config_file_flags_win_and_numbers_are_numbers(recipe, tmp_path):
    """``--config FILE``, ``--config=FILE`` and a positional file give the same run; a flag
    after it wins; ``1e-3`` written in YAML (a string to PyYAML) is a float."""
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 1e-3\nweight_decay: 5e-2\nn_keep: 1\nm: 8\nseed: 3\n")
    runs = [
        parse_args(head + ["--output_dir", str(tmp_path), "--seed", "7"], recipe)
        for head in (["--config", str(path)], [f"--config={path}"], [str(path)])
    ]
    for run in runs:
        args = run.training
        assert args.learning_rate == 1e-3 and isinstance(args.learning_rate, float)
        assert args.weight_decay == 0.05 and args.seed == 7  # the flag wins over the file
        assert (args.n_keep, args.m) == (1, 8) and run.script.config == str(path)


@pytest.mark.parametrize("recipe", RECIPES)
def test_help_names_the_script_and_the_shared_flags(recipe, capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["--help"], recipe)
    text = capsys.readouterr().out
    assert info.value.code == 0
    name = SCRIPTS[recipe].removesuffix(".py")
    assert text.startswith(f"usage: accelerate launch recipes/{name}.py [CONFIG | --config CONFIG]")
    head = text.split("options:")[0]
    for flag in ("--resume_from_checkpoint true", "--overwrite_output_dir true", "lock file"):
        assert flag in head, flag


@pytest.mark.parametrize("recipe", RECIPES)
def test_resume_true_finds_the_last_readable_checkpoint(recipe, tmp_path):
    """``true``: no checkpoint yet starts (with a note); else the newest readable one, a damaged
    newer one skipped; a path that is not a checkpoint is one error line."""
    from safetensors.torch import save_file

    argv = ["--output_dir", str(tmp_path), "--resume_from_checkpoint", "true"]
    parsed = parse_args(argv, recipe)
    assert parsed.training.resume_from_checkpoint is None and "starting" in parsed.notes[-1]
    for step in (2, 10, 12):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        save_file({"w": torch.zeros(2)}, folder / "model.safetensors")
    (tmp_path / "checkpoint-12" / "model.safetensors").write_bytes(b"\x00" * 5)  # damaged
    assert parse_args(argv, recipe).training.resume_from_checkpoint == str(
        tmp_path / "checkpoint-10"
    )
    with pytest.raises(RecipeConfigError, match="not a checkpoint directory"):
        parse_args(["--resume_from_checkpoint", str(tmp_path / "nope")], recipe)


# ---------------------------------------------------------------------------------- bad settings
def _bad_inputs(tmp_path: Path) -> list[tuple[list[str], str]]:
    """(argv, a part of the one-line error) for inputs that gave a traceback or were silently
    accepted before."""
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("run_name: caf\xe9\n".encode("latin-1"))
    twice = tmp_path / "twice.yaml"
    twice.write_text("seed: 1\nlearning_rate: 0.1\nseed: 2\n")
    bomb = tmp_path / "bomb.yaml"
    rows = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    rows += [
        f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    ]
    bomb.write_text("\n".join(rows) + "\n")
    return [
        ([str(latin)], "latin1.yaml: not UTF-8 text (byte 0xe9 at offset 13)"),
        ([str(twice)], "twice.yaml:3: duplicate key 'seed' (first on line 1)"),
        ([str(bomb)], "bomb.yaml:1: YAML anchors and aliases"),
        (["--accelerator_config", str(tmp_path / "nope.json")], "nope.json' is not a file"),
        (["--deepspeed", "ds_config.json"], "DeepSpeed is not installed"),
        (["--run_name", "x" * 5000], "run_name is 5000 characters"),
        (["--target_modules", r"mlp\.(fc1"], r"'mlp\\.(fc1' is not a valid regular expression"),
        (["--sparsity_type", "dense"], "sparsity_type=dense"),
        (["--max_steps", "abc"], "argument --max_steps/--max-steps: invalid int value: 'abc'"),
        (["--no_such_flag", "1"], "unrecognized arguments: --no_such_flag 1"),
    ]


@pytest.mark.parametrize("recipe", RECIPES)
def test_bad_settings_are_one_line_and_exit_2_before_any_data(recipe, tmp_path, capsys):
    """Each input exits with code 2 and one line naming the value, before any data is read or
    model built (no data is given: reading it would be a different error)."""
    assert __import__("importlib").util.find_spec("deepspeed") is None
    for argv, expected in _bad_inputs(tmp_path):
        start = time.monotonic()
        line = _cli_error(recipe, [*argv, "--output_dir", str(tmp_path / "out")], capsys)
        assert expected in line, (argv[:2], line)
        assert time.monotonic() - start < 30  # the alias bomb fails at its first anchor


@pytest.mark.parametrize("recipe", ["vit", "text_classification"])
def test_metric_scripts_run_only_with_trust_remote_code(recipe, tmp_path, capsys):
    """A local metric script is code: refused without --trust_remote_code, never imported."""
    marker = tmp_path / "ran"
    script = tmp_path / "metric.py"
    script.write_text(f"open({str(marker)!r}, 'w').close()\n")
    line = _cli_error(recipe, ["--metrics", f"accuracy,{script}"], capsys)
    assert "trust_remote_code" in line and str(script) in line and not marker.exists()
    allowed = parse_args(["--metrics", str(script), "--trust_remote_code", "true"], recipe)
    assert allowed.model.metric_names == [str(script)] and not marker.exists()


def test_the_causal_lm_recipe_has_no_metrics_setting(tmp_path, capsys):
    """Its one metric is the perplexity: ``--metrics`` is refused as an unknown flag."""
    with pytest.raises(SystemExit) as info:
        parse_args(["--metrics", str(tmp_path / "metric.py")], "causal_lm")
    assert info.value.code == 2 and "--metrics" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- one run a dir
def _sleeper():
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_second_run_into_a_busy_output_dir_fails_naming_the_holder(recipe, tmp_path, capsys):
    import socket

    out = tmp_path / "out"
    out.mkdir()
    holder = _sleeper()
    try:
        lock = {"pid": holder.pid, "host": socket.gethostname(), "started": "2026-01-01 10:00"}
        (out / LOCK_NAME).write_text(json.dumps(lock))
        line = _cli_error(recipe, ["--output_dir", str(out)], capsys)
    finally:
        holder.kill()
        holder.wait()
    assert f"in use by another run (pid {holder.pid} on host {socket.gethostname()}" in line
    assert "started 2026-01-01 10:00" in line and not (out / "final").exists()
    assert json.loads((out / LOCK_NAME).read_text()) == lock  # the holder's lock is untouched


def test_a_stale_lock_is_taken_over_and_every_lock_is_released_on_error(tmp_path, capsys):
    """A lock whose process is gone (same host) is taken over with a warning; the run's own
    lock is released when it fails (here: no data given)."""
    import socket

    out = tmp_path / "out"
    out.mkdir()
    gone = _sleeper()
    gone.kill()
    gone.wait()
    (out / LOCK_NAME).write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname()}))
    with pytest.raises(SystemExit) as info:
        recipe_cli("text_classification", _main("text_classification"), ["--output_dir", str(out)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "no data" in err
    assert f"taking over the lock of a run that is gone (pid {gone.pid}" in err
    assert not (out / LOCK_NAME).exists()
    foreign = {"pid": 1, "host": "another-host", "started": "x"}  # cannot be checked: kept
    (out / LOCK_NAME).write_text(json.dumps(foreign))
    with pytest.raises(RecipeConfigError, match="on host another-host"):
        from nmsparse_hf.recipes.common import acquire_lock

        acquire_lock(str(out))


# ---------------------------------------------------------------------------------- finished runs
def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_scripts_under_accelerate_launch_never_replace_a_finished_model(recipe, tmp_path):
    """``accelerate launch --cpu recipes/<script>`` into an output_dir whose final/ holds a
    sparse model: one line on stderr, exit code 2, no traceback from the recipe, the model
    untouched."""
    final = tmp_path / "out" / "final"
    final.mkdir(parents=True)
    (final / "config.json").write_text(json.dumps({"nm_sparsity": {"m": 8}}))
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--cpu", "--num_processes", "1", "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += [str(ROOT / "recipes" / SCRIPTS[recipe]), "--output_dir", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    # the script exits with 2; accelerate's launcher exits with 1 and says the child's code
    assert proc.returncode == 1 and "returned non-zero exit status 2" in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "already holds a finished sparse model" in errors[0]
    assert "--overwrite_output_dir true" in errors[0]
    # accelerate's launcher reports a failed child with its own traceback; the script has none
    assert "nmsparse_hf/" not in proc.stderr and SCRIPTS[recipe] + '", line' not in proc.stderr
    assert json.loads((final / "config.json").read_text()) == {"nm_sparsity": {"m": 8}}
    assert not (tmp_path / "out" / LOCK_NAME).exists()
