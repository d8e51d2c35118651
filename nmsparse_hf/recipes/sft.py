"""TRL's supervised fine-tuning with N:M sparsity: the argument classes and the trainer of the
causal-LM recipe (`causal_lm`). Imports TRL (``pip install nmsparse_hf[trl]``).

* `CausalLMModelArguments`: TRL's `ModelConfig` (``use_peft``, ``lora_r``, ``lora_alpha``,
  ``lora_target_modules`` ... for `trl.get_peft_config`) plus the built-in model, the tokenizer
  and the one-shot start;
* `SparseSFTConfig`: TRL's `SFTConfig` plus the sparsity fields of `SparseTrainingArguments`;
* `NMSparseSFTTrainer`: `SFTTrainer` with `NMSparseTrainer`'s sparsifier, callback and sparse
  export (the final save goes through `save_sparse_pretrained` and verifies).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

from trl import ModelConfig, SFTConfig, SFTTrainer

from ..errors import NMSparsityConfigError
from ..integrations import NMSparseTrainer, SparseTrainingArguments
from .text_models import check_text_preset

ONE_SHOT_METHODS = ("none", "magnitude", "wanda", "sparsegpt")


@dataclass
class CausalLMModelArguments(ModelConfig):
    """TRL's `ModelConfig` plus what the causal-LM recipe starts from.

    Args:
        model_config: the built-in model trained from scratch when ``model_name_or_path`` is
            not given: ``tiny-llama`` (its byte-level BPE tokenizer trained on the training
            text, offline).
        tokenizer_name: the tokenizer, when it is not beside the model.
        one_shot: prune the starting model to the target N:M before training: ``none``,
            ``magnitude``, ``wanda`` or ``sparsegpt`` (`nmsparse_hf.one_shot`).
        calibration_samples: how many training texts (the first ones) calibrate ``wanda`` and
            ``sparsegpt``.
        license: the model card's license.
    """

    model_config: str = field(
        default="tiny-llama",
        metadata={"help": "Built-in model trained from scratch, offline: tiny-llama."},
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer, when not beside the model."}
    )
    one_shot: str = field(
        default="none",
        metadata={
            "help": "Prune to the target N:M before training: none, magnitude, wanda, sparsegpt."
        },
    )
    calibration_samples: int = field(
        default=128, metadata={"help": "Training texts calibrating wanda / sparsegpt."}
    )
    license: str | None = field(default=None, metadata={"help": "License of the model card."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.one_shot not in ONE_SHOT_METHODS:
            raise NMSparsityConfigError(
                f"one_shot={self.one_shot!r} is not a method; use one of "
                f"{', '.join(ONE_SHOT_METHODS)}."
            )
        if self.calibration_samples < 1:
            raise NMSparsityConfigError(
                f"calibration_samples={self.calibration_samples} must be at least 1."
            )
        if self.use_peft and importlib.util.find_spec("peft") is None:
            raise NMSparsityConfigError(
                "use_peft=true but PEFT is not installed; pip install peft, or leave use_peft out."
            )
        if not self.model_name_or_path:
            check_text_preset(self.model_config, "llama")


@dataclass
class SparseSFTConfig(SparseTrainingArguments, SFTConfig):
    """TRL's `SFTConfig` (``dataset_text_field``, ``max_length``, ``packing`` ...) plus the
    N:M sparsity fields of `SparseTrainingArguments`; ``sparsity_config()`` returns the
    validated `NMSparsityConfig`."""


class NMSparseSFTTrainer(NMSparseTrainer, SFTTrainer):
    """TRL's `SFTTrainer` training an N:M-sparse model: `NMSparseTrainer` attaches the
    sparsifier before TRL prepares the model, puts its callback first, and saves the final
    model through the one sparse-export path (`save_sparse_pretrained`, verified)."""
