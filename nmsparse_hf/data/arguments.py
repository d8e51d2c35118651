"""Data arguments: where the images come from and how they are augmented (`DataArguments`).

Parsed by `transformers.HfArgumentParser` next to the training arguments; every check here runs
when the arguments are parsed, before any data is read."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import NMSparsityError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224
EVAL_CROP_RATIO = 0.875

DIGITS = "digits"
IMAGEFOLDER = "imagefolder"
WEBDATASET = "webdataset"

IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "webp", "pixel_values")
LABEL_COLUMNS = ("label", "labels", "cls", "class", "target")

MIXUP_MODES = ("batch", "pair", "elem")
ERASING_MODES = ("const", "rand", "pixel")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "box", "hamming", "lanczos")
BAD_IMAGE_POLICIES = ("fail", "skip")
# timm auto_augment policies other than RandAugment, passed to timm as they are
TIMM_AUTO_AUGMENT_PREFIXES = ("augmix", "original", "originalr", "v0", "v0r", "3a", "trivial")

SPLIT_ALIASES = {"validation": ("validation", "valid", "val", "dev"), "test": ("test", "eval")}


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
        num_labels: number of classes (at least 2) when the label column carries no class names
            (webdataset ``cls`` integers); when it does, ``num_labels`` must equal their number.
        streaming: stream the data (`datasets.IterableDataset`); the Trainer then needs
            ``max_steps > 0`` (see `require_max_steps`).
        shuffle_buffer_size: examples held by the streaming shuffle buffer.
        image_size: side of the square training/eval crop; ``None`` takes it from the image
            processor or the model config (`normalization_from`).
        max_train_samples / max_eval_samples: keep only this many examples (a seeded random subset
            for map-style data, the first ones of the stream otherwise).
        randaugment: timm's RandAugment. ``"m<magnitude>-n<num_ops>"`` is timm's
            ``"rand-m<magnitude>-n<num_ops>-p1-mstd0"`` (every chosen op applied, fixed magnitude;
            timm's scale: 10 is full strength, larger values are clipped to 10); any timm
            ``auto_augment`` string (``"rand-m9-n2-mstd0.5"``, ``"augmix-m5"``, ``"original"``)
            is used as timm reads it. ``None`` for none. Seed/timm key: ``aa``.
        mixup_alpha / cutmix_alpha: Beta(alpha, alpha) of mixup / cutmix (timm's `Mixup`); ``0``
            turns each off. timm keys: ``mixup``, ``cutmix``.
        cutmix_minmax: cutmix box size bounds as a fraction of the image (forces cutmix on).
        mixup_prob: probability that a batch is mixed (mixup or cutmix).
        mixup_switch_prob: probability of cutmix instead of mixup when both are on.
        mixup_mode: ``batch`` (one draw per batch), ``pair`` or ``elem`` (per pair / element).
        random_erasing / random_erasing_mode / random_erasing_count: timm's RandomErasing
            probability, mode (``const``, ``rand``, ``pixel``) and count (timm: ``reprob``,
            ``remode``, ``recount``).
        color_jitter: timm's colour-jitter strength; ``None`` (or 0) = off. timm turns it off
            when ``randaugment`` is set, as here.
        interpolation / train_interpolation: resize interpolation of the evaluation / training
            transform (``bilinear``, ``bicubic``, ``nearest``; ``random`` for training draws
            bilinear or bicubic per image, as timm does). ``interpolation=None`` takes the timm
            model's default (its ``pretrained_cfg``), else bilinear.
        crop_pct: evaluation crop: resize to ``size / crop_pct``, centre-crop ``size``
            (``None`` = the timm model's default, else 0.875).
        crop_scale / crop_ratio: RandomResizedCrop area scale and aspect-ratio ranges (timm:
            ``scale``, ``ratio``); ``crop_scale=None`` = ``(min_crop_scale, 1)``.
        min_crop_scale: lower bound of RandomResizedCrop's area scale; ``None`` = 0.08 for natural
            images, 0.8 for the digits (a tenth of a digit is not a digit).
        hflip / vflip: horizontal / vertical flip probability (``true`` = 0.5); ``hflip=None`` =
            0.5 for natural images, 0 for the digits (a mirrored 2 is not a 2).
        bad_images: what an unreadable image does. ``fail`` (default): local image files are
            checked before training and every bad one is reported by path; an image that still
            fails to decode later stops the run naming its path. ``skip``: bad images are left
            out (each replaced by the next readable example) and counted in a warning at the end.
        dataset_seed: seed of every random choice made here (splits, subsets, shuffles); the
            augmentation and mixing draws are keyed by it together with the run's ``seed`` (which
            `transformers.TrainingArguments` has; one parser reads both).
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
        default=None,
        metadata={
            "help": "timm RandAugment: 'm<magnitude>-n<num_ops>' (= timm rand-mM-nN-p1-mstd0) or "
            "any timm auto_augment string, e.g. rand-m9-n2-mstd0.5."
        },
    )
    mixup_alpha: float = field(
        default=0.0, metadata={"help": "Mixup Beta(alpha, alpha); 0 turns mixup off."}
    )
    cutmix_alpha: float = field(
        default=0.0, metadata={"help": "CutMix Beta(alpha, alpha); 0 turns cutmix off."}
    )
    cutmix_minmax: list[float] | None = field(
        default=None, metadata={"help": "CutMix box bounds (min max fraction); forces cutmix on."}
    )
    mixup_prob: float = field(
        default=1.0, metadata={"help": "Probability that a batch is mixed (mixup or cutmix)."}
    )
    mixup_switch_prob: float = field(
        default=0.5, metadata={"help": "Probability of cutmix instead of mixup when both are on."}
    )
    mixup_mode: str = field(
        default="batch", metadata={"help": "batch | pair | elem: how mixing draws are shared."}
    )
    random_erasing: float = field(
        default=0.0, metadata={"help": "Probability of timm's RandomErasing per training image."}
    )
    random_erasing_mode: str = field(
        default="pixel", metadata={"help": "RandomErasing fill: const | rand | pixel."}
    )
    random_erasing_count: int = field(
        default=1, metadata={"help": "Maximum number of erased boxes per image."}
    )
    color_jitter: float | None = field(
        default=None,
        metadata={"help": "Colour jitter strength; None/0 = off (off with RandAugment)."},
    )
    interpolation: str | None = field(
        default=None,
        metadata={
            "help": "Evaluation resize interpolation; None = the model's (timm), else bilinear."
        },
    )
    train_interpolation: str = field(
        default="bilinear",
        metadata={"help": "Training crop interpolation; 'random' = bilinear or bicubic per image."},
    )
    crop_pct: float | None = field(
        default=None, metadata={"help": "Eval: resize to size/crop_pct, centre-crop; None = 0.875."}
    )
    crop_scale: list[float] | None = field(
        default=None,
        metadata={"help": "RandomResizedCrop area range (min max); None = min_crop_scale..1."},
    )
    crop_ratio: list[float] = field(
        default_factory=lambda: [3.0 / 4.0, 4.0 / 3.0],
        metadata={"help": "RandomResizedCrop aspect-ratio range (min max)."},
    )
    min_crop_scale: float | None = field(
        default=None,
        metadata={"help": "RandomResizedCrop min area scale; None = 0.08 (0.8 for digits)."},
    )
    hflip: float | None = field(
        default=None,
        metadata={"help": "Horizontal flip probability (true = 0.5); None = 0.5 (0 for digits)."},
    )
    vflip: float = field(default=0.0, metadata={"help": "Vertical flip probability."})
    bad_images: str = field(
        default="fail",
        metadata={
            "help": "fail: check local images before training, report bad ones by path; "
            "skip: leave them out and count them in a warning."
        },
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
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise DataArgumentsError(
                    f"{name}={value!r} must be a positive integer (or None for the default)."
                )
        if self.num_labels is not None and self.num_labels < 2:
            raise DataArgumentsError(
                f"num_labels={self.num_labels!r}: a classifier needs at least two classes (the "
                "image recipe does not train regression); leave it unset to read the classes "
                "from the labels."
            )
        self._check_augmentation()

    def _check_augmentation(self) -> None:
        for name in ("mixup_alpha", "cutmix_alpha"):
            if getattr(self, name) < 0:
                raise DataArgumentsError(
                    f"{name}={getattr(self, name)!r} must be >= 0; use 0 to turn "
                    f"{name.split('_')[0]} off."
                )
        for name in ("hflip", "vflip"):
            value = getattr(self, name)
            if isinstance(value, bool):  # `hflip: true` in a YAML file: timm's default 0.5
                setattr(self, name, 0.5 if value else 0.0)
        for name in ("mixup_prob", "mixup_switch_prob", "random_erasing", "hflip", "vflip"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise DataArgumentsError(
                    f"{name}={value!r} is a probability: use a value in [0, 1]."
                )
        self._check_crop()
        _check_choice("mixup_mode", self.mixup_mode, MIXUP_MODES)
        _check_choice("random_erasing_mode", self.random_erasing_mode, ERASING_MODES)
        if self.interpolation is not None:
            _check_choice("interpolation", self.interpolation, INTERPOLATIONS)
        _check_choice("train_interpolation", self.train_interpolation, (*INTERPOLATIONS, "random"))
        _check_choice("bad_images", self.bad_images, BAD_IMAGE_POLICIES)
        if self.randaugment is not None:
            parse_randaugment(self.randaugment)

    def _check_crop(self) -> None:
        if self.min_crop_scale is not None and not 0.0 < self.min_crop_scale <= 1.0:
            raise DataArgumentsError(
                f"min_crop_scale={self.min_crop_scale!r} must lie in (0, 1]; 0.08 is the usual value."
            )
        _check_range("crop_scale", self.crop_scale, upper=1.0)
        _check_range("crop_ratio", self.crop_ratio)
        _check_range("cutmix_minmax", self.cutmix_minmax, upper=1.0)
        if self.crop_scale is not None and self.min_crop_scale is not None:
            raise DataArgumentsError(
                f"crop_scale={self.crop_scale!r} and min_crop_scale={self.min_crop_scale!r} both "
                "set the crop's area range; keep one of them."
            )
        if self.crop_pct is not None and not 0.0 < self.crop_pct <= 1.0:
            raise DataArgumentsError(
                f"crop_pct={self.crop_pct!r} must lie in (0, 1]; 0.875 is the usual value."
            )
        if self.random_erasing_count < 1:
            raise DataArgumentsError(
                f"random_erasing_count={self.random_erasing_count!r} must be >= 1."
            )

    @property
    def mixing(self) -> bool:
        """True when batches are mixed (mixup or cutmix on, with a non-zero probability)."""
        cutmix = self.cutmix_alpha > 0 or self.cutmix_minmax is not None
        return (self.mixup_alpha > 0 or cutmix) and self.mixup_prob > 0

    @property
    def source(self) -> str:
        """The kind of source: ``"digits"``, ``"imagefolder"``, ``"webdataset"`` or ``"hub"``."""
        name = self.dataset_name
        if name == DIGITS or (name is None and self.data_dir is None):
            return DIGITS
        if name is None:
            return WEBDATASET if tar_files(self.data_dir) else IMAGEFOLDER
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


def _check_range(name: str, value, upper: float | None = None) -> None:
    if value is None:
        return
    ok = len(value) == 2 and 0 < value[0] <= value[1] and (upper is None or value[1] <= upper)
    if not ok:
        bound = f" and at most {upper}" if upper is not None else ""
        raise DataArgumentsError(
            f"{name}={list(value)!r} must be two numbers 0 < min <= max{bound}, e.g. 0.08 1.0."
        )


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise DataArgumentsError(f"{name}={value!r}: use one of {', '.join(choices)}.")


def parse_randaugment(spec: str) -> tuple[int, int]:
    """Check a RandAugment spec and return its ``(magnitude, num_ops)``.

    Our short spelling ``"m15-n2"`` (``m`` and ``n`` only, ``n`` defaults to 2) means timm's
    ``"rand-m15-n2-p1-mstd0"``: ``num_ops`` ops drawn per image, each applied, at a fixed
    magnitude on timm's scale (`timm_auto_augment`). A string starting with ``rand`` is timm's own
    spelling and may carry timm's other fields (``p``, ``mstd``, ``mmax``, ``inc``, ``w``); other
    timm policies (``augmix-m5``, ``original`` ...) are checked by timm and return ``(-1, -1)``.
    The magnitude must lie in 0..30 (timm clips it at 10, full strength).
    """
    text = spec.strip().lower()
    if text.startswith(TIMM_AUTO_AUGMENT_PREFIXES):
        return -1, -1
    tokens = [t for t in text.split("-") if t]
    timm_form = bool(tokens) and tokens[0] == "rand"
    if timm_form:
        tokens = tokens[1:]
    magnitude, num_ops = (10 if timm_form else None), 2
    for token in tokens:
        match = re.fullmatch(r"([mn])(\d+)", token)
        if match is None:
            if timm_form and re.fullmatch(r"(p|mstd|mmax|inc|w|t)[\w.]*", token):
                continue
            raise DataArgumentsError(
                f"randaugment={spec!r}: cannot read {token!r}; write 'm<magnitude>-n<num_ops>', "
                "e.g. 'm9-n2', or timm's full spelling such as 'rand-m9-n2-mstd0.5'."
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
            f"randaugment={spec!r}: magnitude {magnitude} is outside 0..30 (timm's scale: 10 is "
            "full strength, larger values are clipped to 10)."
        )
    if num_ops < 1:
        raise DataArgumentsError(f"randaugment={spec!r}: num_ops must be at least 1.")
    return magnitude, num_ops


def timm_auto_augment(spec: str | None) -> str | None:
    """The timm ``auto_augment`` string for a `DataArguments.randaugment` value.

    ``"m15-n2"`` -> ``"rand-m15-n2-p1-mstd0"``; timm spellings (``"rand-..."``, ``"augmix-..."``,
    ``"original"`` ...) pass through unchanged; ``None`` stays ``None``.
    """
    if spec is None:
        return None
    magnitude, num_ops = parse_randaugment(spec)
    text = spec.strip().lower()
    if text.startswith(("rand", *TIMM_AUTO_AUGMENT_PREFIXES)):
        return text
    return f"rand-m{magnitude}-n{num_ops}-p1-mstd0"


def tar_files(data_dir: str) -> list[str]:
    if not os.path.isdir(data_dir):
        raise DataArgumentsError(
            f"data_dir={data_dir!r} is not a directory; point it at the imagefolder root or the "
            "directory holding the .tar shards."
        )
    return sorted(str(p) for p in Path(data_dir).rglob("*.tar"))
