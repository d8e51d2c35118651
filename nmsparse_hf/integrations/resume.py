"""Resuming a Trainer checkpoint safely: the sparsity settings it was trained with, whether it can
be read, and its weights stored under older module names.

* Every checkpoint `NMSparseTrainer` writes records the sparsity config of its run and the step in
  ``nm_sparsity_state.json`` (`write_sparsity_state`); resuming under other settings is refused
  before step 1, naming each differing field (`check_sparsity_state`).
* `last_readable_checkpoint` is ``resume_from_checkpoint=True``: the newest checkpoint whose
  weights open with safetensors and whose ``trainer_state.json`` parses; damaged ones are skipped
  with a warning naming them.
* `reload_if_keys_missing` works around transformers issue 43701 (the stock Trainer loads
  renamed ViT/Swin weights non-strictly and silently restarts from random weights).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.utils import logging

from ..config import NMSparsityConfig
from ..errors import NMCheckpointError, NMSparsityConfigError
from ..names import stored_under_other_names

logger = logging.get_logger(__name__)

SPARSITY_STATE = "nm_sparsity_state.json"
STATE_FORMAT = "nmsparse_hf-training-state/1"
TRAINER_STATE = "trainer_state.json"
FSDP_MODEL_NAME = "pytorch_model_fsdp"  # accelerate's name for FSDP model state in a checkpoint
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


# ---------------------------------------------------------------------------------- sparsity state
def write_sparsity_state(
    folder: str | os.PathLike, config: NMSparsityConfig, step: int, total_steps: int | None
) -> Path:
    """Record in ``folder/nm_sparsity_state.json`` the sparsity config a Trainer checkpoint was
    trained with, its optimizer step and the run length (the schedule is a function of both).
    Returns the file's path."""
    path = Path(folder) / SPARSITY_STATE
    state = {
        "format": STATE_FORMAT,
        "step": int(step),
        "total_steps": None if total_steps is None else int(total_steps),
        "config": config.to_dict(),
    }
    path.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    return path


def read_sparsity_state(checkpoint: str | os.PathLike) -> dict[str, Any] | None:
    """The ``nm_sparsity_state.json`` of a Trainer checkpoint (``step``, ``total_steps`` and
    ``config``, a validated `NMSparsityConfig`), or None when the checkpoint has none (written by
    a stock Trainer or an older nmsparse_hf).

    Raises:
        NMCheckpointError: the file exists but cannot be read as a sparsity state.
    """
    path = Path(checkpoint) / SPARSITY_STATE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        config = NMSparsityConfig.from_dict(data["config"])
        return {"step": int(data["step"]), "total_steps": data.get("total_steps"), "config": config}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise NMCheckpointError(
            f"{path}: cannot be read as the checkpoint's sparsity state ({exc}). Restore the "
            f"file, or resume from another checkpoint."
        ) from None


def config_differences(saved: NMSparsityConfig, current: NMSparsityConfig) -> list[str]:
    """``["n_keep: checkpoint 1, this run 2", ...]``, one entry per field that differs."""
    a, b = saved.to_dict(), current.to_dict()
    return [
        f"{key}: checkpoint {a.get(key)!r}, this run {b.get(key)!r}"
        for key in dict.fromkeys([*a, *b])
        if a.get(key) != b.get(key)
    ]


def check_sparsity_state(checkpoint: str | os.PathLike, config: NMSparsityConfig) -> bool:
    """Refuse to resume ``checkpoint`` under another sparsity config than the one it was trained
    with. Returns True when the checkpoint records its config (and it matches), False when it
    records none (a warning says it could not be checked).

    Raises:
        NMSparsityConfigError: the configs differ; the message names each differing field.
        NMCheckpointError: the recorded state cannot be read.
    """
    state = read_sparsity_state(checkpoint)
    if state is None:
        logger.warning(
            f"nmsparse_hf: {checkpoint} records no sparsity settings ({SPARSITY_STATE} is "
            f"missing); resuming without checking that they match this run's."
        )
        return False
    diffs = config_differences(state["config"], config)
    if diffs:
        raise NMSparsityConfigError(
            f"resume_from_checkpoint={str(checkpoint)!r} was trained with other sparsity "
            f"settings ({'; '.join(diffs)}). Resume with the checkpoint's settings, or start "
            f"a new run in another output_dir."
        )
    return True


# ---------------------------------------------------------------------------------- readability
def _fsdp_or_adapter(folder: Path) -> bool:
    """A checkpoint whose weights are not a model's safetensors: FSDP's own state dict
    (``pytorch_model_fsdp*``, read by torch.distributed.checkpoint) or a PEFT adapter."""
    return any(p.name.startswith(FSDP_MODEL_NAME) for p in folder.iterdir()) or (
        (folder / "adapter_model.safetensors").is_file()
        and not (folder / "model.safetensors").is_file()
    )


def checkpoint_problem(checkpoint: str | os.PathLike) -> str | None:
    """Why a Trainer checkpoint cannot be resumed (its safetensors weights are missing or do not
    open, `WeightFiles`; its ``trainer_state.json`` does not parse), naming the file; None when
    it is readable."""
    from ..export.weights import WeightFiles

    folder = Path(checkpoint)
    if not folder.is_dir():
        return f"{folder} is not a directory"
    if not _fsdp_or_adapter(folder):
        try:
            WeightFiles(folder)
        except NMCheckpointError as exc:
            return " ".join(str(exc).split()).rstrip(".")
    try:
        json.loads((folder / TRAINER_STATE).read_text(encoding="utf-8"))["global_step"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{folder / TRAINER_STATE} cannot be read ({type(exc).__name__}: {exc})"
    return None


def checkpoints_newest_first(output_dir: str | os.PathLike) -> list[Path]:
    """The ``checkpoint-N`` folders of ``output_dir``, highest N first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found, key=lambda item: item[0], reverse=True) if p.is_dir()]


def last_readable_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """``resume_from_checkpoint=True``: the newest ``checkpoint-N`` of ``output_dir`` that
    `checkpoint_problem` finds readable, or None when there is no checkpoint at all. Each newer
    damaged checkpoint is skipped with a warning naming it and why.

    Raises:
        NMCheckpointError: there are checkpoints but none is readable.
    """
    skipped = []
    for folder in checkpoints_newest_first(output_dir):
        problem = checkpoint_problem(folder)
        if problem is None:
            return str(folder)
        skipped.append(problem)
        logger.warning(f"nmsparse_hf: skipping damaged checkpoint {folder.name}: {problem}")
    if skipped:
        raise NMCheckpointError(
            f"resume_from_checkpoint=True: no checkpoint in {output_dir} can be read "
            f"({'; '.join(skipped)}). Pass a readable checkpoint, or start without resuming."
        )
    return None


# ---------------------------------------------------------------------------------- renamed keys
def _checkpoint_keys(path: str) -> set[str] | None:
    """The tensor names of the weight files ``from_pretrained`` loads from ``path``, or None when
    it holds no safetensors weights."""
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
    the renaming) and loaded into ``target``; one line is logged once every weight arrived.
    Returns True when a reload happened.

    Raises:
        RuntimeError: weights are still missing after the reload (never continue from random
            weights).
    """
    if not isinstance(target, PreTrainedModel):
        return False
    on_disk = _checkpoint_keys(checkpoint)
    expected = set(target.state_dict())
    if on_disk is None or not stored_under_other_names(target, on_disk):
        return False
    reloaded = type(target).from_pretrained(checkpoint, dtype=_dtype_of(target))
    result = target.load_state_dict(reloaded.state_dict(), strict=False)
    if result.missing_keys:
        raise RuntimeError(
            f"resuming from {checkpoint}: weights {result.missing_keys[:5]} are "
            f"missing from the checkpoint even after renaming; refusing to continue from "
            f"random weights."
        )
    logger.warning(
        f"nmsparse_hf: {checkpoint} stores {len(expected - on_disk)} weights under older module "
        f"names than the model (transformers issue 43701); reloading them through "
        f"from_pretrained restored all {len(expected)} tensors."
    )
    return True
