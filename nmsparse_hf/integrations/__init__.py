"""Hugging Face Trainer integration: thin adapters from the Trainer to the core.

* `arguments`: `SparseTrainingArguments` (`TrainingArguments` + the sparsity fields);
* `callback`: `NMSparsityCallback` (drives an `NMSparsifier` from the Trainer's events; works with
  a stock `Trainer`) and the ``nm/...`` logs;
* `trainer`: `NMSparseTrainer` (attaches the sparsifier, saves through the one sparse-export
  path, pushes once);
* `resume`: the workaround for transformers issue 43701 (resume from renamed weights).
"""

from .arguments import SparseTrainingArguments
from .callback import NMSparsityCallback, sparsity_logs
from .trainer import NMSparseTrainer

__all__ = ["NMSparseTrainer", "NMSparsityCallback", "SparseTrainingArguments", "sparsity_logs"]
