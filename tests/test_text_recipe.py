"""The text-classification recipe end to end on tiny local models and a few rows of local data
(BERT-style and T5 text to text), the Hub path up to ``load_dataset``, and the shipped T5 GLUE
config."""

from __future__ import annotations

import csv
import json

import pytest
from _tiny_text import tiny_text_model, word_tokenizer

from nmsparse_hf import NMSparsityConfig
from nmsparse_hf.errors import NMSparsityConfigError
from nmsparse_hf.recipes import text_classification as recipe
from nmsparse_hf.recipes.arguments import parse_args

WORDS = [f"w{i}" for i in range(40)] + ["neg", "pos", "sentence", "sentence1", "sentence2", ":"]


def _rows(n: int, seed: int) -> list[dict]:
    import random

    rnd = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rnd.choice(["neg", "pos"])
        words = [f"w{rnd.randrange(20) + (20 if label == 'pos' else 0)}" for _ in range(6)]
        rows.append({"sentence": " ".join(words), "sentence2": " ".join(words[:3]), "label": label})
    return rows


def _save_model(family: str, path) -> str:
    model = tiny_text_model(family, vocab_size=len(WORDS) + 6)
    model.save_pretrained(path)
    word_tokenizer(WORDS).save_pretrained(path)
    return str(path)


def _flags(model: str, out, **extra) -> list[str]:
    flags = {
        "model_name_or_path": model,
        "output_dir": str(out),
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "learning_rate": 0.001,
        "n_keep": 1,
        "m": 4,
        "n_keep_qkv": 2,
        "m_qkv": 4,
        "locations": "FF,QKV",
        "decay_type": "exp",
        "decay_coef": 0.5,
        "max_source_length": 16,
        "report_to": "none",
        "save_strategy": "no",
        "disable_tqdm": "true",
        "use_cpu": "true",
        **extra,
    }
    return [x for k, v in flags.items() for x in (f"--{k}", str(v))]


def test_bert_style_on_local_csv_exports_a_pipeline_ready_checkpoint(tmp_path):
    from transformers import pipeline

    from nmsparse_hf import verify_checkpoint

    for split, n in (("train", 16), ("dev", 8)):
        with open(tmp_path / f"{split}.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["sentence", "sentence2", "label"])
            writer.writeheader()
            writer.writerows(_rows(n, seed=len(split)))
    model = _save_model("bert", tmp_path / "model")
    summary = recipe.run(
        _flags(
            model,
            tmp_path / "out",
            train_file=tmp_path / "train.csv",
            validation_file=tmp_path / "dev.csv",
        )
    )
    final = tmp_path / "out" / "final"
    assert summary["verified"] and summary["steps"] == 4
    assert set(summary["pattern"]) == {"FF", "Q", "K", "V"}
    assert summary["pattern"]["FF"] == "1:4" and summary["pattern"]["Q"] == "2:4"
    assert "eval_accuracy" in summary["eval"]
    assert verify_checkpoint(final).ok
    assert (final / "tokenizer.json").is_file() or (final / "tokenizer_config.json").is_file()
    config = json.loads((final / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "pos"}
    classify = pipeline("text-classification", model=str(final), device="cpu")
    assert classify("w1 w2 w3")[0]["label"] in {"neg", "pos"}


def test_a_csv_and_one_command_train_the_built_in_tiny_bert(tmp_path):
    """No model given: ``tiny-bert`` is built from scratch with a WordPiece tokenizer trained on
    the training column, offline; the checkpoint loads in ``pipeline()`` with that tokenizer."""
    from transformers import AutoTokenizer, pipeline

    for split, n in (("train", 24), ("dev", 8)):
        with open(tmp_path / f"{split}.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["sentence", "sentence2", "label"])
            writer.writeheader()
            writer.writerows(_rows(n, seed=len(split)))
    argv = ["--train_file", str(tmp_path / "train.csv"), "--validation_file"]
    argv += [str(tmp_path / "dev.csv"), "--output_dir", str(tmp_path / "out"), "--max_steps", "3"]
    summary = recipe.run([*argv, "--report_to", "none", "--disable_tqdm", "true"])
    final = tmp_path / "out" / "final"
    default = NMSparsityConfig()  # the sparsity settings' own defaults
    assert summary["verified"] and summary["steps"] == 3
    assert summary["pattern"] == {"FF": f"{default.n_keep}:{default.m}"}
    assert json.loads((final / "config.json").read_text())["model_type"] == "bert"
    tokenizer = AutoTokenizer.from_pretrained(final)
    ids = tokenizer("w1 w22")["input_ids"]  # [CLS] w1 w22 [SEP], every word seen in training
    assert tokenizer.convert_ids_to_tokens(ids) == ["[CLS]", "w1", "w22", "[SEP]"]
    classify = pipeline("text-classification", model=str(final), device="cpu")
    assert classify("w1 w2 w3")[0]["label"] in {"neg", "pos"}


def test_t5_text_to_text_on_local_jsonl(tmp_path):
    from transformers import AutoModelForSeq2SeqLM, pipeline

    from nmsparse_hf import verify_checkpoint

    for split, n in (("train", 16), ("dev", 8)):
        with open(tmp_path / f"{split}.jsonl", "w") as fh:
            for row in _rows(n, seed=len(split)):
                fh.write(json.dumps(row) + "\n")
    model = _save_model("t5", tmp_path / "model")
    summary = recipe.run(
        _flags(
            model,
            tmp_path / "out",
            train_file=tmp_path / "train.jsonl",
            validation_file=tmp_path / "dev.jsonl",
            text_columns="sentence,sentence2",
            task_prefix="sentence",
            locations="FF,QKV,O",
        )
    )
    final = tmp_path / "out" / "final"
    assert summary["verified"]
    assert set(summary["pattern"]) == {"FF", "O", "Q", "K", "V"}
    assert 0.0 <= summary["eval"]["eval_accuracy"] <= 1.0
    assert verify_checkpoint(final).ok
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(final)
    assert type(reloaded).__name__ == "T5ForConditionalGeneration"
    assert (final / "tokenizer_config.json").is_file()
    # transformers 5.x runs encoder-decoders in the text-generation pipeline
    generate = pipeline("text-generation", model=str(final), device="cpu")
    assert isinstance(generate("sentence: w1 w2", max_new_tokens=2)[0]["generated_text"], str)


def test_text_to_text_encoding_and_exact_match():
    import numpy as np
    from datasets import Dataset
    from transformers import EvalPrediction

    tok = word_tokenizer(WORDS)
    ds = Dataset.from_list(_rows(2, seed=3))
    data_args = recipe.TextDataArguments(task_prefix="sentence")
    model_args = recipe.TextModelArguments(max_source_length=32)
    names = ["neg", "pos"]
    ids = recipe._label_ids(ds, "label", names)
    out = recipe.encode(ds, tok, ["sentence"], ids, data_args, model_args, True, names)
    first = tok.decode(out[0]["input_ids"])
    assert first.startswith("sentence sentence :") and ds[0]["sentence"] in first
    assert tok.decode(out[0]["labels"]) == ds[0]["label"]
    labels = np.array([[5, 7, -100], [5, 8, -100]])
    preds = np.array([[5, 7, 1], [5, 9, 1]])
    assert recipe.exact_match_accuracy(EvalPrediction(preds, labels)) == {"accuracy": 0.5}


def test_glue_from_the_hub_up_to_load_dataset(monkeypatch):
    """The Hub path: the GLUE task picks the call, the text columns and the evaluation split."""
    import datasets

    calls = []
    features = datasets.Features(
        {
            "premise": datasets.Value("string"),
            "hypothesis": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"]),
            "idx": datasets.Value("int32"),
        }
    )
    rows = {"premise": ["a", "b"], "hypothesis": ["c", "d"], "label": [0, 2], "idx": [0, 1]}
    split = datasets.Dataset.from_dict(rows, features=features)
    fake = datasets.DatasetDict(
        train=split, validation_matched=split, validation_mismatched=split, test=split
    )

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return fake

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    data_args = recipe.TextDataArguments(dataset_name="nyu-mll/glue", dataset_config_name="mnli")
    train, evaluation, names, columns = recipe.load_text_data(data_args)
    assert calls == [(("nyu-mll/glue", "mnli"), {})]
    assert columns == ["premise", "hypothesis"]
    assert names == ["entailment", "neutral", "contradiction"]
    assert evaluation is not None and len(evaluation) == 2


def test_shipped_t5_glue_config_parses_and_flags_override():
    model_args, data_args, args, _, _ = parse_args(
        ["t5_base_glue_mdgf_exp_1of32.yaml", "--dataset_config_name", "rte", "--use_cpu", "true"],
        "text_classification",
    )
    assert model_args.model_name_or_path == "google-t5/t5-base"
    assert data_args.dataset_name == "nyu-mll/glue" and data_args.dataset_config_name == "rte"
    cfg = args.sparsity_config()
    assert (cfg.n_keep, cfg.m, cfg.locations, cfg.sparse_dim) == (1, 32, ("FF",), "row")
    assert cfg.recipe_name == "MDGF-exp"
    assert args.max_steps == 2**18 and args.learning_rate == 1e-3
    assert args.lr_scheduler_type.value == "constant"


def test_bad_text_settings_are_named(tmp_path):
    with pytest.raises(NMSparsityConfigError, match="model_config='tiny-lama'.*tiny-bert"):
        parse_args(["--model_config", "tiny-lama"], "text_classification")
    (tmp_path / "bad.yaml").write_text("model_name_or_path: x\nlearning_rat: 0.1\n")
    with pytest.raises(NMSparsityConfigError, match="bad.yaml:2: unknown setting 'learning_rat'"):
        parse_args([str(tmp_path / "bad.yaml")], "text_classification")
    with pytest.raises(NMSparsityConfigError, match="--dataset_name"):
        recipe.load_text_data(recipe.TextDataArguments())
    (tmp_path / "t.csv").write_text("text,label\na,x\nb,y\n")
    args = recipe.TextDataArguments(train_file=str(tmp_path / "t.csv"), text_columns="sentence")
    with pytest.raises(NMSparsityConfigError, match=r"\['sentence'\] not in"):
        recipe.load_text_data(args)


def test_script_runs_as_a_file():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "recipes" / "train_text_classification.py"
    out = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert "--dataset_config_name" in out.stdout and "--n_keep" in out.stdout


def test_validation_labels_unseen_in_training_are_one_line_before_training(tmp_path, capsys):
    for split, rows in (("train", _rows(12, seed=1)), ("dev", _rows(4, seed=2))):
        if split == "dev":
            rows[0]["label"] = "neutral"  # never in training
        with open(tmp_path / f"{split}.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["sentence", "sentence2", "label"])
            writer.writeheader()
            writer.writerows(rows)
    argv = ["--train_file", str(tmp_path / "train.csv"), "--validation_file"]
    argv += [str(tmp_path / "dev.csv"), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        recipe.cli([*argv, "--report_to", "none"])
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and "'neutral'" in err[0] and "never occur in the training" in err[0]
    assert not (tmp_path / "out" / "final").exists()
