"""Image-classification data for sparse training runs: datasets, transforms, collators, metrics.

Four sources, one entry point (`load_image_dataset`):

* the **embedded default** (``dataset_name=None``): scikit-learn's bundled handwritten digits,
  1797 images of 8x8 pixels, upscaled to 32x32 RGB; no download, so examples and tests run offline;
* a **Hub dataset** by id (``ILSVRC/imagenet-1k``, ``timm/imagenet-1k-wds`` ...), map-style or
  streaming;
* a local **imagefolder** (``<data_dir>/<class>/<image>``, optionally under ``train/`` and
  ``validation/``);
* local **webdataset shards** (``*.tar`` holding ``<key>.jpg`` + ``<key>.cls`` members, the layout of
  ``timm/imagenet-1k-wds``), streamed.

Streaming datasets come back shuffled with a buffer and the seed. They are *not* split across
ranks here: the Hugging Face Trainer (through ``accelerate``) already gives each rank its part of
an ``IterableDataset``, and calls ``set_epoch`` so every epoch is reshuffled; splitting here as well
(``split_dataset_by_node``) would shard twice and never show half of the data.

Transforms follow the DeiT/timm recipe (RandomResizedCrop + flip + optional RandAugment for
training; resize to ``size / 0.875`` + center crop for evaluation), `collate_fn` and
`MixupCollator` build the batches, `make_compute_metrics` returns the Trainer's
``compute_metrics`` from the `evaluate` modules shipped in ``nmsparse_hf/metrics/``.

Nothing here is imported by the core of the library; datasets, torchvision and evaluate are
imported inside the functions that need them.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import NMSparsityError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224
EVAL_CROP_RATIO = 0.875

DIGITS = "digits"
IMAGEFOLDER = "imagefolder"
WEBDATASET = "webdataset"

IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "webp", "pixel_values")
LABEL_COLUMNS = ("label", "labels", "cls", "class", "target")
SHIPPED_METRICS = {
    "accuracy": "accuracy.py",
    "top5": "top5_accuracy.py",
    "top5_accuracy": "top5_accuracy.py",
}
METRICS_DIR = Path(__file__).resolve().parent / "metrics"

_SPLIT_ALIASES = {"validation": ("validation", "valid", "val", "dev"), "test": ("test", "eval")}


class DataArgumentsError(NMSparsityError):
    """A data setting is invalid: the message names the field, the value and the fix."""


@dataclass
class DataArguments:
    """Where the images come from and how they are augmented.

    Parsed by `transformers.HfArgumentParser` next to the training arguments (CLI, YAML, JSON).

    Args:
        dataset_name: ``None`` for the embedded digits; a Hub id (``ILSVRC/imagenet-1k``,
            ``timm/imagenet-1k-wds``); ``"imagefolder"`` or ``"webdataset"`` for files under
            ``data_dir``. With ``data_dir`` set and no name, the kind is detected (``*.tar`` files
            mean webdataset shards, anything else an imagefolder).
        dataset_config: the Hub dataset's configuration name, if it has several.
        data_dir: root of a local imagefolder or of a directory of webdataset shards.
        train_split / eval_split: split names. When ``eval_split`` does not exist, ``eval_fraction``
            of the training split is carved out deterministically (seeded and stratified for
            map-style data; by a hash of each example for streaming data, so train and eval never
            overlap whatever the shard order).
        eval_fraction: share of the training split used for evaluation when there is no eval split.
        image_column / label_column: ``None`` detects them among ``IMAGE_COLUMNS`` / ``LABEL_COLUMNS``.
        num_labels: number of classes when the label column carries no class names (webdataset
            ``cls`` integers); ignored otherwise.
        streaming: stream the data (`datasets.IterableDataset`); the Trainer then needs
            ``max_steps > 0`` (see `require_max_steps`).
        shuffle_buffer_size: examples held by the streaming shuffle buffer.
        image_size: side of the square training/eval crop; ``None`` takes it from the image
            processor or the model config (`normalization_from`).
        max_train_samples / max_eval_samples: keep only this many examples (a seeded random subset
            for map-style data, the first ones of the stream otherwise).
        randaugment: ``"m<magnitude>-n<num_ops>"`` (timm spelling, ``"rand-m9-n2"`` also accepted),
            or ``None`` for none.
        mixup_alpha: Beta(alpha, alpha) parameter of mixup; ``0`` turns it off (see `MixupCollator`).
        mixup_prob: probability that a batch is mixed when mixup is on.
        random_erasing: probability of torchvision's RandomErasing on a training image (0 = off).
        min_crop_scale: lower bound of RandomResizedCrop's area scale; ``None`` = 0.08 for natural
            images, 0.8 for the digits (a tenth of a digit is not a digit).
        hflip: random horizontal flips; ``None`` = on for natural images, off for the digits (a
            mirrored 2 is not a 2).
        dataset_seed: seed of every random choice made here (splits, subsets, shuffles, mixup);
            not ``seed``, which `transformers.TrainingArguments` already has (one parser reads both).
    """

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "None for the embedded digits; a Hub id (ILSVRC/imagenet-1k, "
            "timm/imagenet-1k-wds); 'imagefolder' or 'webdataset' for files under --data_dir."
        },
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "Configuration name of the Hub dataset."}
    )
    data_dir: str | None = field(
        default=None,
        metadata={"help": "Root of a local imagefolder or a directory of webdataset .tar shards."},
    )
    train_split: str = field(default="train", metadata={"help": "Name of the training split."})
    eval_split: str = field(
        default="validation",
        metadata={"help": "Name of the eval split; if missing, --eval_fraction of train is used."},
    )
    eval_fraction: float = field(
        default=0.1,
        metadata={"help": "Share of train carved out for evaluation when there is no eval split."},
    )
    image_column: str | None = field(
        default=None, metadata={"help": "Image column; None detects image/img/jpg/png/..."}
    )
    label_column: str | None = field(
        default=None, metadata={"help": "Label column; None detects label/labels/cls/..."}
    )
    num_labels: int | None = field(
        default=None,
        metadata={"help": "Number of classes when the labels carry no names (webdataset cls)."},
    )
    streaming: bool = field(
        default=False, metadata={"help": "Stream the dataset (needs --max_steps > 0)."}
    )
    shuffle_buffer_size: int = field(
        default=10_000, metadata={"help": "Examples in the streaming shuffle buffer."}
    )
    image_size: int | None = field(
        default=None,
        metadata={"help": "Crop size; None takes it from the image processor or model config."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only this many training examples."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep only this many eval examples."}
    )
    randaugment: str | None = field(
        default=None, metadata={"help": "RandAugment as 'm<magnitude>-n<num_ops>', e.g. m9-n2."}
    )
    mixup_alpha: float = field(
        default=0.0, metadata={"help": "Mixup Beta(alpha, alpha); 0 turns mixup off."}
    )
    mixup_prob: float = field(
        default=1.0, metadata={"help": "Probability that a batch is mixed when mixup is on."}
    )
    random_erasing: float = field(
        default=0.0, metadata={"help": "Probability of RandomErasing per training image."}
    )
    min_crop_scale: float | None = field(
        default=None,
        metadata={"help": "RandomResizedCrop min area scale; None = 0.08 (0.8 for digits)."},
    )
    hflip: bool | None = field(
        default=None,
        metadata={"help": "Random horizontal flips; None = on (off for the digits)."},
    )
    dataset_seed: int = field(
        default=0, metadata={"help": "Seed of splits, subsets, shuffles, mixup."}
    )

    def __post_init__(self) -> None:
        if not 0.0 < self.eval_fraction < 1.0:
            raise DataArgumentsError(
                f"eval_fraction={self.eval_fraction!r} must lie strictly between 0 and 1; "
                "use e.g. 0.1 to evaluate on a tenth of the training split."
            )
        for name in (
            "shuffle_buffer_size",
            "image_size",
            "max_train_samples",
            "max_eval_samples",
            "num_labels",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise DataArgumentsError(
                    f"{name}={value!r} must be a positive integer (or None for the default)."
                )
        if self.mixup_alpha < 0:
            raise DataArgumentsError(
                f"mixup_alpha={self.mixup_alpha!r} must be >= 0; use 0 to turn mixup off."
            )
        for name in ("mixup_prob", "random_erasing"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise DataArgumentsError(
                    f"{name}={value!r} is a probability: use a value in [0, 1]."
                )
        if self.min_crop_scale is not None and not 0.0 < self.min_crop_scale <= 1.0:
            raise DataArgumentsError(
                f"min_crop_scale={self.min_crop_scale!r} must lie in (0, 1]; 0.08 is the usual value."
            )
        if self.randaugment is not None:
            parse_randaugment(self.randaugment)

    @property
    def source(self) -> str:
        """The kind of source: ``"digits"``, ``"imagefolder"``, ``"webdataset"`` or ``"hub"``."""
        name = self.dataset_name
        if name == DIGITS or (name is None and self.data_dir is None):
            return DIGITS
        if name is None:
            return WEBDATASET if _tar_files(self.data_dir) else IMAGEFOLDER
        if name in (IMAGEFOLDER, WEBDATASET):
            if self.data_dir is None:
                raise DataArgumentsError(
                    f"dataset_name={name!r} reads local files: set data_dir to their root directory."
                )
            return name
        return "hub"


def require_max_steps(streaming: bool, max_steps: int) -> None:
    """Raise if a streaming dataset would be trained without ``max_steps``.

    A streamed dataset has no length, so the Trainer cannot derive the number of steps from
    ``num_train_epochs``; it needs ``max_steps > 0``. Call this at setup, before the first step.
    """
    if streaming and (max_steps is None or max_steps <= 0):
        raise DataArgumentsError(
            f"streaming=True needs max_steps > 0, got max_steps={max_steps!r}: a streamed dataset "
            "has no length. Set --max_steps (e.g. epochs * examples / global batch size) or "
            "turn streaming off."
        )


def parse_randaugment(spec: str) -> tuple[int, int]:
    """Parse ``"m15-n2"`` (or timm's ``"rand-m9-n2"``) into ``(magnitude, num_ops)``.

    The magnitude is torchvision's, 0..30 (``num_magnitude_bins=31``); ``num_ops`` defaults to 2
    when only the magnitude is given.
    """
    tokens = [t for t in spec.strip().lower().split("-") if t]
    if tokens and tokens[0] == "rand":
        tokens = tokens[1:]
    magnitude, num_ops = None, 2
    for token in tokens:
        match = re.fullmatch(r"([mn])(\d+)", token)
        if match is None:
            raise DataArgumentsError(
                f"randaugment={spec!r}: cannot read {token!r}; write 'm<magnitude>-n<num_ops>', "
                "e.g. 'm9-n2'."
            )
        if match.group(1) == "m":
            magnitude = int(match.group(2))
        else:
            num_ops = int(match.group(2))
    if magnitude is None:
        raise DataArgumentsError(
            f"randaugment={spec!r} has no magnitude; write 'm<magnitude>-n<num_ops>', e.g. 'm9-n2'."
        )
    if not 0 <= magnitude <= 30:
        raise DataArgumentsError(
            f"randaugment={spec!r}: magnitude {magnitude} is outside torchvision's 0..30."
        )
    if num_ops < 1:
        raise DataArgumentsError(f"randaugment={spec!r}: num_ops must be at least 1.")
    return magnitude, num_ops


# --------------------------------------------------------------------------------------------
# Datasets


def load_digits_dataset(seed: int = 0, image_size: int = 32, eval_size: int = 300):
    """The embedded default: scikit-learn's handwritten digits as a `datasets.DatasetDict`.

    Returns splits ``"train"`` (1797 - eval_size images) and ``"validation"`` (eval_size images),
    stratified by class and seeded. Columns: ``image`` (RGB `PIL.Image`, the 8x8 grey digit
    upscaled bilinearly to ``image_size`` square, ink white on black) and ``label``
    (`datasets.ClassLabel` with names ``"0"`` .. ``"9"``). Needs no network.
    """
    import datasets
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    index = np.arange(len(labels))
    train_idx, eval_idx = train_test_split(
        index, test_size=eval_size, random_state=seed, stratify=labels
    )
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])}
    )

    def split(idx: np.ndarray):
        images = [
            Image.fromarray(pixels[i], mode="L")
            .resize((image_size, image_size), Image.Resampling.BILINEAR)
            .convert("RGB")
            for i in idx
        ]
        return datasets.Dataset.from_dict(
            {"image": images, "label": labels[idx].tolist()}, features=features
        )

    return datasets.DatasetDict({"train": split(train_idx), "validation": split(eval_idx)})


def load_image_dataset(args: DataArguments):
    """Load the training and evaluation data that ``args`` describes.

    Returns ``(train, eval, label_names)``: two `datasets.Dataset` (or, with ``streaming``,
    `datasets.IterableDataset`) still holding the raw image and label columns (apply
    `with_transforms`), and the class names, or ``None`` when the labels carry none and
    ``num_labels`` is unset.

    The streamed training set is shuffled with ``shuffle_buffer_size`` and ``dataset_seed``; the
    Trainer calls its ``set_epoch`` so each epoch has another order, and shards it across ranks itself
    (no ``split_dataset_by_node`` here). Map-style training data is left unshuffled (the Trainer's
    sampler shuffles) except to pick ``max_train_samples``.
    """
    import datasets

    source = args.source
    if source == DIGITS:
        dd = load_digits_dataset(seed=args.dataset_seed)
        train, evaluation = dd["train"], dd["validation"]
        if args.streaming:
            train = train.to_iterable_dataset(num_shards=4)
            evaluation = evaluation.to_iterable_dataset(num_shards=1)
    else:
        if source == IMAGEFOLDER:
            path, kwargs = IMAGEFOLDER, {"data_dir": args.data_dir}
        elif source == WEBDATASET:
            path, kwargs = WEBDATASET, {"data_files": _webdataset_files(args)}
        else:
            path, kwargs = args.dataset_name, {}

        def load(split: str):
            return datasets.load_dataset(
                path, args.dataset_config, split=split, streaming=args.streaming, **kwargs
            )

        train = load(args.train_split)
        try:
            evaluation = load(args.eval_split)
        except ValueError as err:
            if "split" not in str(err).lower():
                raise
            train, evaluation = _carve_eval(train, args)

    image_column, label_column = resolve_columns(train, args.image_column, args.label_column)
    label_names = _label_names(train, label_column, args.num_labels)

    if args.streaming:
        if args.max_train_samples is not None:
            train = train.take(args.max_train_samples)
        if args.max_eval_samples is not None:
            evaluation = evaluation.take(args.max_eval_samples)
        train = train.shuffle(seed=args.dataset_seed, buffer_size=args.shuffle_buffer_size)
    else:
        if args.max_train_samples is not None:
            train = _subset(train, args.max_train_samples, args.dataset_seed)
        if args.max_eval_samples is not None:
            evaluation = _subset(evaluation, args.max_eval_samples, args.dataset_seed)
    return train, evaluation, label_names


def resolve_columns(
    dataset, image_column: str | None = None, label_column: str | None = None
) -> tuple[str, str]:
    """Return the ``(image_column, label_column)`` of ``dataset``, detecting those left ``None``.

    Detection takes the first of `IMAGE_COLUMNS` / `LABEL_COLUMNS` present. Raises
    `DataArgumentsError` naming the columns found when a column is missing.
    """
    columns = dataset.column_names
    if columns is None:  # a streamed dataset without features: look at one example
        columns = list(next(iter(dataset)).keys())
    resolved = []
    for field_name, value, candidates in (
        ("image_column", image_column, IMAGE_COLUMNS),
        ("label_column", label_column, LABEL_COLUMNS),
    ):
        if value is None:
            value = next((c for c in candidates if c in columns), None)
            if value is None:
                raise DataArgumentsError(
                    f"{field_name} is None and none of {list(candidates)} is a column of the "
                    f"dataset (columns: {columns}); set {field_name} to one of its columns."
                )
        elif value not in columns:
            raise DataArgumentsError(
                f"{field_name}={value!r} is not a column of the dataset (columns: {columns}); "
                f"set {field_name} to one of them, or None to detect it."
            )
        resolved.append(value)
    return resolved[0], resolved[1]


def _label_names(dataset, label_column: str, num_labels: int | None) -> list[str] | None:
    features = getattr(dataset, "features", None) or {}
    feature = features.get(label_column)
    names = getattr(feature, "names", None)
    if names:
        return list(names)
    if num_labels is not None:
        return [str(i) for i in range(num_labels)]
    return None


def _subset(dataset, n: int, seed: int):
    """A seeded random subset of ``n`` rows (imagefolder rows come sorted by class)."""
    if n >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(n)).flatten_indices()


def _carve_eval(train, args: DataArguments):
    """Split ``eval_fraction`` of ``train`` off as the eval set, deterministically."""
    import datasets

    if isinstance(train, datasets.IterableDataset):
        salt = str(args.dataset_seed).encode()
        threshold = int(args.eval_fraction * 2**32)
        image_column = args.image_column or resolve_columns(train)[0]

        def in_eval(example: dict) -> bool:
            return _example_hash(example, image_column, salt) < threshold

        return train.filter(lambda ex: not in_eval(ex)), train.filter(in_eval)
    label_column = resolve_columns(train, args.image_column, args.label_column)[1]
    stratify = (
        label_column if isinstance(train.features[label_column], datasets.ClassLabel) else None
    )
    parts = train.train_test_split(
        test_size=args.eval_fraction, seed=args.dataset_seed, stratify_by_column=stratify
    )
    return parts["train"], parts["test"]


def _example_hash(example: Mapping[str, Any], image_column: str, salt: bytes) -> int:
    """A 32-bit hash of an example's identity: its webdataset key, else its image's bytes."""
    key = example.get("__key__")
    if key is not None:
        data = str(key).encode()
    else:
        image = example[image_column]
        if isinstance(image, Mapping):
            data = image.get("bytes") or str(image.get("path")).encode()
        elif hasattr(image, "tobytes"):
            data = image.tobytes()
        else:
            data = bytes(image)
    return int.from_bytes(hashlib.blake2b(data, digest_size=4, key=salt).digest(), "big")


def _tar_files(data_dir: str) -> list[str]:
    if not os.path.isdir(data_dir):
        raise DataArgumentsError(
            f"data_dir={data_dir!r} is not a directory; point it at the imagefolder root or the "
            "directory holding the .tar shards."
        )
    return sorted(str(p) for p in Path(data_dir).rglob("*.tar"))


def _webdataset_files(args: DataArguments) -> dict[str, list[str]]:
    """Shards under ``data_dir`` by split, from their names (``imagenet1k-train-0000.tar``).

    A file belongs to a split when the split name (or an alias such as ``val``) appears in its
    name between separators; when no file names a split, every shard is training data.
    """
    files = _tar_files(args.data_dir)
    if not files:
        raise DataArgumentsError(
            f"data_dir={args.data_dir!r} holds no .tar shards; write webdataset shards there "
            "(<key>.jpg + <key>.cls members) or use dataset_name='imagefolder'."
        )
    by_split: dict[str, list[str]] = {}
    for split in dict.fromkeys((args.train_split, args.eval_split)):
        aliases = _SPLIT_ALIASES.get(split, (split,))
        pattern = re.compile(r"(^|[-._/])(" + "|".join(map(re.escape, aliases)) + r")([-._/0-9]|$)")
        matched = [f for f in files if pattern.search(os.path.relpath(f, args.data_dir))]
        if matched:
            by_split[split] = matched
    if not by_split:
        by_split[args.train_split] = files
    elif args.train_split not in by_split:
        raise DataArgumentsError(
            f"train_split={args.train_split!r}: no shard under data_dir={args.data_dir!r} has it "
            f"in its name (splits found: {list(by_split)}); rename the shards or set train_split."
        )
    return by_split


# --------------------------------------------------------------------------------------------
# Transforms


def normalization_from(
    source: Any = None,
) -> tuple[tuple[float, ...], tuple[float, ...], int | None]:
    """``(mean, std, size)`` read from an image processor or a model config.

    Reads ``image_mean`` / ``image_std`` and ``crop_size`` or ``size`` (an int, or a dict with
    ``height`` or ``shortest_edge``) of an image processor; ``image_size`` of a model config;
    ``pretrained_cfg`` (``mean``, ``std``, ``input_size``) of a timm wrapper config. What is missing
    falls back to the ImageNet mean/std and a size of ``None``.
    """
    mean = getattr(source, "image_mean", None)
    std = getattr(source, "image_std", None)
    size = _edge(getattr(source, "crop_size", None)) or _edge(getattr(source, "size", None))
    if size is None:
        size = _edge(getattr(source, "image_size", None))
    pretrained = getattr(source, "pretrained_cfg", None)
    if isinstance(pretrained, Mapping):
        mean = mean or pretrained.get("mean")
        std = std or pretrained.get("std")
        input_size = pretrained.get("input_size")
        if size is None and input_size:
            size = int(input_size[-1])
    mean = tuple(float(v) for v in (mean or IMAGENET_MEAN))
    std = tuple(float(v) for v in (std or IMAGENET_STD))
    return mean, std, size


def _edge(size: Any) -> int | None:
    if size is None:
        return None
    if isinstance(size, int):
        return size
    if isinstance(size, Sequence) and not isinstance(size, str):
        return int(size[-1]) if size else None
    for key in ("height", "shortest_edge"):
        value = size.get(key) if isinstance(size, Mapping) else getattr(size, key, None)
        if value:
            return int(value)
    return None


def build_transforms(
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    train: bool = True,
    randaugment: str | None = None,
    *,
    min_crop_scale: float = 0.08,
    hflip: bool = True,
    random_erasing: float = 0.0,
) -> Callable:
    """A torchvision transform from a PIL image to a normalized float tensor ``[3, size, size]``.

    Training: RandomResizedCrop(scale=(min_crop_scale, 1)) -> horizontal flip (if ``hflip``) ->
    RandAugment (``randaugment`` as in `parse_randaugment`) -> ToTensor -> Normalize ->
    RandomErasing (if ``random_erasing`` > 0). Evaluation: Resize(int(size / 0.875)) ->
    CenterCrop(size) -> ToTensor -> Normalize. Any image mode (L, P, CMYK, RGBA) is converted to
    RGB first.
    """
    from torchvision import transforms as T

    steps: list[Callable] = [_to_rgb]
    if train:
        steps.append(T.RandomResizedCrop(image_size, scale=(min_crop_scale, 1.0), antialias=True))
        if hflip:
            steps.append(T.RandomHorizontalFlip())
        if randaugment:
            magnitude, num_ops = parse_randaugment(randaugment)
            steps.append(T.RandAugment(num_ops=num_ops, magnitude=magnitude))
    else:
        steps += [
            T.Resize(int(image_size / EVAL_CROP_RATIO), antialias=True),
            T.CenterCrop(image_size),
        ]
    steps += [T.ToTensor(), T.Normalize(mean=list(mean), std=list(std))]
    if train and random_erasing > 0:
        steps.append(T.RandomErasing(p=random_erasing))
    return T.Compose(steps)


def _to_rgb(image):
    return image if image.mode == "RGB" else image.convert("RGB")


def transforms_from_args(args: DataArguments, source: Any = None) -> tuple[Callable, Callable]:
    """``(train_transform, eval_transform)`` for ``args``, normalized as ``source`` expects.

    ``source`` is an image processor or model config (see `normalization_from`); ``args.image_size``
    wins over its size; the fallback is 224 (32 for the digits).
    """
    mean, std, size = normalization_from(source)
    digits = args.source == DIGITS
    size = args.image_size or size or (32 if digits else DEFAULT_IMAGE_SIZE)
    min_scale = args.min_crop_scale or (0.8 if digits else 0.08)
    hflip = (not digits) if args.hflip is None else args.hflip
    train_tf = build_transforms(
        size,
        mean,
        std,
        train=True,
        randaugment=args.randaugment,
        min_crop_scale=min_scale,
        hflip=hflip,
        random_erasing=args.random_erasing,
    )
    return train_tf, build_transforms(size, mean, std, train=False)


def with_transforms(dataset, transform: Callable, image_column: str, label_column: str):
    """Attach ``transform`` so that examples carry ``pixel_values`` and ``labels``.

    ``pixel_values`` is ``transform(image)`` (a float tensor ``[C, H, W]``), ``labels`` the int
    label; the raw image and label columns are dropped, other columns pass through. Map-style
    datasets get an on-the-fly `datasets.Dataset.with_transform` (nothing is written to disk: pass
    ``remove_unused_columns=False`` to the Trainer, or it drops the raw image column before the
    transform sees it); streamed datasets get a lazy ``.map``.
    """
    import datasets

    if isinstance(dataset, datasets.IterableDataset):

        def one(example: dict) -> dict:
            return {
                "pixel_values": transform(example[image_column]),
                "labels": int(example[label_column]),
            }

        return dataset.map(one, remove_columns=[image_column, label_column])

    def batch(examples: dict) -> dict:
        out = {k: v for k, v in examples.items() if k not in (image_column, label_column)}
        out["pixel_values"] = [transform(image) for image in examples[image_column]]
        out["labels"] = [int(label) for label in examples[label_column]]
        return out

    return dataset.with_transform(batch)


def prepare_image_datasets(args: DataArguments, source: Any = None):
    """`load_image_dataset` + `transforms_from_args` + `with_transforms` in one call.

    Returns ``(train, eval, label_names)`` ready for the Trainer with `collate_fn` or
    `MixupCollator`.
    """
    train, evaluation, label_names = load_image_dataset(args)
    image_column, label_column = resolve_columns(train, args.image_column, args.label_column)
    train_tf, eval_tf = transforms_from_args(args, source)
    return (
        with_transforms(train, train_tf, image_column, label_column),
        with_transforms(evaluation, eval_tf, image_column, label_column),
        label_names,
    )


# --------------------------------------------------------------------------------------------
# Collators


def collate_fn(examples: Iterable[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack examples into ``{"pixel_values": [B, C, H, W] float, "labels": [B] int64}``."""
    examples = list(examples)
    return {
        "pixel_values": torch.stack([torch.as_tensor(e["pixel_values"]) for e in examples]),
        "labels": torch.tensor([int(e["labels"]) for e in examples], dtype=torch.long),
    }


class MixupCollator:
    """Collate and mix a batch: ``x = lam * x + (1 - lam) * x.flip(0)``, labels likewise.

    ``labels`` come back as soft targets, float ``[B, num_classes]`` rows summing to 1, with
    ``lam ~ Beta(alpha, alpha)`` drawn per batch from a numpy generator seeded with ``seed`` (the
    batch is mixed with its own reverse, as timm does; the sampler has already shuffled it). With
    probability ``1 - prob`` a batch is not mixed but its labels are still one-hot floats, so the
    label dtype never changes between batches.

    Contract with the model: Hugging Face image classifiers pick their loss from
    ``config.problem_type``, set once on the first batch. Float labels of shape ``[B, C]`` select
    ``"multi_label_classification"``, i.e. ``BCEWithLogitsLoss`` (the paper's "BCE loss"). Set
    ``model.config.problem_type = "multi_label_classification"`` before training, and evaluate
    with `eval_collator` (one-hot, never mixed): the Trainer uses a single ``data_collator`` for
    training and evaluation, so an evaluation through this collator would score mixed images,
    and int labels after float ones would break the BCE loss.
    """

    def __init__(self, alpha: float, num_classes: int, prob: float = 1.0, seed: int = 0):
        if alpha <= 0:
            raise DataArgumentsError(
                f"MixupCollator alpha={alpha!r} must be > 0; use collate_fn when mixup is off."
            )
        if num_classes < 2:
            raise DataArgumentsError(f"MixupCollator num_classes={num_classes!r} must be >= 2.")
        if not 0.0 <= prob <= 1.0:
            raise DataArgumentsError(f"MixupCollator prob={prob!r} is a probability in [0, 1].")
        self.alpha = alpha
        self.num_classes = num_classes
        self.prob = prob
        self.rng = np.random.default_rng(seed)

    def one_hot(self, labels: torch.Tensor) -> torch.Tensor:
        """Float one-hot rows ``[B, num_classes]`` for int ``labels``."""
        return torch.nn.functional.one_hot(labels, self.num_classes).float()

    def __call__(self, examples: Iterable[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch = collate_fn(examples)
        x, y = batch["pixel_values"], self.one_hot(batch["labels"])
        if self.rng.random() < self.prob:
            lam = float(self.rng.beta(self.alpha, self.alpha))
            x = lam * x + (1.0 - lam) * x.flip(0)
            y = lam * y + (1.0 - lam) * y.flip(0)
        return {"pixel_values": x, "labels": y}

    def eval_collator(self) -> Callable[[Iterable[Mapping[str, Any]]], dict[str, torch.Tensor]]:
        """A collator with one-hot float labels and no mixing, for evaluation."""

        def collate(examples: Iterable[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
            batch = collate_fn(examples)
            return {"pixel_values": batch["pixel_values"], "labels": self.one_hot(batch["labels"])}

        return collate


# --------------------------------------------------------------------------------------------
# Metrics


def metric_path(name: str) -> str:
    """The path of a shipped metric module (``"accuracy"``, ``"top5"``), or ``name`` itself."""
    filename = SHIPPED_METRICS.get(name)
    return str(METRICS_DIR / filename) if filename else name


def make_compute_metrics(
    names: Sequence[str] = ("accuracy", "top5"),
) -> Callable[[Any], dict[str, float]]:
    """The Trainer's ``compute_metrics`` built from `evaluate` modules.

    ``"accuracy"`` and ``"top5"`` load the modules shipped in ``nmsparse_hf/metrics/`` by path
    (offline); any other name or path goes to ``evaluate.load`` as is (a Hub metric needs the
    Hub). The returned function takes an `EvalPrediction`: ``predictions`` are logits ``[N, C]``
    (the first element if a tuple), ``label_ids`` ints ``[N]`` or soft labels ``[N, C]`` (mixup),
    which are reduced by argmax. It returns ``{metric_name: value}``; the top-5 metric gets the
    five best classes by logit.
    """
    import evaluate

    metrics = {name: evaluate.load(metric_path(name), keep_in_memory=True) for name in names}

    def compute_metrics(eval_pred) -> dict[str, float]:
        logits = eval_pred.predictions
        if isinstance(logits, tuple | list):
            logits = logits[0]
        logits = np.asarray(logits)
        labels = np.asarray(eval_pred.label_ids)
        if labels.ndim == 2:
            labels = labels.argmax(axis=-1)
        labels = labels.astype(np.int64)
        results: dict[str, float] = {}
        for name, metric in metrics.items():
            if SHIPPED_METRICS.get(name) == "top5_accuracy.py":
                k = min(5, logits.shape[-1])
                ranked = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
                out = metric.compute(predictions=ranked.tolist(), references=labels.tolist(), k=k)
            else:
                out = metric.compute(predictions=logits.argmax(axis=-1), references=labels)
            results.update({key: float(value) for key, value in out.items()})
        return results

    return compute_metrics
