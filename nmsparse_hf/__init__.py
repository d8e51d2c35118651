"""nmsparse_hf: N:M structured-sparsity training (SR-STE, MDGF, SDGF) for Hugging Face models.

The layout follows the job each part does:

* the core (`config`, `masks`, `schedule`, `autograd`, `targets`, `sparsifier`, `one_shot`)
  imports no transformers and works in any PyTorch loop;
* `integrations`: `SparseTrainingArguments`, `NMSparsityCallback`, `NMSparseTrainer`;
* `export`: the one sparse-checkpoint save path, its metadata, verify, model card, Hub push;
* `data`: image datasets, transforms, collators and metrics of the recipes;
* `recipes`: the training scripts' front ends and their shipped configs;
* `cli`: the ``nmsparse`` command.

``import nmsparse_hf`` stays light: the Trainer integration and the export tools are imported
lazily (PEP 562) the first time one of their names is used, e.g.
``from nmsparse_hf import NMSparseTrainer``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .autograd import EffectiveWeight, effective_weight
from .config import NMSparsityConfig
from .errors import NMSparsityConfigError, NMSparsityError, NMTargetError, NMVerificationError
from .masks import is_nm, nm_mask
from .one_shot import OneShotReport, one_shot
from .schedule import SparsitySchedule, StepPlan
from .sparsifier import NMSparsifier, VerificationReport, verify_nm
from .targets import find_targets

__version__ = "0.2.0"

# name -> submodule that defines it, imported on first use
_LAZY = {
    "NMSparseTrainer": "integrations",
    "NMSparsityCallback": "integrations",
    "SparseTrainingArguments": "integrations",
    "save_sparse_pretrained": "export",
    "verify_checkpoint": "export",
    "push_sparse_to_hub": "export",
    "load_sparse_metadata": "export",
}

if TYPE_CHECKING:
    from .export import (
        load_sparse_metadata,
        push_sparse_to_hub,
        save_sparse_pretrained,
        verify_checkpoint,
    )
    from .integrations import NMSparseTrainer, NMSparsityCallback, SparseTrainingArguments


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'nmsparse_hf' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "EffectiveWeight",
    "NMSparseTrainer",
    "NMSparsifier",
    "NMSparsityCallback",
    "NMSparsityConfig",
    "NMSparsityConfigError",
    "NMSparsityError",
    "NMTargetError",
    "NMVerificationError",
    "OneShotReport",
    "SparseTrainingArguments",
    "SparsitySchedule",
    "StepPlan",
    "VerificationReport",
    "__version__",
    "effective_weight",
    "find_targets",
    "is_nm",
    "load_sparse_metadata",
    "nm_mask",
    "one_shot",
    "push_sparse_to_hub",
    "save_sparse_pretrained",
    "verify_checkpoint",
    "verify_nm",
]
