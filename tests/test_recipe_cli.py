"""The recipe as a Hugging Face user meets it: config and flags, --help, pipeline-ready
checkpoints, model cards, never losing a finished run, readable metrics, one-line config errors."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY_RECIPE_FLAGS

from nmsparse_hf.recipes.arguments import RecipeConfigError, parse_args
from nmsparse_hf.recipes.image_classification import cli, refuse_to_replace, run

ROOT = Path(__file__).parents[1]
CONFIGS = ROOT / "nmsparse_hf" / "recipes" / "configs"
README = (ROOT / "README.md").read_text()
DOCS = README + "".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))

TINY = TINY_RECIPE_FLAGS


# ---------------------------------------------------------------------------------- conventions
@pytest.mark.parametrize(
    "head", [["--config", "vit_digits.yaml"], ["--config=vit_digits.yaml"], ["vit_digits.yaml"]]
)
def test_config_flag_positional_file_and_shipped_name(head, tmp_path):
    """`--config FILE` as in TRL (no 'ambiguous option ... --config_overrides'), the positional
    file as a shorthand, and a shipped config by its bare name."""
    model_args, _, args, script, _ = parse_args([*head, "--output_dir", str(tmp_path)], "vit")
    assert script.config == str(CONFIGS / "vit_digits.yaml")
    assert model_args.model_config == "vit-digits" and args.learning_rate == 0.002


def test_transformers_example_script_names(tmp_path):
    model_args, data_args, _, _, _ = parse_args(
        [
            "--image_column_name",
            "img",
            "--label_column_name",
            "target",
            "--dataset_config_name",
            "full",
            "--token",
            "hf_x",
            "--model_revision",
            "v2",
            "--cache_dir",
            str(tmp_path),
            "--trust_remote_code",
            "true",
            "--ignore_mismatched_sizes",
            "true",
        ],
        "vit",
    )
    assert (data_args.image_column, data_args.label_column) == ("img", "target")
    assert data_args.dataset_config == "full"
    assert model_args.hub_kwargs() == dict(
        revision="v2", cache_dir=str(tmp_path), token="hf_x", trust_remote_code=True
    )
    assert model_args.ignore_mismatched_sizes
    defaults = parse_args([], "vit").model
    assert not defaults.trust_remote_code and not defaults.ignore_mismatched_sizes


def test_train_dir_and_validation_dir(tmp_path):
    for split in ("train", "validation"):
        (tmp_path / split).mkdir()
    _, data_args, _, _, notes = parse_args(
        ["--train_dir", str(tmp_path / "train"), "--validation_dir", str(tmp_path / "validation")],
        "vit",
    )
    assert data_args.data_dir == str(tmp_path.resolve()) and data_args.dataset_name == "imagefolder"
    assert any("argument classes' defaults" in n for n in notes)  # a data choice: said so


def test_do_train_and_do_eval_are_honoured():
    args = parse_args([], "vit").training
    assert args.do_train and args.do_eval
    only_eval = parse_args(["--do_eval", "true"], "vit").training
    assert only_eval.do_eval and not only_eval.do_train
    with pytest.raises(RecipeConfigError, match="nothing to do"):
        parse_args(["--do_train", "false", "--do_eval", "false", "--eval_strategy", "no"], "vit")


def test_help_starts_with_usage_and_shows_the_defaults_a_run_uses():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        parse_args(["--help"], "vit")
    assert exit_info.value.code == 0
    text = out.getvalue()
    assert text.startswith(
        "usage: accelerate launch recipes/train_vit.py [CONFIG | --config CONFIG]"
    )
    assert "--resume_from_checkpoint true" in text.split("options:")[0]
    flag = text[text.index("--learning_rate LEARNING_RATE") :]
    assert (
        "(default:\n                        0.002)" in flag[:200]
        or "(default: 0.002)" in flag[:200]
    )


def test_output_dir_follows_the_pattern_used(tmp_path):
    assert parse_args(["--m", "4"], "vit").training.output_dir == "outputs/vit-digits-mdgf-exp-1of4"
    assert parse_args(
        ["--m", "4", "--output_dir", str(tmp_path)], "vit"
    ).training.output_dir == str(tmp_path)
    model_flags = parse_args(["--model_config", "vit-s16", "--n_keep", "1", "--m", "16"], "vit")
    assert model_flags.training.output_dir == "outputs/vit-s16-ste-1of16"


def test_finished_model_is_never_replaced_without_the_flag(tmp_path):
    final = tmp_path / "final"
    final.mkdir()
    (final / "config.json").write_text(json.dumps({"nm_sparsity": {"m": 8}}))
    with pytest.raises(RecipeConfigError, match="--overwrite_output_dir"):
        run(["--output_dir", str(tmp_path), *TINY], "vit")  # refused before any data is read
    refuse_to_replace(str(final), overwrite=True)
    assert json.loads((final / "config.json").read_text()) == {"nm_sparsity": {"m": 8}}


# ---------------------------------------------------------------------------------- safe configs
@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("list.yaml", "- 1\n- 2\n", "holds a list"),
        ("empty.yaml", "\n  \n", "is empty"),
        ("comments.yaml", "# nothing\n", "no settings"),
        ("syntax.yaml", "learning_rate: 1e-3\nm: [4\n", "YAML syntax error"),
        ("trailing.json", '{"m": 4,\n}', "trailing.json:2: JSON syntax error"),
        (
            "typo.yaml",
            "seed: 1\nlerning_rate: 0.1\n",
            "typo.yaml:2: unknown setting 'lerning_rate'",
        ),
        ("nan.yaml", "m: 4\nlearning_rate: fast\n", "nan.yaml:2: learning_rate = 'fast' is not a"),
        ("bad_n.yaml", "m: 4\nn_keep: 5\n", "bad_n.yaml"),
    ],
)
def test_config_mistakes_are_one_line(tmp_path, name, text, expected):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(RecipeConfigError) as info:
        parse_args([str(path)], "vit")
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_numbers_written_as_strings_are_numbers(tmp_path):
    path = tmp_path / "lr.yaml"
    path.write_text("learning_rate: 1e-3\nweight_decay: 5e-2\nm: 8\nn_keep: 1\n")
    args = parse_args([str(path)], "vit").training
    assert args.learning_rate == 1e-3 and isinstance(args.learning_rate, float)
    assert args.weight_decay == 0.05


def test_a_sparsity_section_reads_as_top_level_keys(tmp_path):
    """A ``sparsity:`` section (the form `NMSparsityConfig.from_yaml` and ``nmsparse`` read) is
    read the same way by a recipe; a key set inside and outside it is refused, naming it."""
    path = tmp_path / "nested.yaml"
    path.write_text("learning_rate: 0.002\nsparsity:\n  n_sparsity: 1\n  m_sparsity: 8\n")
    args = parse_args([str(path)], "vit").training
    assert (args.n_keep, args.m, args.learning_rate) == (1, 8, 0.002)
    path.write_text("m: 4\nsparsity:\n  m: 8\n")
    with pytest.raises(
        RecipeConfigError, match="nested.yaml: m set both under sparsity: and at the top level"
    ):
        parse_args([str(path)], "vit")


def test_metrics_that_run_code_need_trust_remote_code(tmp_path):
    from nmsparse_hf.recipes.models import ModelArguments

    script = tmp_path / "x.py"
    script.write_text("raise SystemExit('ran')\n")
    for metric in (str(script), "f1"):
        with pytest.raises(RecipeConfigError, match="trust_remote_code"):
            parse_args(["--metrics", f"accuracy,{metric}"], "vit")
        assert ModelArguments(metrics=metric, trust_remote_code=True).metric_names == [metric]
    assert parse_args(["--metrics", "accuracy,top5"], "vit").model.metric_names == [
        "accuracy",
        "top5",
    ]


def test_unknown_config_override_and_timm_architecture_before_the_model_is_built(tmp_path):
    from nmsparse_hf.errors import NMSparsityConfigError
    from nmsparse_hf.recipes.models import ModelArguments, build_model, check_model_args

    with pytest.raises(NMSparsityConfigError, match="did you mean 'hidden_size'"):
        run(["--config_overrides", "hiden_size=32", "--output_dir", str(tmp_path)], "vit")
    with pytest.raises(NMSparsityConfigError, match="Close names: vit_base_patch16_224"):
        check_model_args(ModelArguments(model_config="timm:vit_base_patch16_22"))

    with pytest.raises(NMSparsityConfigError, match="did you mean 'hidden_size'"):
        build_model(ModelArguments(config_overrides="hiden_size=32"), "vit", None, 10)
    with pytest.raises(NMSparsityConfigError, match="no architecture 'vit_nonexistent'"):
        build_model(ModelArguments(model_config="timm:vit_nonexistent"), "vit", None, 10)
    with pytest.raises(NMSparsityConfigError, match="vit_base_patch16_224"):
        build_model(ModelArguments(model_config="timm:vit_base_patch16_22"), "vit", None, 10)


def test_one_class_imagefolder_is_a_clear_error(tmp_path):
    from PIL import Image

    from nmsparse_hf.data import DataArguments, DataArgumentsError
    from nmsparse_hf.recipes.image_classification import load_labelled_data

    (tmp_path / "cat").mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / "cat" / f"{i}.png")
    with pytest.raises(DataArgumentsError, match="at least two"):
        load_labelled_data(DataArguments(dataset_name="imagefolder", data_dir=str(tmp_path)))


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text('{"m": 4,}')
    with pytest.raises(SystemExit) as info:
        cli("vit", [str(path)])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "bad.json:1: JSON syntax error" in err
    assert len(err.splitlines()) == 1


def test_script_config_error_has_no_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- a list\n")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "train_vit.py"), "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "holds a list" in proc.stderr


# ---------------------------------------------------------------------------------- pretrained
@pytest.fixture
def local_pretrained(tmp_path):
    """A tiny 3-class ViT saved with its image processor and a card naming its license."""
    from conftest import tiny_vit
    from transformers import ViTImageProcessor

    path = tmp_path / "base"
    model = tiny_vit(labels=3, image=16, patch=4)
    model.save_pretrained(path)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(path)
    (path / "README.md").write_text("---\nlicense: mit\n---\n# base\n")
    return path


def test_mismatched_head_needs_the_flag_and_the_processor_travels(local_pretrained):
    from nmsparse_hf.errors import NMSparsityConfigError
    from nmsparse_hf.recipes.models import ModelArguments, build_model

    labels = [str(i) for i in range(10)]
    with pytest.raises(NMSparsityConfigError, match="--ignore_mismatched_sizes true"):
        build_model(ModelArguments(model_name_or_path=str(local_pretrained)), "vit", labels, 10)
    built = build_model(
        ModelArguments(model_name_or_path=str(local_pretrained), ignore_mismatched_sizes=True),
        "vit",
        labels,
        10,
    )
    assert built.model.config.num_labels == 10 and "re-initialised" in built.notes[0]
    assert type(built.processor).__name__ == "ViTImageProcessor"


def test_card_fields_of_a_fine_tune(local_pretrained, tmp_path):
    from nmsparse_hf.data import DataArguments
    from nmsparse_hf.recipes.image_classification import card_fields
    from nmsparse_hf.recipes.models import ModelArguments

    fields = card_fields(
        ModelArguments(model_name_or_path=str(local_pretrained)),
        DataArguments(dataset_name="ILSVRC/imagenet-1k"),
        str(tmp_path / "vit-ft"),
    )
    assert fields == dict(
        model_name="vit-ft",
        finetuned_from=str(local_pretrained),
        dataset="ILSVRC/imagenet-1k",
        dataset_tags=["ILSVRC/imagenet-1k"],
        license="mit",
    )


# ---------------------------------------------------------------------------------- a real run
@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    argv = ["vit_digits.yaml", "--output_dir", str(out), *TINY]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        summary = run(argv, "vit")
    return argv, summary, out / "final", stdout.getvalue()


def test_settings_are_printed_once_at_start(digits_run):
    _, _, _, stdout = digits_run
    assert stdout.count("nmsparse_hf recipe | config:") == 1
    head = stdout[stdout.index("nmsparse_hf recipe") :]
    assert "sparsity: MDGF-exp, FF 1:8" in head and "learning_rate=0.002" in head
    assert stdout.index("nmsparse_hf recipe") < stdout.index("verified N:M: PASS")


def test_pipeline_reproduces_the_recipes_evaluation(digits_run):
    """The saved folder loads with `pipeline()` (processor included) and classifies the held-out
    images as the recipe's own evaluation did."""
    from transformers import pipeline

    from nmsparse_hf.data import load_image_dataset

    argv, summary, final, _ = digits_run
    assert (final / "preprocessor_config.json").is_file()
    data_args = parse_args(argv, "vit").data
    _, eval_raw, _ = load_image_dataset(data_args)
    classify = pipeline("image-classification", model=str(final), device="cpu")
    predictions = classify([row["image"] for row in eval_raw], top_k=1)
    labels = [str(row["label"]) for row in eval_raw]
    accuracy = sum(p[0]["label"] == y for p, y in zip(predictions, labels, strict=True))
    assert round(accuracy / len(labels), 4) == summary["eval"]["eval_accuracy"]


def test_evaluate_only_a_saved_model(digits_run, tmp_path):
    """`--do_eval true` alone evaluates the model as given (here the run's own checkpoint, read
    back with its saved processor): the same accuracy, nothing trained or written."""
    argv, summary, final, _ = digits_run
    out = tmp_path / "eval"
    evaluated = run(
        [
            *argv,
            "--model_name_or_path",
            str(final),
            "--do_eval",
            "true",
            "--output_dir",
            str(out),
        ],
        "vit",
    )
    assert evaluated["steps"] == 0 and not (out / "final").exists()
    assert evaluated["eval"]["eval_accuracy"] == summary["eval"]["eval_accuracy"]


def test_model_card_of_a_run(digits_run):
    from huggingface_hub import ModelCard

    _, summary, final, _ = digits_run
    card = ModelCard.load(final / "README.md")
    data = card.data
    assert data.pipeline_tag == "image-classification" and data.license == "other"
    assert {"nmsparse", "n:m-sparsity", "1:8-sparsity", "mdgf-exp"} <= set(data.tags)
    assert "accuracy" in data.metrics
    (result,) = [r for r in data.eval_results if r.metric_type == "accuracy"]
    assert result.dataset_name == "scikit-learn digits"
    assert result.metric_value == pytest.approx(summary["eval"]["eval_accuracy"], abs=1e-4)
    assert card.data.model_name == "out"


def test_card_pipeline_tag_and_base_model_follow_the_model(digits_run):
    from huggingface_hub import ModelCard

    from nmsparse_hf.export import verify_checkpoint
    from nmsparse_hf.export.card import infer_pipeline_tag, render_model_card

    _, _, final, _ = digits_run
    assert infer_pipeline_tag(["BertForSequenceClassification"]) == "text-classification"
    assert infer_pipeline_tag(["LlamaForCausalLM"]) == "text-generation"
    assert infer_pipeline_tag(["BertModel"]) is None
    from nmsparse_hf.export import load_sparse_metadata

    meta = load_sparse_metadata(final)
    text = render_model_card(
        meta,
        verify_checkpoint(final),
        {"eval_accuracy": 0.5},
        "me/bert-sparse",
        "bert",
        architectures=["BertForSequenceClassification"],
        finetuned_from="google-bert/bert-base-uncased",
        dataset_tags="nyu-mll/glue",
        license="apache-2.0",
    )
    data = ModelCard(text).data
    assert data.pipeline_tag == "text-classification" and "image-classification" not in data.tags
    assert data.base_model == "google-bert/bert-base-uncased" and data.datasets == ["nyu-mll/glue"]
    assert data.license == "apache-2.0" and data.eval_results[0].dataset_type == "nyu-mll/glue"
    assert 'pipeline("text-classification", model="me/bert-sparse")' in text


def test_interrupted_run_resumes_and_the_model_is_saved_before_evaluation(tmp_path, monkeypatch):
    """An evaluation crash after training costs nothing (the model is already saved); a rerun
    refuses to replace it; after an interruption, the same command with
    --resume_from_checkpoint true continues from the last checkpoint."""
    from nmsparse_hf.export import verify_checkpoint
    from nmsparse_hf.integrations import NMSparseTrainer

    out = tmp_path / "out"
    argv = ["vit_digits.yaml", "--output_dir", str(out), *TINY, "--save_strategy", "steps"]
    argv += ["--save_steps", "3", "--resume_from_checkpoint", "true"]

    def evaluation_crash(self, *args, **kwargs):
        raise RuntimeError("evaluation crashed")

    with monkeypatch.context() as patch:
        patch.setattr(NMSparseTrainer, "evaluate", evaluation_crash)
        with pytest.raises(RuntimeError, match="evaluation crashed"):
            run(argv, "vit")
    assert verify_checkpoint(out / "final").ok
    with pytest.raises(RecipeConfigError, match="already holds a finished sparse model"):
        run(argv, "vit")
    shutil.rmtree(out / "final")  # as if stopped after step 3
    shutil.rmtree(out / "checkpoint-6")
    summary = run(argv, "vit")
    assert summary["steps"] == 6 and any("resuming from" in n for n in summary["notes"])
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6


# ---------------------------------------------------------------------------------- metrics
def test_logged_sparsity_names_say_what_they_measure():
    """While alpha > 0 the mask already prunes 1 - N/M of the weights (mask_sparsity) but the
    effective weights hold no exact zeros yet (weight_zeros); alpha says how far MDGF is."""
    from conftest import tiny_vit

    from nmsparse_hf import NMSparsifier, NMSparsityConfig
    from nmsparse_hf.integrations import sparsity_logs

    config = NMSparsityConfig(n_keep=1, m=4, locations="FF", decay_type="exp", decay_coef=0.2)
    sparsifier = NMSparsifier(tiny_vit(), config, total_steps=10)
    sparsifier.update(2)
    logs = sparsity_logs(sparsifier)
    assert logs["nm/FF/mask_sparsity"] == 0.75 and logs["nm/FF/weight_zeros"] == 0.0
    assert 0.0 < logs["nm/alpha"] < 1.0 and (logs["nm/FF/n_keep"], logs["nm/FF/m"]) == (1, 4)
    sparsifier.finalize()
    assert sparsity_logs(sparsifier)["nm/FF/weight_zeros"] == 0.75
    assert "nm/FF/sparsity" not in logs and "nm/FF/density" not in logs
    for name in ("nm/alpha", "nm/phase", "nm/FF/mask_sparsity", "nm/FF/weight_zeros"):
        assert f"`{name}`" in DOCS, name  # documented in the README or docs/


def test_readme_and_configs_name_existing_paths():
    for text in (
        README,
        (ROOT / "recipes" / "train_vit.py").read_text(),
        (ROOT / "recipes" / "train_swin.py").read_text(),
    ):
        for word in text.replace("`", " ").replace("(", " ").split():
            if word.endswith(".yaml") and "/" in word and "accelerate_configs" not in word:
                assert (ROOT / word).is_file(), word
            elif word.endswith(".yaml") and "/" not in word and word[0].isalpha():
                known = (CONFIGS / word).is_file() or (ROOT / "accelerate_configs" / word).is_file()
                assert known or word.upper() == word, word
    for path in CONFIGS.glob("*.yaml"):
        assert yaml.safe_load(path.read_text())  # every shipped config parses as YAML
