"""Image datasets for sparse training runs, behind one entry point (`load_image_dataset`).

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
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from .arguments import (
    DIGITS,
    IMAGE_COLUMNS,
    IMAGEFOLDER,
    LABEL_COLUMNS,
    SPLIT_ALIASES,
    WEBDATASET,
    DataArguments,
    DataArgumentsError,
    tar_files,
)
from .labels import check_eval_labels

logger = logging.getLogger(__name__)


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
    `pipeline.build_training_data` or `with_transforms`), and the class names, or ``None`` when
    the labels carry none and ``num_labels`` is unset. Streamed images come undecoded
    (``{"bytes", "path"}``, see `undecoded`).

    Raises `DataArgumentsError` (before any image is read) when a class folder of an imagefolder
    holds no image (`check_class_folders`), when ``num_labels`` disagrees with the classes the
    labels name, and, for map-style data, when the eval split has labels that no training example
    has (`labels.check_eval_labels`).

    The streamed training set is shuffled with ``shuffle_buffer_size`` and ``dataset_seed``; the
    Trainer calls its ``set_epoch`` so each epoch has another order, and shards it across ranks itself
    (no ``split_dataset_by_node`` here). Map-style training data is left unshuffled (the Trainer's
    sampler shuffles) except to pick ``max_train_samples``.
    """
    train, evaluation, eval_name = _load_splits(args)
    image_column, label_column = resolve_columns(train, args.image_column, args.label_column)
    label_names = _label_names(train, label_column, args.num_labels)
    if not args.streaming:  # a stream's labels are only known once it is read
        check_eval_labels(
            train.unique(label_column), evaluation.unique(label_column), eval_name, label_names
        )

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


def _load_splits(args: DataArguments):
    """``(train, eval, eval split's name)``, the raw splits; the eval split is carved out of train
    when there is none."""
    import datasets

    source = args.source
    if source == DIGITS:
        dd = load_digits_dataset(seed=args.dataset_seed)
        train, evaluation = dd["train"], dd["validation"]
        if args.streaming:
            train = undecoded(train.to_iterable_dataset(num_shards=4))
            evaluation = undecoded(evaluation.to_iterable_dataset(num_shards=1))
        return train, evaluation, "validation"
    if source == IMAGEFOLDER:
        check_class_folders(args.data_dir)
        path, kwargs = IMAGEFOLDER, {"data_dir": args.data_dir}
    elif source == WEBDATASET:
        path, kwargs = WEBDATASET, {"data_files": _webdataset_files(args)}
    else:
        path, kwargs = args.dataset_name, {}

    def load(split: str):
        dataset = datasets.load_dataset(
            path, args.dataset_config, split=split, streaming=args.streaming, **kwargs
        )
        return undecoded(dataset) if args.streaming else dataset

    train = load(args.train_split)
    try:
        return train, load(args.eval_split), repr(args.eval_split)
    except ValueError as err:
        if "split" not in str(err).lower():
            raise
    train, evaluation = _carve_eval(train, args)
    return train, evaluation, f"eval (carved out of {args.train_split!r})"


def check_class_folders(data_dir: str) -> None:
    """Raise `DataArgumentsError` naming every class folder of the imagefolder under
    ``data_dir`` that holds no image file (one with an extension `datasets` reads as an image).

    A class folder is a sub-folder beside one that holds images; `datasets` would silently drop
    an empty one, so the label set would lack that class. Hidden folders (``.name``) are skipped,
    as `datasets` skips them.
    """
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    extensions = tuple(e.lower() for e in ImageFolder.EXTENSIONS)
    root = os.path.normpath(data_dir)
    children: dict[str, list[str]] = {}
    direct: set[str] = set()  # folders holding an image file themselves
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        children[folder] = [os.path.join(folder, d) for d in subfolders]
        if any(f.lower().endswith(extensions) for f in files):
            direct.add(folder)
    below: set[str] = set()  # folders holding an image file themselves or in a sub-folder
    for folder in direct:
        while folder not in below and len(folder) >= len(root):
            below.add(folder)
            folder = os.path.dirname(folder)
    empty = [
        os.path.relpath(sub, root)
        for subs in children.values()
        if any(sub in direct for sub in subs)
        for sub in subs
        if sub not in below
    ]
    if empty:
        raise DataArgumentsError(
            f"data_dir={data_dir!r}: class folder(s) {sorted(empty)} hold no image, so the class "
            "would silently be missing from the labels; put its images there or delete the folder."
        )


def undecoded(dataset):
    """``dataset`` with its image columns left as ``{"bytes", "path"}`` (not decoded by `datasets`).

    Used for streamed data, whose every stage (carving, shuffling) would otherwise decode the
    images where a bad file fails without its name; `images.decode_image` decodes them later,
    naming the file when it cannot.
    """
    import datasets

    features = getattr(dataset, "features", None) or {}
    for name, feature in features.items():
        if isinstance(feature, datasets.Image) and feature.decode:
            dataset = dataset.cast_column(name, datasets.Image(decode=False))
    return dataset


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
    """The class names of the labels; ``num_labels`` must agree with them when they have names,
    and gives ``"0"`` .. ``"num_labels - 1"`` when they have none."""
    features = getattr(dataset, "features", None) or {}
    feature = features.get(label_column)
    names = getattr(feature, "names", None)
    if names and num_labels is not None and num_labels != len(names):
        shown = list(names) if len(names) <= 10 else [*names[:10], "..."]
        raise DataArgumentsError(
            f"num_labels={num_labels} disagrees with the {len(names)} classes of the data "
            f"{shown}; leave num_labels unset (the classes are read from the labels) or point "
            "data_dir / dataset_name at the data you mean."
        )
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
    split = dict(test_size=args.eval_fraction, seed=args.dataset_seed)
    try:
        parts = train.train_test_split(**split, stratify_by_column=stratify)
    except ValueError as err:
        if stratify is None:
            raise _too_small(train, args, err) from None
        # too few examples per class (or fewer eval examples than classes) to stratify
        logger.warning(
            "the eval split is carved out of %r without stratifying by class: %s (%d examples, "
            "eval_fraction=%g); give an eval split or more examples per class for a balanced one.",
            args.train_split,
            err,
            len(train),
            args.eval_fraction,
        )
        try:
            parts = train.train_test_split(**split)
        except ValueError as plain:
            raise _too_small(train, args, plain) from None
    return parts["train"], parts["test"]


def _too_small(train, args: DataArguments, err: Exception) -> DataArgumentsError:
    """The error of a split too small to carve an eval split from, with its sizes."""
    return DataArgumentsError(
        f"eval_fraction={args.eval_fraction:g} of the {len(train)} example(s) of split "
        f"{args.train_split!r} cannot be carved into an eval split ({err}); add examples, raise "
        "eval_fraction, or give an eval split."
    )


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


def _webdataset_files(args: DataArguments) -> dict[str, list[str]]:
    """Shards under ``data_dir`` by split, from their names (``imagenet1k-train-0000.tar``).

    A file belongs to a split when the split name (or an alias such as ``val``) appears in its
    name between separators; when no file names a split, every shard is training data.
    """
    files = tar_files(args.data_dir)
    if not files:
        raise DataArgumentsError(
            f"data_dir={args.data_dir!r} holds no .tar shards; write webdataset shards there "
            "(<key>.jpg + <key>.cls members) or use dataset_name='imagefolder'."
        )
    by_split: dict[str, list[str]] = {}
    for split in dict.fromkeys((args.train_split, args.eval_split)):
        aliases = SPLIT_ALIASES.get(split, (split,))
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
