"""`SparseTrainingArguments`: `TrainingArguments` plus the N:M sparsity fields."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments
from transformers.utils import logging

from ..config import NMSparsityConfig

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
        super().__post_init__()
        self.sparsity_config()  # fail on bad sparsity settings when the arguments are parsed

    def sparsity_config(self) -> NMSparsityConfig:
        """The `NMSparsityConfig` these arguments describe (validated)."""
        names = {f.name for f in dataclasses.fields(NMSparsityConfig)} - {"extra"}
        values = {name: getattr(self, name) for name in names}
        for key in ("target_modules", "exclude_modules"):
            values[key] = _patterns(values[key])
        return NMSparsityConfig(**values)


def _patterns(value):
    """A one-element list holding regex characters is a regex; otherwise a list of names."""
    if value is None or isinstance(value, str):
        return value
    value = list(value)
    if len(value) == 1 and _REGEX_CHARS.search(value[0]):
        return value[0]
    return value
