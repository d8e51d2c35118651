"""What leaves the training process: sparse checkpoints, their metadata, model card and Hub push.

* `metadata`: the ``nm_sparsity`` block of ``config.json`` (one typed record);
* `checkpoint`: `save_sparse_pretrained`, the one path that writes a sparse checkpoint, and
  `verify_checkpoint`, which checks exactly what ``from_pretrained`` would load;
* `card`: the model card;
* `hub`: `push_sparse_to_hub` (verifies first);
* `inference`: the CUDA-only 2:4 semi-structured swap for inference.
"""

from .checkpoint import save_sparse_pretrained, verify_checkpoint
from .hub import push_sparse_to_hub
from .metadata import load_sparse_metadata

__all__ = [
    "load_sparse_metadata",
    "push_sparse_to_hub",
    "save_sparse_pretrained",
    "verify_checkpoint",
]
