"""`SparseTrainingArguments`: `TrainingArguments` plus the N:M sparsity fields."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments
from transformers.utils import logging

from ..config import NMSparsityConfig
from ..errors import NMSparsityConfigError

logger = logging.get_logger(__name__)

_REGEX_CHARS = re.compile(r"[\\*+?()|\[\]{}^$]")

_CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(NMSparsityConfig)}


def _sparsity_field(name: str) -> Any:
    """A dataclass field with the default and help text of ``NMSparsityConfig.<name>``; a tuple
    default (``locations``) becomes the comma-separated string the command line takes."""
    source = _CONFIG_FIELDS[name]
    default = source.default
    if isinstance(default, tuple):
        default = ",".join(default)
    return field(default=default, metadata={"help": source.metadata["help"]})


@dataclass
class SparseTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the N:M sparsity fields of `NMSparsityConfig` (same names, same
    meaning). Parsed by `HfArgumentParser` from the command line, YAML or JSON;
    `sparsity_config()` returns the validated `NMSparsityConfig`."""

    # Defaults and help texts come from NMSparsityConfig, where each field is declared once; only
    # the types are the command line's (a comma-separated string, a list of names).
    # --- pattern
    n_keep: int = _sparsity_field("n_keep")
    m: int = _sparsity_field("m")
    n_keep_qkv: int | None = _sparsity_field("n_keep_qkv")
    m_qkv: int | None = _sparsity_field("m_qkv")
    sparse_dim: str = _sparsity_field("sparse_dim")
    locations: str = _sparsity_field("locations")
    # --- recipe
    sparsity_type: str = _sparsity_field("sparsity_type")
    decay_type: str = _sparsity_field("decay_type")
    decay_coef: float = _sparsity_field("decay_coef")
    structure_decay: bool = _sparsity_field("structure_decay")
    structure_decay_type: str = _sparsity_field("structure_decay_type")
    structure_decay_start_k: int = _sparsity_field("structure_decay_start_k")
    structure_decay_fallback: bool = _sparsity_field("structure_decay_fallback")
    srste_lambda: float = _sparsity_field("srste_lambda")
    # --- phases
    dense_fraction: float = _sparsity_field("dense_fraction")
    finetune_fraction: float = _sparsity_field("finetune_fraction")
    finetune_mask: str = _sparsity_field("finetune_mask")
    mask_source: str = _sparsity_field("mask_source")
    # --- targets
    target_modules: list[str] | None = _sparsity_field("target_modules")
    exclude_modules: list[str] | None = _sparsity_field("exclude_modules")

    def __post_init__(self):
        check_training_values(self)  # before transformers reads them
        super().__post_init__()
        self.sparsity_config()  # fail on bad sparsity settings when the arguments are parsed

    def sparsity_config(self) -> NMSparsityConfig:
        """The `NMSparsityConfig` these arguments describe (validated)."""
        names = {f.name for f in dataclasses.fields(NMSparsityConfig)} - {"extra"}
        values = {name: getattr(self, name) for name in names}
        for key in ("target_modules", "exclude_modules"):
            values[key] = _patterns(values[key])
        return NMSparsityConfig(**values)


class TrainingArgumentsError(NMSparsityConfigError):
    """A `TrainingArguments` value is out of range: the message names the field, the value and
    the fix."""


def _number(low: float = 0.0, below: float = math.inf, optional: bool = False):
    """A test: a finite real number in ``[low, below)`` (``None`` too, if ``optional``)."""

    def ok(value: Any) -> bool:
        if value is None:
            return optional
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        return math.isfinite(value) and low <= value < below

    return ok


def _integer(low: int, optional: bool = False, also: tuple[int, ...] = ()):
    """A test: an integer ``>= low`` or one of ``also`` (``None`` too, if ``optional``)."""

    def ok(value: Any) -> bool:
        if value is None:
            return optional
        if isinstance(value, bool) or not isinstance(value, int):
            return False
        return value >= low or value in also

    return ok


# (field, test, what it must be and the fix): TrainingArguments values that transformers takes
# without a check and that would train wrongly (a negative or NaN step size, max_steps=-5 running
# for num_train_epochs) or fail at step 1 with a traceback (a batch size or accumulation of 0).
TRAINING_VALUE_RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("learning_rate", _number(), "must be a finite number >= 0, e.g. 1e-3"),
    ("weight_decay", _number(), "must be a finite number >= 0 (0 turns weight decay off)"),
    ("adam_beta1", _number(below=1.0), "must lie in [0, 1), e.g. 0.9"),
    ("adam_beta2", _number(below=1.0), "must lie in [0, 1), e.g. 0.999"),
    ("adam_epsilon", _number(), "must be a finite number >= 0, e.g. 1e-8"),
    (
        "max_grad_norm",
        _number(optional=True),
        "must be a finite number >= 0 or None (0 or None turns gradient clipping off), e.g. 1.0",
    ),
    (
        "label_smoothing_factor",
        _number(below=1.0),
        "must lie in [0, 1): 0 turns label smoothing off, 0.1 is usual",
    ),
    ("num_train_epochs", _number(), "must be a finite number >= 0, e.g. 3"),
    (
        "max_steps",
        _integer(1, also=(-1,)),
        "must be a positive number of optimizer steps, or -1 to train for num_train_epochs",
    ),
    ("per_device_train_batch_size", _integer(1), "must be a positive integer, e.g. 8"),
    ("per_device_eval_batch_size", _integer(1), "must be a positive integer, e.g. 8"),
    (
        "gradient_accumulation_steps",
        _integer(1),
        "must be a positive integer (1 = no accumulation)",
    ),
    (
        "eval_accumulation_steps",
        _integer(1, optional=True),
        "must be a positive integer, or None to gather predictions at the end",
    ),
    (
        "dataloader_num_workers",
        _integer(0),
        "must be an integer >= 0 (0 loads the data in the main process)",
    ),
)


def check_training_values(args: Any) -> None:
    """Raise `TrainingArgumentsError` for the first value of ``args`` that breaks a rule of
    `TRAINING_VALUE_RULES` (each names the field, its value and the fix). Called by
    `SparseTrainingArguments.__post_init__`, i.e. whenever the arguments are built or parsed."""
    for name, ok, requirement in TRAINING_VALUE_RULES:
        value = getattr(args, name)
        if not ok(value):
            raise TrainingArgumentsError(f"{name}={value!r}: {requirement}.")


def _patterns(value):
    """A one-element list holding regex characters is a regex; otherwise a list of names."""
    if value is None or isinstance(value, str):
        return value
    value = list(value)
    if len(value) == 1 and _REGEX_CHARS.search(value[0]):
        return value[0]
    return value
