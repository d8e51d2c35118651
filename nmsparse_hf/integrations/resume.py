"""Resuming a Trainer checkpoint whose weights are stored under older module names (transformers
issue 43701: the stock Trainer loads them non-strictly and silently restarts from random weights)."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel
from transformers.utils import logging

from ..names import stored_under_other_names

logger = logging.get_logger(__name__)


def _checkpoint_keys(path: str) -> set[str] | None:
    """The tensor names of the weight files ``from_pretrained`` loads from ``path``, or None when
    it holds no safetensors weights."""
    from ..errors import NMCheckpointError
    from ..export.weights import WeightFiles

    try:
        return set(WeightFiles(path).file_of)
    except NMCheckpointError:
        return None


def _dtype_of(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def reload_if_keys_missing(target: torch.nn.Module, checkpoint: str) -> bool:
    """After a stock ``Trainer`` load, make sure every weight of ``target`` really arrived.

    When the checkpoint's keys do not cover ``target``'s state_dict (weights written under their
    older module names), the checkpoint is read again through ``from_pretrained`` (which knows
    the renaming) and loaded into ``target``. Returns True when a reload happened.

    Raises:
        RuntimeError: weights are still missing after the reload (never continue from random
            weights).
    """
    if not isinstance(target, PreTrainedModel):
        return False
    on_disk = _checkpoint_keys(checkpoint)
    if on_disk is None or not stored_under_other_names(target, on_disk):
        return False
    logger.warning(
        f"nmsparse_hf: {checkpoint} stores weights under other module names than "
        f"the model (transformers issue 43701); reloading them through from_pretrained."
    )
    reloaded = type(target).from_pretrained(checkpoint, dtype=_dtype_of(target))
    result = target.load_state_dict(reloaded.state_dict(), strict=False)
    if result.missing_keys:
        raise RuntimeError(
            f"resuming from {checkpoint}: weights {result.missing_keys[:5]} are "
            f"missing from the checkpoint even after renaming; refusing to continue from "
            f"random weights."
        )
    return True
