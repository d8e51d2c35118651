"""The causal-LM recipe behind ``recipes/train_causal_lm.py``: TRL's supervised fine-tuning of
an N:M-sparse decoder, ending like every recipe with a verified sparse checkpoint, its
tokenizer and model card, and the held-out perplexity (exp of the evaluation loss).

    accelerate launch recipes/train_causal_lm.py                 # causal_lm_tiny.yaml, offline
    accelerate launch recipes/train_causal_lm.py --model_name_or_path Qwen/Qwen2.5-0.5B \\
        --dataset_name wikitext --dataset_config_name wikitext-2-raw-v1 \\
        --one_shot wanda --n_keep 2 --m 4 --locations FF,QKV,O --max_steps 1000
    accelerate launch recipes/train_causal_lm.py --train_file notes.txt --use_peft true

Text comes from the Hub (``--dataset_name``) or local files (``--train_file`` /
``--validation_file``: ``.txt``, one text a line, or JSON lines with a ``text`` field; the field
is TRL's ``--dataset_text_field``). The model is a pretrained one or the built-in ``tiny-llama``
(its tokenizer trained on the training text). ``--one_shot`` prunes it to the target pattern
before training (magnitude, Wanda or SparseGPT, calibrated on the first
``--calibration_samples`` training texts); TRL's ``--use_peft`` trains LoRA adapters under the
masks, merged into the N:M base weights before the model is saved.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import NMSparsityConfigError
from .arguments import RecipeArgs, RecipeConfigError, RecipeSpec, ScriptArguments, parse_args
from .common import evaluate_only, recipe_cli, save_and_finish, start_run, text_card_fields
from .text_models import tiny_text_config, train_tokenizer


@dataclass
class CausalLMDataArguments:
    """Where the text comes from.

    Args:
        dataset_name, dataset_config_name: a Hub dataset (its ``train`` split, and
            ``eval_split`` for evaluation).
        train_file, validation_file: local ``.txt`` (one text a line; blank lines are
            dropped) or ``.json``/``.jsonl`` files with the text field.
        eval_split: the Hub split evaluated on (default ``validation``, else ``test``).
        max_train_samples, max_eval_samples: keep only the first texts (quick runs).
    """

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset."})
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Hub dataset configuration."}
    )
    train_file: str | None = field(
        default=None, metadata={"help": "Local .txt (a text a line) or .jsonl training file."}
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Local .txt or .jsonl evaluation file."}
    )
    eval_split: str | None = field(
        default=None, metadata={"help": "Hub evaluation split (default: validation, else test)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on n texts."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on n texts."})


def _arguments() -> tuple[type, ...]:
    try:
        from .sft import CausalLMModelArguments, SparseSFTConfig
    except ImportError as exc:
        raise RecipeConfigError(
            f"the causal-LM recipe needs TRL ({exc}); pip install 'nmsparse_hf[trl]'."
        ) from None
    return CausalLMModelArguments, CausalLMDataArguments, SparseSFTConfig, ScriptArguments


def recipe_spec(name: str = "causal_lm") -> RecipeSpec:
    """The command line of ``recipes/train_causal_lm.py``."""
    return RecipeSpec(
        name=name,
        what="an N:M-sparse causal language model (TRL's SFTTrainer)",
        arguments=_arguments,
        start=(
            "  (no arguments)      the embedded default causal_lm_tiny.yaml: tiny-llama on a\n"
            "                      shipped text, offline, seconds on a CPU\n"
            "  flags only          tweak it; --model_name_or_path, --dataset_name or\n"
            "                      --train_file start from the argument classes' defaults"
        ),
        default_config="causal_lm_tiny.yaml",
        source_flags=frozenset({"model_name_or_path", "dataset_name", "train_file"}),
        config_prefix=("causal_lm",),
    )


# ------------------------------------------------------------------ the run
def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run `main`. Returns the summary dict."""
    return main(parse_args(argv, "causal_lm"))


def cli(argv: list[str] | None = None) -> None:
    """The script's entry point (`common.recipe_cli`): a setting error is one line on stderr
    and exit code 2."""
    recipe_cli("causal_lm", main, argv)


def main(recipe: RecipeArgs) -> dict[str, Any]:
    """Fine-tune with TRL's SFTTrainer, save (model, tokenizer, card), evaluate (perplexity)
    and verify. Returns the summary dict (empty on processes other than the main one)."""
    from trl import get_peft_config

    from .sft import NMSparseSFTTrainer

    model_args, data_args, args, _, notes = recipe
    start = time.time()
    with start_run(recipe) as final_dir:  # checks, output_dir lock, settings, seed
        # ---- data, model, one-shot start, adapters
        train, evaluation = load_texts(data_args, args.dataset_text_field)
        model, tokenizer = build_causal_lm(model_args, train[args.dataset_text_field])
        if model_args.one_shot != "none":
            notes.append(prune_one_shot(model, tokenizer, train, model_args, args))
        peft_config = get_peft_config(model_args)
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
            notes.append(f"LoRA adapters r={model_args.lora_r}, alpha={model_args.lora_alpha}")

        # ---- trainer: the tokenizer goes beside the model (pipeline() needs it)
        trainer = NMSparseSFTTrainer(
            model=model,
            args=args,
            train_dataset=train,
            eval_dataset=evaluation,
            processing_class=tokenizer,
        )
        if not args.do_train:
            return evaluate_only(trainer, notes, add_metrics=perplexity)

        # ---- train, then save (before any evaluation), evaluate, verify
        trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
        if peft_config is not None:  # the N:M base with the (masked) adapter updates merged in
            trainer.model = trainer.model_wrapped = trainer.model.merge_and_unload()
        card = card_fields(model_args, data_args, args.output_dir)
        return save_and_finish(trainer, final_dir, card, start, notes, add_metrics=perplexity)


# ------------------------------------------------------------------ steps of main
def load_texts(data_args: CausalLMDataArguments, text_field: str):
    """``(train, eval or None)`` datasets holding ``text_field``, empty texts dropped."""
    import datasets

    if data_args.dataset_name:
        raw = datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name)
        split = data_args.eval_split or next((s for s in ("validation", "test") if s in raw), None)
    elif data_args.train_file:
        raw = _load_files(data_args)
        split = "validation"
    else:
        raise NMSparsityConfigError(
            "no data: pass --train_file (a .txt, one text a line, or .jsonl with a 'text' field) "
            "or --dataset_name (e.g. wikitext --dataset_config_name wikitext-2-raw-v1)."
        )
    columns = raw["train"].column_names
    if text_field not in columns:
        raise NMSparsityConfigError(
            f"dataset_text_field={text_field!r} is not a column of the data ({columns}); pass "
            f"--dataset_text_field <column>."
        )
    train = _texts(raw["train"], text_field, data_args.max_train_samples)
    evaluation = (
        _texts(raw[split], text_field, data_args.max_eval_samples) if split in raw else None
    )
    return train, evaluation


def _load_files(data_args: CausalLMDataArguments):
    import datasets

    files = {"train": data_args.train_file}
    if data_args.validation_file:
        files["validation"] = data_args.validation_file
    builders = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json"}
    for path in files.values():
        if Path(path).suffix not in builders:
            raise NMSparsityConfigError(
                f"{path!r}: unsupported file type {Path(path).suffix!r}; use .txt (a text a line) "
                f"or .jsonl (a 'text' field)."
            )
        if not os.path.isfile(path):
            raise NMSparsityConfigError(f"{path!r} does not exist; pass the path of a text file.")
    return datasets.load_dataset(builders[Path(data_args.train_file).suffix], data_files=files)


def _texts(dataset, text_field: str, n: int | None):
    dataset = dataset.filter(lambda row: bool(str(row[text_field] or "").strip()))
    return dataset if n is None else dataset.select(range(min(n, len(dataset))))


def build_causal_lm(model_args, texts):
    """``(model, tokenizer)``: a pretrained causal LM and its tokenizer, or the built-in
    ``model_config`` with a tokenizer trained on ``texts``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not model_args.model_name_or_path:
        tokenizer = train_tokenizer(texts, "llama")
        config = tiny_text_config(model_args.model_config, tokenizer)
        return AutoModelForCausalLM.from_config(config), tokenizer
    path = model_args.model_name_or_path
    hub = dict(revision=model_args.model_revision)
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or path, **hub)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = model_args.dtype if model_args.dtype not in (None, "auto") else "float32"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **hub)
    return model, tokenizer


def prune_one_shot(model, tokenizer, train, model_args, args) -> str:
    """Prune ``model`` in place to the target N:M with ``model_args.one_shot``, calibrated on
    the first ``calibration_samples`` training texts; returns a note for the summary."""
    from ..one_shot import one_shot

    texts = train[args.dataset_text_field][: model_args.calibration_samples]
    length = args.max_length or 1024
    calibration = [
        tokenizer(text, return_tensors="pt", truncation=True, max_length=length) for text in texts
    ]
    report = one_shot(model, args.sparsity_config(), model_args.one_shot, calibration)
    return (
        f"one-shot {model_args.one_shot} start: {len(report.blocks)} blocks pruned to N:M on "
        f"{len(texts)} calibration texts"
    )


def perplexity(metrics: dict[str, float]) -> dict[str, float]:
    """``{"eval_perplexity": exp(eval_loss)}`` (inf when the loss overflows)."""
    loss = metrics.get("eval_loss")
    if loss is None:
        return {}
    try:
        return {"eval_perplexity": math.exp(loss)}
    except OverflowError:
        return {"eval_perplexity": math.inf}


def card_fields(model_args, data_args, output_dir: str) -> dict[str, Any]:
    """The model card's fields: those of every text recipe (`text_card_fields`), the license,
    and TRL's tags."""
    card = text_card_fields(model_args, data_args, output_dir)
    return dict(card, license=model_args.license, tags=["trl", "sft"])
