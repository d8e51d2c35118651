"""The text-classification recipe behind ``recipes/train_text_classification.py``.

    accelerate launch recipes/train_text_classification.py t5_base_glue_mdgf_exp_1of32.yaml
    accelerate launch recipes/train_text_classification.py --model_name_or_path bert-base-uncased \\
        --dataset_name nyu-mll/glue --dataset_config_name rte --n_keep 1 --m 8 --locations FF,QKV
    accelerate launch recipes/train_text_classification.py --model_name_or_path ./my-model \\
        --train_file train.csv --validation_file dev.csv --text_columns sentence

GLUE from the Hub (``--dataset_name nyu-mll/glue --dataset_config_name <task>``) or local
CSV/JSON/JSONL files. Two kinds of models:

* **encoders** (BERT, RoBERTa, DistilBERT, DeBERTa-v2, ...): ``AutoModelForSequenceClassification``
  with a new classification head;
* **encoder-decoders** (T5, mT5): text to text as in the T5 paper: the input is
  ``"<task> <column>: <text> ..."``, the target is the label's name, and accuracy is the exact
  match of the label tokens (teacher-forced).

The model comes from the Hub or a local path (``--model_name_or_path``); the tokenizer is saved
beside the final model, so ``pipeline()`` works on the checkpoint. `main` reads top to bottom:
settings, data, model, trainer, train, save, evaluate, verify, as the image recipe does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import NMSparsityConfigError
from .arguments import RecipeArgs, RecipeSpec, ScriptArguments, parse_args
from .common import evaluate_only, recipe_cli, save_and_finish, start_run, text_card_fields
from .models import check_metrics
from .text_models import check_text_preset, tiny_text_config, train_tokenizer

# GLUE classification tasks: their text columns and validation split (stsb is a regression task).
GLUE_TASKS: dict[str, tuple[tuple[str, ...], str]] = {
    "cola": (("sentence",), "validation"),
    "sst2": (("sentence",), "validation"),
    "mrpc": (("sentence1", "sentence2"), "validation"),
    "qqp": (("question1", "question2"), "validation"),
    "mnli": (("premise", "hypothesis"), "validation_matched"),
    "qnli": (("question", "sentence"), "validation"),
    "rte": (("sentence1", "sentence2"), "validation"),
    "wnli": (("sentence1", "sentence2"), "validation"),
}


@dataclass
class TextModelArguments:
    """Which model and tokenizer the recipe fine-tunes.

    Args:
        model_name_or_path: a Hub id or local directory of a pretrained model (T5-style
            encoder-decoders train text to text, other models get a classification head);
            ``None`` builds ``model_config``.
        model_config: the built-in model trained from scratch when no pretrained model is
            given: ``tiny-bert`` (its tokenizer trained on the training text, offline).
        tokenizer_name: the tokenizer, when it is not beside the model.
        max_source_length: inputs are truncated to this many tokens.
        max_target_length: label names are truncated to this many tokens (text to text only).
        metrics: comma-separated metric names for an encoder (``accuracy`` ships offline);
            text to text always reports the exact-match accuracy. Names other than the shipped
            ones run code and need ``trust_remote_code``.
        trust_remote_code: allow code from the Hub or local files (custom model code, metric
            scripts).
    """

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or local directory of the pretrained model (None: model_config)."
        },
    )
    model_config: str = field(
        default="tiny-bert",
        metadata={"help": "Built-in model trained from scratch, offline: tiny-bert."},
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer, when not beside the model."}
    )
    max_source_length: int = field(default=128, metadata={"help": "Input length in tokens."})
    max_target_length: int = field(
        default=8, metadata={"help": "Label length in tokens (text to text)."}
    )
    metrics: str = field(
        default="accuracy",
        metadata={
            "help": "Metrics of an encoder model: accuracy (shipped); other evaluate names or "
            "scripts need --trust_remote_code."
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Run code from the Hub or local files (model code, metric scripts)."},
    )

    def __post_init__(self) -> None:
        check_metrics(self.metric_names, self.trust_remote_code)
        if not self.model_name_or_path:
            check_text_preset(self.model_config, "bert")

    @property
    def metric_names(self) -> list[str]:
        """The names in ``metrics``, stripped, in order."""
        return [m.strip() for m in self.metrics.split(",") if m.strip()]


@dataclass
class TextDataArguments:
    """Where the labelled text comes from.

    Args:
        dataset_name, dataset_config_name: a Hub dataset, e.g. ``nyu-mll/glue`` and ``rte``.
        train_file, validation_file: local ``.csv``, ``.json`` or ``.jsonl`` files instead.
        text_columns: comma-separated input columns (default: the GLUE task's, else
            ``sentence``, else ``text``).
        label_column: the label column (class names or integer ids).
        eval_split: the Hub split to evaluate on (default: the GLUE task's, else
            ``validation``).
        task_prefix: the text-to-text task prefix (default: the GLUE task name).
        max_train_samples, max_eval_samples: keep only the first rows (quick runs).
    """

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "e.g. a GLUE task."})
    train_file: str | None = field(default=None, metadata={"help": "Local CSV/JSON training file."})
    validation_file: str | None = field(
        default=None, metadata={"help": "Local CSV/JSON eval file."}
    )
    text_columns: str | None = field(default=None, metadata={"help": "Comma-separated columns."})
    label_column: str = field(default="label", metadata={"help": "The label column."})
    eval_split: str | None = field(default=None, metadata={"help": "Hub evaluation split."})
    task_prefix: str | None = field(default=None, metadata={"help": "Text-to-text task prefix."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on n rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on n rows."})


# ------------------------------------------------------------------ command line
def _arguments() -> tuple[type, ...]:
    from ..integrations import SparseTrainingArguments

    return TextModelArguments, TextDataArguments, SparseTrainingArguments, ScriptArguments


def recipe_spec(name: str = "text_classification") -> RecipeSpec:
    """The command line of ``recipes/train_text_classification.py``."""
    return RecipeSpec(
        name=name,
        what="an N:M-sparse text classifier (BERT-style, or T5 text to text)",
        arguments=_arguments,
        start=(
            "  (no config)         the argument classes' defaults: model_config tiny-bert, built\n"
            "                      offline with a tokenizer trained on your data, so\n"
            "                      --train_file train.csv [--validation_file dev.csv] is enough"
        ),
        config_prefix=("t5_", "bert_", "text_"),
    )


# ------------------------------------------------------------------ data
def load_text_data(data_args: TextDataArguments):
    """``(train, eval, label names, text columns)`` of the raw labelled text."""
    import datasets

    task = data_args.dataset_config_name if data_args.dataset_name else None
    glue_columns, glue_split = GLUE_TASKS.get(task or "", ((), "validation"))
    if data_args.dataset_name:
        raw = datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name)
        eval_split = data_args.eval_split or glue_split
    elif data_args.train_file:
        raw = _load_files(data_args)
        eval_split = "validation"
    else:
        raise NMSparsityConfigError(
            "no data: pass --dataset_name (e.g. nyu-mll/glue --dataset_config_name rte) or "
            "--train_file (and --validation_file) with CSV/JSON rows."
        )
    train = _first(raw["train"], data_args.max_train_samples)
    evaluation = _first(raw[eval_split], data_args.max_eval_samples) if eval_split in raw else None
    columns = _text_columns(data_args, glue_columns, train.column_names)
    labels = _label_names(train, data_args.label_column)
    if evaluation is not None:  # a label the model never saw in training is refused, named
        from ..data import check_eval_labels

        column = data_args.label_column
        check_eval_labels(
            train.unique(column),
            evaluation.unique(column),
            repr(eval_split),
            getattr(train.features[column], "names", None),
        )
    return train, evaluation, labels, columns


def _load_files(data_args: TextDataArguments):
    import datasets

    files = {"train": data_args.train_file}
    if data_args.validation_file:
        files["validation"] = data_args.validation_file
    suffix = Path(data_args.train_file).suffix.lstrip(".")
    builder = {"csv": "csv", "json": "json", "jsonl": "json"}.get(suffix)
    if builder is None:
        raise NMSparsityConfigError(
            f"train_file={data_args.train_file!r}: unsupported file type {suffix!r}; use .csv, "
            f".json or .jsonl."
        )
    return datasets.load_dataset(builder, data_files=files)


def _first(dataset, n: int | None):
    return dataset if n is None else dataset.select(range(min(n, len(dataset))))


def _text_columns(data_args, glue_columns: tuple[str, ...], available: list[str]) -> list[str]:
    if data_args.text_columns:
        columns = [c.strip() for c in data_args.text_columns.split(",") if c.strip()]
    elif glue_columns:
        columns = list(glue_columns)
    else:
        columns = [next((c for c in ("sentence", "text") if c in available), "sentence")]
    missing = [c for c in columns + [data_args.label_column] if c not in available]
    if missing:
        raise NMSparsityConfigError(
            f"text_columns/label_column: {missing} not in the data's columns {available}. "
            f"Pass --text_columns a,b and --label_column name."
        )
    return columns


def _label_names(train, label_column: str) -> list[str]:
    feature = train.features[label_column]
    names = getattr(feature, "names", None)
    if names is None:
        names = sorted({str(v) for v in train[label_column]})
    if len(names) < 2:
        raise NMSparsityConfigError(
            f"label_column={label_column!r}: {len(names)} class(es) {names}; a classifier needs "
            f"at least two."
        )
    return list(names)


def _label_ids(train, label_column: str, names: list[str]):
    """Map string labels to their index in ``names`` (ClassLabel ids are kept)."""
    if getattr(train.features[label_column], "names", None) is not None:
        return lambda value: int(value)
    index = {name: i for i, name in enumerate(names)}
    return lambda value: index[str(value)]


# ------------------------------------------------------------------ model and encoding
def build_text_model(model_args: TextModelArguments, label_names: list[str], texts=()):
    """``(model, tokenizer, text_to_text)``: an encoder-decoder loads as a seq2seq LM, any other
    model as a sequence classifier with ``len(label_names)`` labels. Without
    ``model_name_or_path`` the built-in ``model_config`` is built from scratch, its tokenizer
    trained on ``texts`` (the training text)."""
    from transformers import (
        AutoConfig,
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    labels = dict(
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
    )
    path = model_args.model_name_or_path
    if not path:
        tokenizer = train_tokenizer(texts, "bert")
        config = tiny_text_config(model_args.model_config, tokenizer, **labels)
        return AutoModelForSequenceClassification.from_config(config), tokenizer, False
    trust = dict(trust_remote_code=model_args.trust_remote_code)
    config = AutoConfig.from_pretrained(path, **trust)
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or path, **trust)
    if config.is_encoder_decoder:
        return AutoModelForSeq2SeqLM.from_pretrained(path, **trust), tokenizer, True
    model = AutoModelForSequenceClassification.from_pretrained(path, **labels, **trust)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, False


def training_texts(dataset, columns: list[str]):
    """The text of ``columns`` row by row (what a built-in model's tokenizer is trained on)."""
    for row in dataset.select_columns(columns):
        yield from (str(row[c]) for c in columns)


def encode(dataset, tokenizer, columns, label_ids, data_args, model_args, text_to_text, names):
    """Tokenize ``dataset``: pairs of columns as a pair for an encoder; text to text as
    ``"<prefix> <column>: <text> ..."`` with the label's name as the target."""
    prefix = data_args.task_prefix or data_args.dataset_config_name or ""
    label_column = data_args.label_column

    def batch_fn(batch):
        labels = [label_ids(v) for v in batch[label_column]]
        if not text_to_text:
            texts = [batch[c] for c in columns]
            out = tokenizer(*texts, truncation=True, max_length=model_args.max_source_length)
            out["labels"] = labels
            return out
        rows = zip(*(batch[c] for c in columns), strict=True)
        inputs = [
            " ".join(
                [prefix] * bool(prefix) + [f"{c}: {t}" for c, t in zip(columns, row, strict=True)]
            )
            for row in rows
        ]
        out = tokenizer(inputs, truncation=True, max_length=model_args.max_source_length)
        targets = tokenizer(
            text_target=[names[i] for i in labels],
            truncation=True,
            max_length=model_args.max_target_length,
        )
        out["labels"] = targets["input_ids"]
        return out

    return dataset.map(batch_fn, batched=True, remove_columns=dataset.column_names)


def exact_match_accuracy(eval_pred) -> dict[str, float]:
    """Text to text: the fraction of examples whose label tokens are all predicted (argmax
    token ids from `argmax_logits`, positions with label -100 ignored)."""
    preds, labels = np.asarray(eval_pred.predictions), np.asarray(eval_pred.label_ids)
    mask = labels != -100
    correct = ((preds == labels) | ~mask).all(axis=-1)
    return {"accuracy": float(correct.mean()) if len(correct) else 0.0}


def argmax_logits(logits, labels):
    """``preprocess_logits_for_metrics``: keep token ids, not vocabulary-sized logits."""
    if isinstance(logits, tuple | list):
        logits = logits[0]
    return logits.argmax(dim=-1)


# ------------------------------------------------------------------ the run
def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run `main`. Returns the summary dict."""
    return main(parse_args(argv, "text_classification"))


def cli(argv: list[str] | None = None) -> None:
    """The script's entry point (`common.recipe_cli`): a setting error is one line on stderr
    and exit code 2."""
    recipe_cli("text_classification", main, argv)


def main(recipe: RecipeArgs) -> dict[str, Any]:
    """Fine-tune, save (model, tokenizer, card), evaluate and verify. Returns the summary dict
    (empty on processes other than the main one)."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

    from ..data import make_compute_metrics
    from ..integrations import NMSparseTrainer

    model_args, data_args, args, _, notes = recipe
    start = time.time()
    with start_run(recipe) as final_dir:  # checks, output_dir lock, settings, seed
        # ---- data and model
        train_raw, eval_raw, names, columns = load_text_data(data_args)
        texts = training_texts(train_raw, columns)
        model, tokenizer, text_to_text = build_text_model(model_args, names, texts)
        label_ids = _label_ids(train_raw, data_args.label_column, names)
        enc = (tokenizer, columns, label_ids, data_args, model_args, text_to_text, names)
        train = encode(train_raw, *enc)
        evaluation = encode(eval_raw, *enc) if eval_raw is not None else None
        if text_to_text:
            collator = DataCollatorForSeq2Seq(tokenizer, model=model)
            metrics = dict(
                compute_metrics=exact_match_accuracy, preprocess_logits_for_metrics=argmax_logits
            )
            notes.append(f"text to text ({type(model).__name__})")
        else:
            collator = DataCollatorWithPadding(tokenizer)
            metrics = dict(compute_metrics=make_compute_metrics(model_args.metric_names))

        # ---- trainer: the tokenizer goes beside the model (pipeline() needs it)
        trainer = NMSparseTrainer(
            model=model,
            args=args,
            train_dataset=train,
            eval_dataset=evaluation,
            data_collator=collator,
            processing_class=tokenizer,
            **metrics,
        )
        if not args.do_train:
            return evaluate_only(trainer, notes)

        # ---- train, then save (before any evaluation), evaluate, verify
        trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
        card = text_card_fields(model_args, data_args, args.output_dir)
        return save_and_finish(trainer, final_dir, card, start, notes)
