"""Image transforms: timm's training augmentation and resize + centre-crop evaluation transform
(`timm.data.create_transform`), normalised as the model's processor or config says."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .arguments import (
    DEFAULT_IMAGE_SIZE,
    DIGITS,
    EVAL_CROP_RATIO,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataArguments,
    timm_auto_augment,
)
from .images import to_8bit


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
    hflip: bool | float = True,
    random_erasing: float = 0.0,
    crop_scale: Sequence[float] | None = None,
    crop_ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
    vflip: float = 0.0,
    color_jitter: float | None = None,
    interpolation: str = "bilinear",
    train_interpolation: str = "bilinear",
    crop_pct: float | None = None,
    random_erasing_mode: str = "pixel",
    random_erasing_count: int = 1,
) -> Callable:
    """timm's transform (`timm.data.create_transform`) from a PIL image to a normalized float
    tensor ``[3, size, size]``, preceded by a conversion of any image mode (L, P, CMYK, RGBA) to RGB;
    16-bit and float images are first scaled to 8 bits (`images.to_8bit`: 16-bit / 257, float
    0..1 * 255).

    Training, in timm's order: RandomResizedCropAndInterpolation(``crop_scale`` (default
    ``(min_crop_scale, 1)``), ``crop_ratio``, ``train_interpolation``) -> horizontal flip with
    probability ``hflip`` (``True`` = 0.5) -> vertical flip (``vflip``) -> RandAugment
    (``randaugment``, see `timm_auto_augment`) or, without it, ColorJitter(``color_jitter``) ->
    ToTensor -> Normalize -> RandomErasing(``random_erasing``, ``random_erasing_mode``,
    ``random_erasing_count``). Evaluation: Resize(floor(size / crop_pct), ``interpolation``) ->
    CenterCrop(size) -> ToTensor -> Normalize, ``crop_pct`` defaulting to 0.875.

    The random draws come from Python's `random` and torch's global generator, as in timm; run the
    transform under `seeded_rng` to make them a function of the example (`AugmentedDataset`).
    """
    from timm.data import create_transform
    from torchvision import transforms as T

    if train:
        flip = (0.5 if hflip else 0.0) if isinstance(hflip, bool) else float(hflip)
        scale = tuple(crop_scale) if crop_scale is not None else (min_crop_scale, 1.0)
        tf = create_transform(
            image_size,
            is_training=True,
            scale=scale,
            ratio=tuple(crop_ratio),
            hflip=flip,
            vflip=vflip,
            color_jitter=color_jitter or None,
            auto_augment=timm_auto_augment(randaugment),
            interpolation=train_interpolation,
            mean=tuple(mean),
            std=tuple(std),
            re_prob=random_erasing,
            re_mode=random_erasing_mode,
            re_count=random_erasing_count,
        )
    else:
        tf = create_transform(
            image_size,
            is_training=False,
            interpolation=interpolation,
            mean=tuple(mean),
            std=tuple(std),
            crop_pct=crop_pct or EVAL_CROP_RATIO,
        )
    return T.Compose([_to_rgb, *tf.transforms])


def _to_rgb(image):
    return image if image.mode == "RGB" else to_8bit(image).convert("RGB")


def transforms_from_args(args: DataArguments, source: Any = None) -> tuple[Callable, Callable]:
    """``(train_transform, eval_transform)`` for ``args``, normalized as ``source`` expects.

    ``source`` is an image processor, a model config or a timm model (see `normalization_from`;
    a timm model's ``pretrained_cfg`` also gives the evaluation interpolation and crop_pct when
    ``args`` leaves them ``None``, as timm does); ``args.image_size`` wins over its size; the
    fallback is 224 (32 for the digits). The digits default to a crop
    keeping at least 80% of the area and no flips.
    """
    mean, std, size = normalization_from(source)
    interpolation, crop_pct = _timm_eval_defaults(source)
    digits = args.source == DIGITS
    size = args.image_size or size or (32 if digits else DEFAULT_IMAGE_SIZE)
    min_scale = args.min_crop_scale or (0.8 if digits else 0.08)
    hflip = (0.0 if digits else 0.5) if args.hflip is None else args.hflip
    train_tf = build_transforms(
        size,
        mean,
        std,
        train=True,
        randaugment=args.randaugment,
        min_crop_scale=min_scale,
        hflip=hflip,
        random_erasing=args.random_erasing,
        crop_scale=args.crop_scale,
        crop_ratio=args.crop_ratio,
        vflip=args.vflip,
        color_jitter=args.color_jitter,
        train_interpolation=args.train_interpolation,
        random_erasing_mode=args.random_erasing_mode,
        random_erasing_count=args.random_erasing_count,
    )
    eval_tf = build_transforms(
        size,
        mean,
        std,
        train=False,
        interpolation=args.interpolation or interpolation,
        crop_pct=args.crop_pct or crop_pct,
    )
    return train_tf, eval_tf


def _timm_eval_defaults(source: Any) -> tuple[str, float | None]:
    """``(interpolation, crop_pct)`` of a timm model's ``pretrained_cfg`` (what timm's
    ``resolve_data_config`` uses when a run does not set them), else ``("bilinear", None)``."""
    pretrained = getattr(source, "pretrained_cfg", None)
    if not isinstance(pretrained, Mapping):
        return "bilinear", None
    return pretrained.get("interpolation") or "bilinear", pretrained.get("crop_pct")


def with_transforms(dataset, transform: Callable, image_column: str, label_column: str):
    """Attach ``transform`` so that examples carry ``pixel_values`` and ``labels``.

    ``pixel_values`` is ``transform(image)`` (a float tensor ``[C, H, W]``), ``labels`` the int
    label; the raw image and label columns are dropped, other columns pass through. Map-style
    datasets get an on-the-fly `datasets.Dataset.with_transform` (nothing is written to disk: pass
    ``remove_unused_columns=False`` to the Trainer, or it drops the raw image column before the
    transform sees it); streamed datasets get a lazy ``.map``.
    """
    import datasets

    from .images import decode_image

    if isinstance(dataset, datasets.IterableDataset):

        def one(example: dict) -> dict:
            return {
                "pixel_values": transform(decode_image(example[image_column])),
                "labels": int(example[label_column]),
            }

        return dataset.map(one, remove_columns=[image_column, label_column])

    def batch(examples: dict) -> dict:
        out = {k: v for k, v in examples.items() if k not in (image_column, label_column)}
        out["pixel_values"] = [transform(decode_image(image)) for image in examples[image_column]]
        out["labels"] = [int(label) for label in examples[label_column]]
        return out

    return dataset.with_transform(batch)
