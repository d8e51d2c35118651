"""Image-classification data: arguments, sources, transforms, collators and metrics.

* `arguments`: `DataArguments` (parsed by ``HfArgumentParser``), validated at parse time;
* `sources`: `load_image_dataset` (embedded digits, Hub, imagefolder, webdataset; map-style or
  streamed);
* `transforms`: training augmentation and evaluation transforms, `with_transforms`;
* `collators`: `collate_fn`, `TimmMixCollator` (timm's mixup/cutmix), `MixupCollator`;
* `images`: `decode_image` (names the bad file), `find_bad_images` (fast check of local files),
  `to_8bit` (16-bit and float images scaled to 8 bits);
* `labels`: `check_eval_labels` (an eval label no training example has is an error; both recipes);
* `pipeline`: `build_training_data` (what the recipes train on), `AugmentedDataset`,
  `seeded_rng`, `augmentation_key`: random augmentation keyed by (seed, epoch, sample), so a
  resumed run is bitwise the same;
* `metrics`: `make_compute_metrics` (shipped accuracy / top-5 modules, offline).

Nothing here is imported by the core of the library; datasets, torchvision and evaluate are
imported inside the functions that need them.
"""

from .arguments import DataArguments, DataArgumentsError, require_max_steps
from .collators import TimmMixCollator, collate_fn
from .images import BadImageError, decode_image, find_bad_images
from .labels import check_eval_labels
from .metrics import make_compute_metrics
from .pipeline import (
    AugmentationEpochCallback,
    AugmentedDataset,
    TrainingData,
    augmentation_key,
    build_training_data,
    seeded_rng,
    streaming_augmented,
)
from .sources import load_digits_dataset, load_image_dataset, resolve_columns
from .transforms import build_transforms, transforms_from_args, with_transforms

__all__ = [
    "AugmentationEpochCallback",
    "AugmentedDataset",
    "BadImageError",
    "DataArguments",
    "DataArgumentsError",
    "TimmMixCollator",
    "TrainingData",
    "augmentation_key",
    "build_training_data",
    "decode_image",
    "find_bad_images",
    "build_transforms",
    "check_eval_labels",
    "collate_fn",
    "load_digits_dataset",
    "load_image_dataset",
    "make_compute_metrics",
    "require_max_steps",
    "resolve_columns",
    "seeded_rng",
    "streaming_augmented",
    "transforms_from_args",
    "with_transforms",
]
