"""The ``nmsparse`` console script: verify, schedule (table and plot), report."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_hub import corrupt_one_pruned_weight, train_and_save

from nmsparse_hf.cli import main

SEED_YAML = """\
# seed-style keys and enum spellings, under a sparsity: section
sparsity:
  n_sparsity: 1
  m_sparsity: 8
  n_sparsity_qkv: 2
  m_sparsity_qkv: 4
  sparsity_loc: FF,QKV
  sparsity_type: STRUCTURED_NM
  decay_type: EXP
  decay_coef: 0.05
  structure_decay_flag: true
  structure_decay_type: SPARSIFY
  dense_steps: 0.1
  fine_tune_steps: 0.2
"""


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "vit"
    train_and_save(path, "vit")
    return path


@pytest.fixture
def seed_yaml(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(SEED_YAML)
    return path


def table_rows(text: str) -> dict[int, list[str]]:
    """Rows of the schedule table keyed by step: [phase, alpha, FF, Q, K, V, boundary...]."""
    rows = {}
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0].isdigit():
            rows[int(parts[0])] = parts[1:]
    return rows


def verify_rows(text: str) -> dict[str, list[str]]:
    """Rows of the verify table keyed by layer: [loc, N:M, shape, sparsity, bad groups, status]."""
    return {p[0]: p[1:] for p in map(str.split, text.splitlines()) if len(p) == 7}


# ---------------------------------------------------------------------------------- verify
def test_verify_ok(ckpt, capsys):
    assert main(["verify", str(ckpt)]) == 0
    out = capsys.readouterr().out
    rows = verify_rows(out)
    assert len(rows) == 10  # one per block (the header splits into 8 words)
    assert rows["vit.encoder.layer.0.intermediate.dense"] == [
        "FF",
        "2:4",
        "128x64",
        "0.5000",
        "0",
        "ok",
    ]
    assert "10/10 layers N:M-compliant" in out
    assert out.strip().splitlines()[-1].startswith("OK: 10 layer blocks")


def test_verify_json(ckpt, capsys):
    assert main(["verify", str(ckpt), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is True and data["problems"] == []
    assert len(data["layers"]) == 10
    fc1 = next(x for x in data["layers"] if x["name"] == "vit.encoder.layer.0.intermediate.dense")
    assert fc1 == {
        "name": "vit.encoder.layer.0.intermediate.dense",
        "location": "FF",
        "pattern": [2, 4],
        "shape": [128, 64],
        "sparsity": 0.5,
        "violations": 0,
        "max_nonzeros": 2,
        "negative_zeros": 0,
        "ok": True,
    }


def test_verify_corrupted_checkpoint_exits_1_naming_the_layer(ckpt, tmp_path, capsys):
    path = tmp_path / "bad"
    shutil.copytree(ckpt, path)
    corrupt_one_pruned_weight(path, "vit.encoder.layer.1.intermediate.dense")
    assert main(["verify", str(path)]) == 1
    out = capsys.readouterr().out
    rows = verify_rows(out)
    assert rows["vit.encoder.layer.1.intermediate.dense"] == [
        "FF",
        "2:4",
        "128x64",
        "0.4999",
        "1",
        "FAIL",
    ]
    assert [name for name, row in rows.items() if row[-1] == "FAIL"] == [
        "vit.encoder.layer.1.intermediate.dense"
    ]
    last = out.strip().splitlines()[-1]
    assert last.startswith(
        "FAIL: 1 layer block(s) not N:M (vit.encoder.layer.1.intermediate.dense)"
    )
    assert main(["verify", str(path), "--json"]) == 1
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["ok"] is False
    assert [x["name"] for x in data["layers"] if not x["ok"]] == [
        "vit.encoder.layer.1.intermediate.dense"
    ]
    assert "FAIL" in captured.err


def test_verify_metadata_mismatch_exits_1(ckpt, tmp_path, capsys):
    path = tmp_path / "meta"
    shutil.copytree(ckpt, path)
    config = json.loads((path / "config.json").read_text())
    config["nm_sparsity"]["achieved_sparsity"] = 0.9
    (path / "config.json").write_text(json.dumps(config))
    assert main(["verify", str(path)]) == 1
    assert "metadata problem(s) (metadata achieved_sparsity = 0.9" in capsys.readouterr().out


def test_verify_unreadable_input_exits_2(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nmsparse verify: cannot read") and "no such file" in err
    assert len(err.strip().splitlines()) == 1
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text(json.dumps({"model_type": "vit"}))
    assert main(["verify", str(tmp_path / "plain"), "--json"]) == 2
    captured = capsys.readouterr()
    assert "no 'nm_sparsity' block" in json.loads(captured.out)["error"]


def test_console_script_verify(ckpt, tmp_path):
    script = Path(sys.executable).parent / "nmsparse"
    if not script.exists():
        pytest.fail(f"{script} missing: run pip install -e . to install the console script")
    path = tmp_path / "bad"
    shutil.copytree(ckpt, path)
    corrupt_one_pruned_weight(path, "vit.encoder.layer.0.attention.attention.key")
    result = subprocess.run(
        [str(script), "verify", str(path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1, result.stderr
    assert "FAIL: 1 layer block(s) not N:M (vit.encoder.layer.0.attention.attention.key)" in (
        result.stdout
    )


# ---------------------------------------------------------------------------------- schedule
def test_schedule_table_of_a_seed_recipe(seed_yaml, capsys):
    assert main(["schedule", str(seed_yaml), "--total-steps", "200", "--every", "50"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith(
        "SDGF-stepwise+MDGF-exp: FF 1:8, Q 2:4, K 2:4, V 2:4, dim=row, total_steps=200, "
        "sparse phase [20, 160), fine-tune from 160"
    )
    rows = table_rows(out)
    # every 50 steps, the last step, and each boundary: sparse at round(0.1*200) = 20, fine-tune
    # at 200 - round(0.2*200) = 160, FF stages at 20 + ceil(i*140/4), QKV's stage at 20 + 70
    assert sorted(rows) == [0, 20, 50, 55, 90, 100, 125, 150, 160, 199]
    assert rows[0] == ["dense", "1", "dense", "dense", "dense", "dense", "dense", "starts"]
    assert rows[20] == ["sparse", "1", "7:8", "3:4", "3:4", "3:4", "sparse", "starts"]
    assert rows[55][2:] == ["4:8", "3:4", "3:4", "3:4", "FF:stage1"]
    assert rows[90][2:6] == ["2:8", "2:4", "2:4", "2:4"] and "FF:stage2," in rows[90]
    assert rows[125][2:] == ["1:8", "2:4", "2:4", "2:4", "FF:stage3"]
    assert rows[50][1] == "0.2231"  # exp(-0.05 * 30)
    assert rows[160] == ["finetune", "0", "1:8", "2:4", "2:4", "2:4", "finetune", "starts"]
    assert rows[199][:2] == ["finetune", "0"]


def test_schedule_plot_writes_a_png(seed_yaml, tmp_path, capsys):
    png = tmp_path / "plots" / "schedule.png"
    assert main(["schedule", str(seed_yaml), "--total-steps", "300", "--plot", str(png)]) == 0
    assert f"plot written to {png}" in capsys.readouterr().out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_schedule_reads_training_yamls_and_refuses_misspelt_keys(tmp_path, capsys):
    # a full training YAML (seed timm keys or recipe keys) passes its training keys over
    path = tmp_path / "train.yaml"
    seed = "lr: 0.001\nepochs: 300\nopt: adamw\nn_sparsity: 2\nm_sparsity: 4\nsparsity_loc: FF\n"
    path.write_text(seed + "sparsity_type: STRUCTURED_NM\n")
    assert main(["schedule", str(path), "--total-steps", "10"]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert rows[0] == ["sparse", "0", "2:4", "sparse", "starts"]
    # the file read as the recipe reads it: a seed file without sparsity_type is a dense run,
    # and a timm setting the recipe refuses is refused here with the recipe's words
    path.write_text(seed)
    assert main(["schedule", str(path), "--total-steps", "10"]) == 0
    assert capsys.readouterr().out.startswith("dense: sparsity_type is dense")
    path.write_text(seed.replace("adamw", "sgd"))
    assert main(["schedule", str(path), "--total-steps", "10"]) == 2
    assert "opt='sgd' is not translated" in capsys.readouterr().err
    recipe = Path(__file__).parents[1] / "nmsparse_hf" / "recipes" / "configs" / "vit_digits.yaml"
    assert main(["schedule", str(recipe), "--total-steps", "360"]) == 0
    capsys.readouterr()
    # a key that is neither a sparsity nor a training key is a misspelling
    path.write_text("lr_bse: 0.001\nn_sparsity: 2\nm_sparsity: 4\n")
    assert main(["schedule", str(path), "--total-steps", "10"]) == 2
    err = capsys.readouterr().err
    assert "'lr_bse'" in err and "--ignore-unknown" in err
    assert main(["schedule", str(path), "--total-steps", "10", "--ignore-unknown"]) == 0


def test_schedule_bad_arguments_exit_2(seed_yaml, capsys):
    assert main(["schedule", str(seed_yaml), "--total-steps", "3"]) == 2
    assert "needs at least 4" in capsys.readouterr().err
    assert main(["schedule", str(seed_yaml), "--total-steps", "200", "--every", "0"]) == 2
    assert "--every = 0" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- report
def test_report_lists_targets_of_a_model_family(tmp_path, capsys):
    path = tmp_path / "ff.yaml"
    path.write_text("n_keep: 2\nm: 4\nlocations: FF,Q\n")
    assert main(["report", str(path), "--model-type", "vit"]) == 0
    out = capsys.readouterr().out
    # ViT-B/16 defaults: 12 layers x (fc1, fc2, q_proj)
    assert "targeted (36 blocks):" in out
    assert "vit.layers.11.mlp.fc2  FF  target 2:4" in out
    assert "vit.layers.0.attention.q_proj  Q  target 2:4" in out
    assert "classifier" in out.split("skipped")[1]


def test_report_builds_the_model_a_recipe_config_names(capsys):
    # the shipped digits recipe trains a 4-layer ViT: the report is about that model, not ViT-B
    recipe = Path(__file__).parents[1] / "nmsparse_hf" / "recipes" / "configs" / "vit_digits.yaml"
    assert main(["report", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "model: model_config=vit-digits"
    assert "targeted (8 blocks):" in out
    assert "vit.layers.3.mlp.fc2  FF  target 1:8" in out
    assert "vit.layers.4." not in out


def test_report_applies_config_overrides_and_reads_a_local_config(tmp_path, capsys):
    from transformers import ViTConfig

    path = tmp_path / "recipe.yaml"
    path.write_text(
        "model_config: vit-digits\nconfig_overrides: num_hidden_layers=2\nn_keep: 2\nm: 4\n"
        "locations: FF,Q\nlearning_rate: 0.001\n"
    )
    assert main(["report", str(path), "--total_steps", "50"]) == 0
    out = capsys.readouterr().out
    assert "targeted (6 blocks):" in out  # 2 layers x (fc1, fc2, q_proj)
    assert "vit.layers.1.attention.q_proj  Q  target 2:4" in out
    # model_name_or_path: the architecture of its config.json (no weights are read)
    model_dir = tmp_path / "pretrained"
    ViTConfig(
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
    ).save_pretrained(model_dir)
    path.write_text(f"model_name_or_path: {model_dir}\nn_keep: 1\nm: 8\nlocations: FF\n")
    assert main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith(f"model: {model_dir}")
    assert "targeted (6 blocks):" in out and "vit.layers.2.mlp.fc1  FF  target 1:8" in out


def test_report_without_a_model_needs_a_family(tmp_path, capsys):
    path = tmp_path / "ff.yaml"
    path.write_text("n_keep: 2\nm: 4\n")
    assert main(["report", str(path)]) == 2
    err = capsys.readouterr().err
    assert "names no model" in err and "--model-type" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["report", str(tmp_path / "missing.yaml"), "--model-type", "vit"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------- options
def test_version(capsys):
    import nmsparse_hf

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"nmsparse_hf {nmsparse_hf.__version__}"


def test_every_multi_word_option_takes_both_spellings():
    import argparse

    from nmsparse_hf.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    multi_word = 0
    for name, command in sub.choices.items():
        for action in command._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and "-" in flag[2:]:
                    multi_word += 1
                    assert "--" + flag[2:].replace("-", "_") in action.option_strings, (name, flag)
    assert multi_word >= 6  # total-steps x2, ignore-unknown x2, model-type, commit-message, ...


def test_schedule_and_report_accept_underscore_spellings(seed_yaml, tmp_path, capsys):
    assert main(["schedule", str(seed_yaml), "--total_steps", "200", "--every", "50"]) == 0
    assert sorted(table_rows(capsys.readouterr().out)) == [
        0,
        20,
        50,
        55,
        90,
        100,
        125,
        150,
        160,
        199,
    ]
    path = tmp_path / "train.yaml"
    path.write_text("lr_bse: 0.001\nn_keep: 2\nm: 4\n")
    assert main(["schedule", str(path), "--total_steps", "10", "--ignore_unknown"]) == 0
    capsys.readouterr()
    args = ["report", str(path), "--model_type", "vit", "--total_steps", "10", "--ignore_unknown"]
    assert main(args) == 0
    assert "targeted (24 blocks):" in capsys.readouterr().out  # ViT-B: 12 x (fc1, fc2)


# ---------------------------------------------------------------------------------- streaming
def test_schedule_streams_a_billion_steps(seed_yaml):
    """``--every 1`` over 10^9 steps prints its first rows at once, in bounded memory (the process
    is capped at 2 GiB of data), and a reader that stops early ends it cleanly."""
    import resource

    def cap_memory():
        resource.setrlimit(resource.RLIMIT_DATA, (2 << 30, 2 << 30))

    proc = subprocess.Popen(
        [sys.executable, "-m", "nmsparse_hf.cli", "schedule", str(seed_yaml)]
        + ["--total-steps", "1000000000", "--every", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=cap_memory,
    )
    try:
        head = [proc.stdout.readline() for _ in range(2000)]
        proc.stdout.close()  # the reader stops, as `| head` does
        assert proc.wait(timeout=120) == 0
        err = proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
    assert err == ""
    assert (
        head[0].startswith("SDGF-stepwise+MDGF-exp: FF 1:8") and "total_steps=1000000000" in head[0]
    )
    rows = table_rows("".join(head))
    assert sorted(rows) == list(range(len(rows))) and len(rows) == 1998
    assert rows[0][:2] == ["dense", "1"] and rows[1997][:2] == ["dense", "1"]


# ---------------------------------------------------------------------------------- push
@pytest.fixture
def hub_calls(monkeypatch):
    """HfApi with its two network calls replaced by recorders."""
    from huggingface_hub import HfApi

    calls: dict[str, object] = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs, self.token)

    def upload_folder(self, **kwargs):
        calls["upload_folder"] = kwargs
        return "https://huggingface.co/user/vit-sparse/commit/abc"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_verifies_then_uploads(ckpt, hub_calls, capsys):
    argv = ["push", str(ckpt), "user/vit-sparse", "--token", "hf_test", "--private"]
    argv += ["--revision", "dev", "--commit_message", "sparse ViT", "--create-pr"]
    assert main(argv) == 0
    assert "pushed" in capsys.readouterr().out
    repo_id, kwargs, token = hub_calls["create_repo"]
    assert (repo_id, kwargs["private"], kwargs["exist_ok"], token) == (
        "user/vit-sparse",
        True,
        True,
        "hf_test",
    )
    upload = hub_calls["upload_folder"]
    assert upload["repo_id"] == "user/vit-sparse" and Path(upload["folder_path"]) == ckpt
    assert (upload["revision"], upload["commit_message"], upload["create_pr"]) == (
        "dev",
        "sparse ViT",
        True,
    )


def test_push_refuses_a_failing_checkpoint_and_bad_input(ckpt, tmp_path, hub_calls, capsys):
    path = tmp_path / "bad"
    shutil.copytree(ckpt, path)
    corrupt_one_pruned_weight(path, "vit.encoder.layer.1.intermediate.dense")
    assert main(["push", str(path), "user/vit-sparse"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("nmsparse push: not pushed") and len(err.strip().splitlines()) == 1
    assert main(["push", str(tmp_path / "nowhere"), "user/vit-sparse"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nmsparse push: cannot push") and len(err.strip().splitlines()) == 1
    assert hub_calls == {}  # nothing reached the Hub


def test_push_reports_a_hub_failure_in_one_line(ckpt, monkeypatch, capsys):
    from huggingface_hub import HfApi

    def refuse(self, repo_id, **kwargs):
        raise RuntimeError("401 Client Error: Unauthorized\nInvalid credentials")

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    assert main(["push", str(ckpt), "user/vit-sparse"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nmsparse push: upload to user/vit-sparse failed: 401 Client Error")
    assert len(err.strip().splitlines()) == 1


def test_report_of_a_text_recipe_config(tmp_path, capsys):
    """A text recipe's config (its own keys pass) naming a seq2seq model: the report builds it."""
    from transformers import T5Config

    T5Config(
        d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16, vocab_size=100
    ).save_pretrained(tmp_path / "t5")
    path = tmp_path / "glue.yaml"
    path.write_text(
        f"model_name_or_path: {tmp_path / 't5'}\nmax_source_length: 512\n"
        "dataset_config_name: mnli\nn_keep: 1\nm: 32\nlocations: FF\n"
    )
    assert main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    assert "targeted (8 blocks):" in out  # encoder and decoder: 2 blocks x (wi, wo) each
    assert "decoder.block.1.layer.2.DenseReluDense.wo  FF  target 1:32" in out


@pytest.mark.parametrize("command", ["schedule", "report"])
@pytest.mark.parametrize(
    "content, message",
    [
        (b"n_keep: [1\n", "YAML syntax error"),
        (b"\x89PNG\r\n\x1a\n\x00\xff", "not UTF-8 text"),
        (b"- 1\n- 2\n", "is a mapping of 'setting: value' lines"),
    ],
)
def test_unreadable_config_exits_2_in_one_line(tmp_path, capsys, command, content, message):
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    extra = ["--total-steps", "10"] if command == "schedule" else ["--model-type", "vit"]
    assert main([command, str(path), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"nmsparse {command}: ") and message in err
    assert len(err.strip().splitlines()) == 1
