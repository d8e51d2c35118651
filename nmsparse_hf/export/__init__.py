"""What leaves the training process: sparse checkpoints, their metadata, model card and Hub push.

* `metadata`: the ``nm_sparsity`` block of ``config.json`` (one typed record);
* `checkpoint`: `save_sparse_pretrained`, the one path that writes a sparse checkpoint (atomic:
  staged beside the output, verified, moved into place), `verify_checkpoint`, which checks
  exactly what ``from_pretrained`` would load, and `checkpoint_state` (finished, incomplete or
  missing);
* `atomic`: the staging directory and the moves into place;
* `architecture`: the layers the recorded config targets in the recorded architecture;
* `weights`: which weight files load, read with safetensors only;
* `card`: renders the model card (written by `checkpoint.write_model_card`);
* `hub`: `push_sparse_to_hub` (verifies first);
* `inference`: the CUDA-only 2:4 semi-structured swap for inference.
"""

from .checkpoint import (
    NMIncompleteCheckpointError,
    checkpoint_state,
    save_sparse_pretrained,
    verify_checkpoint,
)
from .hub import push_sparse_to_hub
from .metadata import load_sparse_metadata

__all__ = [
    "NMIncompleteCheckpointError",
    "checkpoint_state",
    "load_sparse_metadata",
    "push_sparse_to_hub",
    "save_sparse_pretrained",
    "verify_checkpoint",
]
