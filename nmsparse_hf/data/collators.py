"""Collators: stack examples into batches (`collate_fn`) and mix them: `TimmMixCollator` (timm's
mixup/cutmix, resume-exact; used by the recipes) and `MixupCollator` (plain mixup from one
seeded stream)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch

from .arguments import DataArgumentsError


def collate_fn(examples: Iterable[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack examples into ``{"pixel_values": [B, C, H, W] float, "labels": [B] int64}``."""
    examples = list(examples)
    return {
        "pixel_values": torch.stack([torch.as_tensor(e["pixel_values"]) for e in examples]),
        "labels": torch.tensor([int(e["labels"]) for e in examples], dtype=torch.long),
    }


class MixupCollator:
    """Collate and mix a batch: ``x = lam * x + (1 - lam) * x.flip(0)``, labels likewise.

    Its draws come from one stream, so a run resumed mid-epoch draws differently; the recipes
    use `TimmMixCollator`, whose draws are keyed by the batch.

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


class TimmMixCollator:
    """Collate, then mix with timm's `timm.data.Mixup` (mixup, cutmix, label smoothing).

    Settings are timm's: ``mixup_alpha`` / ``cutmix_alpha`` (0 = off), ``cutmix_minmax``, ``prob``
    (that a batch is mixed), ``switch_prob`` (cutmix instead of mixup when both are on), ``mode``
    (``batch``, ``pair``, ``elem``) and ``label_smoothing``. ``labels`` come back as float soft
    targets ``[B, num_classes]`` (smoothed one-hot rows when a batch is not mixed), the targets of
    timm's BCE loss: set ``model.config.problem_type = "multi_label_classification"``.

    Resume-exact: the draws of a batch come from numpy's generator seeded with ``seed`` and the
    ``aug_key`` of its examples (set by `pipeline.AugmentedDataset`: a hash of seed, epoch and
    index), so they do not depend on how many batches were collated before. Examples without an
    ``aug_key`` are keyed by their pixels. timm mixes pairs, so an odd-sized batch mixes its first
    ``B - 1`` examples and leaves the last one unmixed.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        cutmix_minmax: list[float] | None = None,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        mode: str = "batch",
        label_smoothing: float = 0.0,
        seed: int = 0,
    ):
        from timm.data import Mixup

        if num_classes < 2:
            raise DataArgumentsError(f"TimmMixCollator num_classes={num_classes!r} must be >= 2.")
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.seed = seed
        active = mixup_alpha > 0 or cutmix_alpha > 0 or cutmix_minmax is not None
        self.mixup = None
        if active and prob > 0:
            self.mixup = Mixup(
                mixup_alpha=mixup_alpha,
                cutmix_alpha=cutmix_alpha,
                cutmix_minmax=cutmix_minmax,
                prob=prob,
                switch_prob=switch_prob,
                mode=mode,
                label_smoothing=label_smoothing,
                num_classes=num_classes,
            )

    def targets(self, labels: torch.Tensor, smoothing: float | None = None) -> torch.Tensor:
        """Float one-hot rows for int ``labels``, smoothed as timm does (off = s / C, on = 1 - s + off)."""
        from timm.data.mixup import one_hot

        s = self.label_smoothing if smoothing is None else smoothing
        off = s / self.num_classes
        return one_hot(labels, self.num_classes, on_value=1.0 - s + off, off_value=off)

    def batch_key(self, examples: list[Mapping[str, Any]], pixels: torch.Tensor) -> list[int]:
        """The numpy seed of a batch: ``seed`` and its examples' keys."""
        keys = [e.get("aug_key") for e in examples]
        if any(k is None for k in keys):
            digest = hashlib.blake2b(pixels.numpy().tobytes(), digest_size=8).digest()
            keys = [int.from_bytes(digest, "big")]
        data = ",".join(str(int(k)) for k in [self.seed, *keys]).encode()
        digest = hashlib.blake2b(data, digest_size=16).digest()
        return [int.from_bytes(digest[i : i + 4], "big") for i in range(0, 16, 4)]

    def __call__(self, examples: Iterable[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        examples = list(examples)
        batch = collate_fn(examples)
        x, labels = batch["pixel_values"], batch["labels"]
        if self.mixup is None or len(x) < 2:
            return {"pixel_values": x, "labels": self.targets(labels)}
        even = len(x) - len(x) % 2
        state = np.random.get_state()
        np.random.seed(self.batch_key(examples, x))
        try:
            _, y = self.mixup(x[:even], labels[:even])  # mixes x[:even] in place
        finally:
            np.random.set_state(state)
        if even < len(x):
            y = torch.cat([y, self.targets(labels[even:])])
        return {"pixel_values": x, "labels": y}

    def eval_collator(self) -> Callable[[Iterable[Mapping[str, Any]]], dict[str, torch.Tensor]]:
        """A collator with plain one-hot float labels and no mixing, for evaluation."""

        def collate(examples: Iterable[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
            batch = collate_fn(examples)
            return {
                "pixel_values": batch["pixel_values"],
                "labels": self.targets(batch["labels"], smoothing=0.0),
            }

        return collate
