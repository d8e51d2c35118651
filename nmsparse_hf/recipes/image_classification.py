"""The image-classification recipe behind ``recipes/train_vit.py`` and ``recipes/train_swin.py``.

`main` reads top to bottom: settings, data, model, trainer, train, save, evaluate, verify. The
arguments come from `arguments.parse_args` (a config file and flags, as in TRL's scripts); the
model from the Hub, a local path, a preset or a timm architecture (`models.build_model`). The
final model is saved, with its image processor and model card, before the last evaluation, so
an evaluation failure never costs the run.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from .arguments import RecipeArgs, RecipeSpec, ScriptArguments, parse_args, shipped_config
from .common import (
    evaluate_only,
    format_settings,
    format_summary,
    recipe_cli,
    refuse_to_replace,
    save_and_finish,
    start_run,
)
from .models import ModelArguments, build_model, check_model_args, processor_for_eval_transform

__all__ = [
    "cli",
    "format_settings",
    "format_summary",
    "main",
    "parse_args",
    "recipe_spec",
    "refuse_to_replace",
    "run",
    "shipped_config",
]


@dataclass
class ImageScriptArguments(ScriptArguments):
    """`ScriptArguments` plus the transformers example scripts' imagefolder flags.

    Args:
        train_dir / validation_dir: read as ``data_dir`` (the two must be ``<root>/train`` and
            ``<root>/<validation split>``).
    """

    train_dir: str | None = field(
        default=None, metadata={"help": "Imagefolder of training images (sets --data_dir)."}
    )
    validation_dir: str | None = field(
        default=None,
        metadata={"help": "Imagefolder of validation images, a sibling of --train_dir."},
    )


def _arguments() -> tuple[type, ...]:
    from ..data import DataArguments
    from ..integrations import SparseTrainingArguments

    return ModelArguments, DataArguments, SparseTrainingArguments, ImageScriptArguments


def recipe_spec(family: str) -> RecipeSpec:
    """The command line of ``recipes/train_<family>.py`` (``vit`` or ``swin``)."""
    default = f"{family}_digits.yaml"
    return RecipeSpec(
        name=family,
        what="an N:M-sparse image classifier",
        arguments=_arguments,
        start=(
            f"  (no arguments)      the embedded default {default}: digits, from scratch, "
            f"minutes on a CPU\n"
            "  flags only          tweak the embedded default (--seed 1 --m 4); flags that "
            "choose a model or\n                      dataset (--model_name_or_path, "
            "--model_config, --dataset_name, --data_dir,\n                      --train_dir) "
            "start from the argument classes' own defaults instead"
        ),
        default_config=default,
        default_model=f"{family}-digits",
        source_flags=frozenset(
            {"model_name_or_path", "model_config", "dataset_name", "data_dir", "train_dir"}
        ),
        aliases={  # transformers example-script names -> ours (flags and config keys)
            "image_column_name": "image_column",
            "label_column_name": "label_column",
            "dataset_config_name": "dataset_config",
        },
        config_prefix=(family,),
    )


def run(argv: list[str] | None = None, family: str = "vit") -> dict[str, Any]:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run `main`. Returns the summary dict."""
    return main(parse_args(argv, family))


def cli(family: str, argv: list[str] | None = None) -> None:
    """The scripts' entry point (`common.recipe_cli`): a setting error is one line on stderr
    and exit code 2."""
    recipe_cli(family, main, argv)


def main(recipe: RecipeArgs) -> dict[str, Any]:
    """Train, save, evaluate and verify the run ``recipe`` describes. Returns the summary dict
    (empty on processes other than the main one)."""
    from ..data import make_compute_metrics, require_max_steps
    from ..integrations import NMSparseTrainer

    model_args, data_args, args, script, notes = recipe
    start = time.time()
    require_max_steps(data_args.streaming, args.max_steps)
    with start_run(recipe) as final_dir:  # checks, output_dir lock, settings, seed
        # ---- data and model
        check_model_args(model_args)  # before any data is read
        train_raw, eval_raw, label_names = load_labelled_data(data_args)
        built = build_model(model_args, "", label_names, len(label_names))
        notes += built.notes
        data = image_datasets(
            data_args, model_args, train_raw, eval_raw, built, len(label_names), args
        )
        notes += data.notes
        processor = built.processor or processor_for_eval_transform(
            data.eval_transform, built.normalization_source
        )

        # ---- trainer
        args.remove_unused_columns = False  # the transforms read the raw image column
        trainer = NMSparseTrainer(
            model=built.model,
            args=args,
            train_dataset=data.train,
            eval_dataset=data.eval,
            data_collator=data.collator,
            compute_metrics=make_compute_metrics(model_args.metric_names),
            processing_class=processor,
            callbacks=data.callbacks,
        )
        if data.eval_collator is not None:
            _use_eval_collator(trainer, data.eval_collator)
        if not args.do_train:
            return evaluate_only(trainer, notes)

        # ---- train, then save (before any evaluation), evaluate, verify
        trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
        card = card_fields(model_args, data_args, args.output_dir)
        return save_and_finish(trainer, final_dir, card, start, notes)


# ------------------------------------------------------------------ steps of main


def load_labelled_data(data_args):
    """``(train, eval, class names)`` of the raw data; a dataset needs at least two classes."""
    from ..data import DataArgumentsError, load_image_dataset

    try:
        train, evaluation, names = load_image_dataset(data_args)
    except DataArgumentsError as exc:
        if data_args.source == "imagefolder" and "label_column" in str(exc):
            raise DataArgumentsError(
                f"data_dir={data_args.data_dir!r}: the imagefolder has no labels; datasets reads "
                f"the class of an image from its sub-folder and adds no label column when every "
                f"image sits in one folder. Put each class in its own sub-folder (at least two)."
            ) from None
        raise
    if names is None:
        raise DataArgumentsError(
            "num_labels: the dataset's labels carry no class names; set --num_labels."
        )
    if len(names) < 2:
        raise DataArgumentsError(
            f"the dataset has {len(names)} class ({', '.join(map(str, names))}): a classifier "
            f"needs at least two. Check --data_dir / --dataset_name and --label_column."
        )
    return train, evaluation, list(names)


class ImageData:
    """The datasets and collators of a run, the evaluation transform (for the processor) and
    the data pipeline's Trainer callbacks."""

    def __init__(
        self, train, evaluation, collator, eval_collator, eval_transform, callbacks=(), notes=()
    ):
        self.train, self.eval = train, evaluation
        self.collator, self.eval_collator = collator, eval_collator
        self.eval_transform = eval_transform
        self.callbacks, self.notes = list(callbacks), list(notes)


def image_datasets(
    data_args, model_args, train_raw, eval_raw, built, num_labels: int, args=None
) -> ImageData:
    """timm's transforms and mixing, keyed so that a resumed run is exact
    (`data.build_training_data`); BCE soft targets when asked for or when mixing (the model's loss
    is switched to BCE through ``problem_type``, and label smoothing moves into the targets)."""
    from ..data import build_training_data

    smoothing = getattr(args, "label_smoothing_factor", 0.0) or 0.0
    data = build_training_data(
        data_args,
        train_raw,
        eval_raw,
        num_labels,
        source=built.normalization_source,
        model=built.model,
        bce_loss=model_args.bce_loss,
        label_smoothing=smoothing,
        seed=getattr(args, "seed", None),
    )
    if data.soft_labels:
        built.model.config.problem_type = "multi_label_classification"
        if args is not None:
            args.label_smoothing_factor = 0.0  # now in the soft targets
    eval_collator = data.eval_collator if data.soft_labels else None
    return ImageData(
        data.train_dataset,
        data.eval_dataset,
        data.train_collator,
        eval_collator,
        data.eval_transform,
        data.callbacks,
        data.notes,
    )


def card_fields(model_args, data_args, output_dir: str) -> dict[str, Any]:
    """The model card's fields beyond the checkpoint: title, base model, dataset, license."""
    source = data_args.source
    dataset = {"digits": "scikit-learn digits", "hub": data_args.dataset_name}.get(
        source, os.path.basename(os.path.normpath(data_args.data_dir or source))
    )
    return dict(
        model_name=os.path.basename(os.path.abspath(output_dir)),
        finetuned_from=model_args.model_name_or_path,
        dataset=dataset,
        dataset_tags=[data_args.dataset_name] if source == "hub" else None,
        license=model_args.license or _base_license(model_args),
    )


def _base_license(model_args) -> str | None:
    """The license in the base model's card, when it can be read without a download."""
    path = model_args.model_name_or_path
    if not path or not os.path.isfile(os.path.join(path, "README.md")):
        return None
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(os.path.join(path, "README.md")).data.license
    except (OSError, ValueError):
        return None


def _use_eval_collator(trainer, collator) -> None:
    """The Trainer has one data_collator; evaluation must not see mixup (see TimmMixCollator)."""
    original = trainer.get_eval_dataloader

    def get_eval_dataloader(eval_dataset=None):
        train_collator = trainer.data_collator
        trainer.data_collator = collator
        try:
            return original(eval_dataset)
        finally:
            trainer.data_collator = train_collator

    trainer.get_eval_dataloader = get_eval_dataloader
