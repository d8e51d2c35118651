"""The training data pipeline of the recipes, with random augmentation that resumes exactly.

Every random draw here is a pure function of ``(seed, epoch, sample)``:

* each training example is transformed under `seeded_rng` (Python's `random`, numpy's and torch's
  CPU generators seeded from `augmentation_key`, the global states restored afterwards), so its
  crop, flip, RandAugment ops and erasing depend on nothing else: not on the worker, not on how
  many examples were transformed before it;
* batch mixing (`TimmMixCollator`) draws from a generator seeded by the keys of the batch's
  examples, i.e. by ``(seed, epoch, which examples)``.

When the Trainer resumes mid-epoch it skips the batches already seen without transforming them;
since no state depends on them, the rest of the run is bitwise the same as without interruption.
The epoch is told to the dataset by `AugmentationEpochCallback` (map-style) or by the Trainer's
``set_epoch`` (streaming). A *sample* is its index for map-style data; for streamed data it is its
identity (its webdataset ``__key__``, else its image path or bytes), see `streaming_augmented`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .arguments import DataArguments, DataArgumentsError
from .images import (
    BadImageError,
    decode_image,
    describe,
    find_bad_images,
    format_bad_images,
    image_paths,
)

logger = logging.getLogger(__name__)

AUG_KEY = "aug_key"  # the column carrying each example's augmentation key to the collator


def augmentation_key(seed: int, epoch: int, sample: int | str | bytes) -> int:
    """A 64-bit key for the random draws of one example: a hash of ``(seed, epoch, sample)``."""
    data = sample if isinstance(sample, bytes) else str(sample).encode()
    digest = hashlib.blake2b(data, digest_size=8, key=f"{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest, "big")


@contextlib.contextmanager
def seeded_rng(key: int) -> Iterator[None]:
    """Run a block with Python's `random`, numpy's global generator and torch's CPU generator
    seeded from ``key``; their previous states are restored afterwards (accelerator generators
    are not touched)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    torch_state = torch.default_generator.get_state()
    random.seed(key)
    np.random.seed([key & 0xFFFFFFFF, key >> 32])
    torch.default_generator.manual_seed(key)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.default_generator.set_state(torch_state)


class AugmentedDataset(torch.utils.data.Dataset):
    """A map-style dataset whose examples are ``{"pixel_values", "labels", "aug_key", ...}``.

    Example ``i`` of epoch ``e`` is decoded (a bad image raises `BadImageError` naming its file,
    or, with ``bad_images="skip"``, is replaced by the next readable example and counted) and
    transformed under `seeded_rng` with ``augmentation_key(seed, e, i)``. Other columns pass
    through. The epoch lives in shared memory, so `set_epoch` reaches DataLoader workers, even
    persistent ones, as long as it is called before the epoch's iterator is created (the Trainer
    does, through `AugmentationEpochCallback`).
    """

    def __init__(
        self,
        dataset,
        transform: Callable,
        image_column: str,
        label_column: str,
        seed: int = 0,
        bad_images: str = "fail",
    ):
        import datasets

        if isinstance(dataset.features.get(image_column), datasets.Image):
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.dataset = dataset
        self.transform = transform
        self.image_column, self.label_column = image_column, label_column
        self.seed, self.bad_images = seed, bad_images
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self.skipped = torch.zeros(1, dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        """Use the draws of epoch ``epoch`` from now on."""
        self._epoch.fill_(int(epoch))

    @property
    def epoch(self) -> int:
        """The epoch whose draws are used."""
        return int(self._epoch.item())

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        for offset in range(len(self)):
            row = self.dataset[(index + offset) % len(self)]
            where = f"example {(index + offset) % len(self)}"
            try:
                image = decode_image(row[self.image_column], where)
                break
            except BadImageError as err:
                if self.bad_images != "skip":
                    raise
                self.skipped += 1
                logger.warning("skipping %s", err)
        else:
            raise DataArgumentsError("bad_images='skip': no example of the dataset is readable.")
        key = augmentation_key(self.seed, self.epoch, index)
        with seeded_rng(key):
            pixel_values = self.transform(image)
        out = {k: v for k, v in row.items() if k not in (self.image_column, self.label_column)}
        out.update(pixel_values=pixel_values, labels=int(row[self.label_column]), aug_key=key)
        return out


def streaming_augmented(
    dataset,
    transform: Callable,
    image_column: str,
    label_column: str,
    seed: int = 0,
    bad_images: str = "fail",
    skipped: torch.Tensor | None = None,
):
    """A streamed `datasets.IterableDataset` mapped to ``{"pixel_values", "labels", "aug_key"}``.

    Each example is transformed under `seeded_rng` with ``augmentation_key(seed, epoch, identity)``
    where ``epoch`` is the one the Trainer set with ``set_epoch`` and ``identity`` is the example's
    ``__key__``, else its image path, else its image bytes: two identical images of one stream get
    the same draws. A bad image raises `BadImageError` naming it, or with ``bad_images="skip"`` is
    dropped, logged and counted in ``skipped`` (a shared-memory int64 tensor, if given).
    """
    import datasets

    features = dataset.features
    if features is not None and isinstance(features.get(image_column), datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    holder: dict[str, Any] = {}

    def one(example: dict) -> dict:
        value = example[image_column]
        try:
            image = decode_image(value, f"stream example {example.get('__key__', '')}".strip())
        except BadImageError as err:
            if bad_images != "skip":
                raise
            logger.warning("skipping %s", err)
            if skipped is not None:
                skipped.add_(1)
            return {"pixel_values": None, "labels": -1, AUG_KEY: 0}
        key = augmentation_key(seed, holder["dataset"].epoch, _identity(example, value))
        with seeded_rng(key):
            pixel_values = transform(image)
        return {"pixel_values": pixel_values, "labels": int(example[label_column]), AUG_KEY: key}

    mapped = dataset.map(one, remove_columns=[image_column, label_column])
    if bad_images == "skip":
        mapped = mapped.filter(lambda example: example["pixel_values"] is not None)
    holder["dataset"] = mapped
    return mapped


def _identity(example: Mapping[str, Any], value: Any) -> bytes:
    key = example.get("__key__")
    if key is not None:
        return str(key).encode()
    if isinstance(value, Mapping):
        if value.get("path"):
            return str(value["path"]).encode()
        if value.get("bytes") is not None:
            return bytes(value["bytes"])
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    return describe(value).encode() if getattr(value, "filename", None) else value.tobytes()


class AugmentationEpochCallback:
    """Tells the map-style `AugmentedDataset` s the epoch at the start of each epoch (accelerate
    forwards ``set_epoch`` to the sampler, not to such a dataset), and reports the images left out
    under ``bad_images="skip"`` at the end of training."""

    def __init__(
        self,
        datasets_: list[AugmentedDataset],
        pre_skipped: int = 0,
        counters: list[torch.Tensor] | None = None,
    ):
        self.datasets = datasets_
        self.pre_skipped = pre_skipped
        self.counters = [d.skipped for d in datasets_] + list(counters or [])

    def on_epoch_begin(self, args, state, control, **kwargs):
        """Set every dataset's epoch to the Trainer's (``int(state.epoch)``, exact at a boundary)."""
        for dataset in self.datasets:
            dataset.set_epoch(int(state.epoch))
        return control

    def on_train_end(self, args, state, control, **kwargs):
        """Warn with the number of images left out (bad_images='skip')."""
        skipped = self.pre_skipped + sum(int(c.item()) for c in self.counters)
        if skipped:
            logger.warning(
                "bad_images='skip': %d unreadable image(s) were left out (%d found before "
                "training, %d replaced while reading); their paths were logged.",
                skipped,
                self.pre_skipped,
                skipped - self.pre_skipped,
            )
        return control

    def __getattr__(self, name: str):
        if name.startswith("on_"):  # the remaining TrainerCallback events: nothing to do
            return lambda args, state, control, **kwargs: control
        raise AttributeError(name)


@dataclass
class TrainingData:
    """What `build_training_data` returns: datasets and collators for the Trainer.

    ``train_collator`` mixes and yields float soft targets when ``soft_labels`` (set
    ``model.config.problem_type = "multi_label_classification"``: BCE); ``eval_collator`` never
    mixes (use it for evaluation). Pass ``callbacks`` to the Trainer. ``notes`` say what was done
    (bad images left out, label smoothing moved into the targets).
    """

    train_dataset: Any
    eval_dataset: Any
    train_collator: Callable
    eval_collator: Callable
    soft_labels: bool
    eval_transform: Callable | None = None
    callbacks: list[Any] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def check_local_images(dataset, image_column: str, policy: str, what: str):
    """Check the local image files of a map-style ``dataset`` before training.

    ``policy="fail"`` raises `BadImageError` listing every bad file; ``"skip"`` returns the
    dataset without them. Returns ``(dataset, bad)``, ``bad`` mapping path -> reason. Data that
    is not local files (Hub, streamed) is returned unchecked: it is checked as it is read.
    """
    paths = image_paths(dataset, image_column)
    if paths is None:
        return dataset, {}
    bad = find_bad_images([p for p in paths if p])
    if not bad:
        return dataset, {}
    if policy != "skip":
        raise BadImageError(
            f"{len(bad)} unreadable image(s) in the {what} data:\n{format_bad_images(bad)}\n"
            "Replace or delete them, or set bad_images='skip' to leave them out."
        )
    logger.warning(
        "bad_images='skip': leaving out %d %s image(s):\n%s", len(bad), what, format_bad_images(bad)
    )
    keep = [i for i, p in enumerate(paths) if p not in bad]
    return dataset.select(keep), bad


def build_training_data(
    data_args: DataArguments,
    train_raw,
    eval_raw,
    num_labels: int,
    *,
    source: Any = None,
    model: Any = None,
    bce_loss: bool = False,
    label_smoothing: float = 0.0,
    seed: int | None = None,
) -> TrainingData:
    """Datasets and collators for a recipe run, from the raw splits of `load_image_dataset`.

    Transforms are timm's (`transforms_from_args`, normalized as ``source`` says, or for a
    TimmWrapper ``model`` as its timm model's ``pretrained_cfg`` says); mixing is
    timm's `Mixup` (`TimmMixCollator`). Labels are float soft targets (BCE) when mixing is on or
    ``bce_loss``; ``label_smoothing`` then goes into the targets as timm does (the caller must
    not also smooth in the loss). Local images are checked first (``data_args.bad_images``).
    Every random draw is keyed by ``(seed, epoch, sample)``, where ``seed`` combines
    ``data_args.dataset_seed`` with the run's ``seed`` (`TrainingArguments.seed`, if given), so
    runs with different seeds draw different augmentations, as in timm.
    """
    import datasets

    from .collators import TimmMixCollator, collate_fn
    from .sources import resolve_columns
    from .transforms import transforms_from_args

    seed = data_args.dataset_seed if seed is None else data_args.dataset_seed * 2**32 + seed % 2**32
    timm_model = getattr(model, "timm_model", None)
    if isinstance(getattr(timm_model, "pretrained_cfg", None), Mapping):
        source = timm_model  # a TimmWrapper: timm's data config, as timm's train.py reads it
    image_column, label_column = resolve_columns(
        train_raw, data_args.image_column, data_args.label_column
    )
    notes: list[str] = []
    train_raw, bad_train = check_local_images(
        train_raw, image_column, data_args.bad_images, "training"
    )
    eval_raw, bad_eval = check_local_images(
        eval_raw, image_column, data_args.bad_images, "evaluation"
    )
    skipped = len(bad_train) + len(bad_eval)
    if skipped:
        notes.append(f"bad_images=skip: {skipped} unreadable image(s) left out")
    train_tf, eval_tf = transforms_from_args(data_args, source)
    policy = data_args.bad_images
    counters: list[torch.Tensor] = []
    if isinstance(train_raw, datasets.IterableDataset):
        counters = [torch.zeros(1, dtype=torch.int64).share_memory_() for _ in range(2)]
        columns = (image_column, label_column, seed, policy)
        train_ds = streaming_augmented(train_raw, train_tf, *columns, counters[0])
        eval_ds = streaming_augmented(eval_raw, eval_tf, *columns, counters[1])
        epoch_datasets = []
    else:
        train_ds = AugmentedDataset(train_raw, train_tf, image_column, label_column, seed, policy)
        eval_ds = AugmentedDataset(eval_raw, eval_tf, image_column, label_column, seed, policy)
        epoch_datasets = [train_ds, eval_ds]
    callbacks = [AugmentationEpochCallback(epoch_datasets, skipped, counters)]
    soft = bce_loss or data_args.mixing
    if not soft:
        return TrainingData(
            train_ds, eval_ds, collate_fn, collate_fn, False, eval_tf, callbacks, notes
        )
    mix = TimmMixCollator(
        num_labels,
        mixup_alpha=data_args.mixup_alpha,
        cutmix_alpha=data_args.cutmix_alpha,
        cutmix_minmax=data_args.cutmix_minmax,
        prob=data_args.mixup_prob if data_args.mixing else 0.0,
        switch_prob=data_args.mixup_switch_prob,
        mode=data_args.mixup_mode,
        label_smoothing=label_smoothing,
        seed=seed,
    )
    if label_smoothing:
        notes.append(f"label smoothing {label_smoothing} applied in the soft targets, as timm does")
    return TrainingData(
        train_ds, eval_ds, mix, mix.eval_collator(), True, eval_tf, callbacks, notes
    )
