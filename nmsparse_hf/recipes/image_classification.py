"""The image-classification recipe behind ``recipes/train_vit.py`` and ``recipes/train_swin.py``.

`main` reads top to bottom: settings, data, model, trainer, train, save, evaluate, verify. The
arguments come from `arguments.parse_args` (a config file and flags, as in TRL's scripts); the
model from the Hub, a local path, a preset or a timm architecture (`models.build_model`). The
final model is saved, with its image processor and model card, before the last evaluation, so
an evaluation failure never costs the run.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import MISSING, fields
from enum import Enum
from typing import Any

from ..errors import NMSparsityConfigError, NMTargetError
from .arguments import RecipeArgs, parse_args, shipped_config
from .common import (
    check_ranks_agree,
    finish_run,
    format_summary,
    numbers,
    refuse_to_replace,
    seed_everything,
)
from .models import build_model, check_model_args, processor_for_eval_transform

__all__ = ["cli", "format_summary", "main", "parse_args", "run", "shipped_config"]


def run(argv: list[str] | None = None, family: str = "vit") -> dict[str, Any]:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run `main`. Returns the summary dict."""
    return main(parse_args(argv, family), family)


def cli(family: str, argv: list[str] | None = None) -> None:
    """The scripts' entry point: `run`, with a setting error printed as one line and exit code 2
    (no traceback), as argparse does for a bad flag."""
    from ..data import DataArgumentsError

    try:
        run(argv, family)
    except (NMSparsityConfigError, NMTargetError, DataArgumentsError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def main(recipe: RecipeArgs, family: str = "vit") -> dict[str, Any]:
    """Train, save, evaluate and verify the run ``recipe`` describes. Returns the summary dict
    (empty on processes other than the main one)."""
    from ..data import make_compute_metrics, require_max_steps
    from ..integrations import NMSparseTrainer

    model_args, data_args, args, script, notes = recipe
    start = time.time()
    require_max_steps(data_args.streaming, args.max_steps)
    final_dir = os.path.join(args.output_dir, "final")
    if args.do_train:
        refuse_to_replace(final_dir, script.overwrite_output_dir)  # never lose finished work
    if args.process_index == 0:
        print(format_settings(recipe), flush=True)
    # Seed before the model is built: a from-scratch model takes its initial weights from the
    # global RNG, and the Trainer only seeds in its own __init__, after the model exists.
    seed_everything(args)

    # ---- data and model
    check_model_args(model_args)  # before any data is read
    train_raw, eval_raw, label_names = load_labelled_data(data_args)
    built = build_model(model_args, family, label_names, len(label_names))
    notes += built.notes
    data = image_datasets(data_args, model_args, train_raw, eval_raw, built, len(label_names), args)
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
        return _evaluate_only(trainer, notes)

    # ---- train, save (before any evaluation), evaluate, verify
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    distributed = check_ranks_agree(trainer)
    if script.overwrite_output_dir and args.should_save and os.path.isdir(final_dir):
        shutil.rmtree(final_dir)  # asked for; only now that the new model exists
    card = card_fields(model_args, data_args, args.output_dir)
    trainer.save_model(final_dir)
    trainer.create_model_card(**card)
    metrics = trainer.evaluate() if args.do_eval else {}
    if metrics:
        trainer.create_model_card(**card)  # now with the final evaluation
    summary = finish_run(trainer, metrics, final_dir, time.time() - start, notes, distributed)
    return summary


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


def _evaluate_only(trainer, notes: list[str]) -> dict[str, Any]:
    metrics = trainer.evaluate()
    summary = {"eval": numbers(metrics), "notes": notes, "steps": 0}
    if trainer.args.should_save:
        print("eval: " + "  ".join(f"{k}={v}" for k, v in summary["eval"].items()), flush=True)
    trainer.accelerator.end_training()
    return summary


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


# ------------------------------------------------------------------ what the run prints
_TRAINING_SHOWN = (
    "output_dir",
    "do_train",
    "do_eval",
    "max_steps",
    "num_train_epochs",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "max_grad_norm",
    "seed",
    "bf16",
    "fp16",
    "use_cpu",
    "eval_strategy",
    "save_strategy",
    "resume_from_checkpoint",
)


def format_settings(recipe: RecipeArgs) -> str:
    """The run's settings, printed once at start: model and data settings that differ from the
    argument classes' defaults, the sparsity recipe, the main training settings, and notes."""
    model_args, data_args, args, script, notes = recipe
    cfg = args.sparsity_config()
    patterns = ", ".join(
        f"{loc} {n}:{m}" for loc in cfg.locations for n, m in [cfg.target_pattern(loc)]
    )
    rows = [
        f"nmsparse_hf recipe | config: {script.config or 'none (flags only)'}",
        f"  model: {model_args.model_name_or_path or model_args.model_config}"
        + "".join(f", {kv}" for kv in [_changed(model_args)] if kv),
        "  data: " + (_changed(data_args) or "the embedded digits"),
        f"  sparsity: {cfg.recipe_name}, {patterns} (dim={cfg.sparse_dim}), dense "
        f"{cfg.dense_fraction:g} / fine-tune {cfg.finetune_fraction:g} of the steps",
        "  training: " + ", ".join(f"{k}={_plain(getattr(args, k))}" for k in _TRAINING_SHOWN),
    ]
    rows += [f"  note: {n}" for n in notes]
    return "\n".join(rows)


def _changed(obj) -> str:
    """``name=value`` for the fields of a dataclass that differ from their defaults (the model's
    name is shown apart, a token never)."""
    out = []
    for f in fields(obj):
        value = getattr(obj, f.name)
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if value != default and f.name not in ("model_name_or_path", "model_config"):
            out.append(f"{f.name}={'***' if f.name == 'token' else _plain(value)}")
    return ", ".join(out)


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value
