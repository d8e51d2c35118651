"""Collators: stack examples into batches (`collate_fn`) and mix them with `TimmMixCollator`
(timm's mixup/cutmix, with draws keyed by the batch's examples so that resume stays exact)."""

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
