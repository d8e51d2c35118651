"""The sparse model of a step of training, written without touching the training weights.

Trainer checkpoints hold the dense master weights (resuming needs them); what the run evaluates at
a step is the model with its masks applied. `save_sparse_snapshot` bakes the target masks into a
copy of the model (exactly what ``finalize`` would produce at that step) and writes it through
the one save path, `save_sparse_pretrained`: verified, with metadata and card. `NMSparseTrainer`
uses it for every push during training; `export_checkpoint` (``nmsparse export``) does the same
for a ``checkpoint-N`` folder on disk, and `write_checkpoint_readme` tells whoever opens such a
folder what it holds and how to get the sparse model.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import NMSparsityConfig
from ..errors import NMCheckpointError
from ..schedule import SparsitySchedule
from ..sparsifier import ATTR, NMSparsifier
from .resume import SPARSITY_STATE, TRAINER_STATE, checkpoint_problem, read_sparsity_state

CHECKPOINT_README = """\
# Training checkpoint, step {step}: dense master weights, not the sparse model

This folder is a Trainer checkpoint of an N:M-sparse training run (nmsparse_hf, {recipe}).
`model.safetensors` holds the **dense master weights** of optimizer step {step}: the weights the
optimizer updates, with the pruned entries still carrying values. Loaded as it is (with
`from_pretrained` or `pipeline()`), it is a dense model that gives other results than the
evaluation logged at this step, which ran with the masks applied.

Get the sparse model of this step (the target masks applied to these weights, verified, with its
model card):

    nmsparse export {folder} OUT_DIR

Continue training from here with `resume_from_checkpoint` (the sparsity settings of the run are
recorded in `{state}` and checked on resume).
"""


def write_checkpoint_readme(folder: str | os.PathLike, step: int, config: NMSparsityConfig) -> Path:
    """Write ``README.md`` into a Trainer checkpoint: it holds the dense master weights of step
    ``step``, and ``nmsparse export`` gives the sparse model. Returns its path."""
    path = Path(folder) / "README.md"
    text = CHECKPOINT_README.format(
        step=step, recipe=config.recipe_name, folder=Path(folder).name, state=SPARSITY_STATE
    )
    path.write_text(text, encoding="utf-8")
    return path


def _cpu_tensor_copies(model: nn.Module) -> dict[int, Any]:
    """A deepcopy memo: each parameter and buffer copied to the CPU once (tied weights stay
    tied), and the attached sparsity state left out."""
    memo: dict[int, Any] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in memo:
            data = tensor.detach().to("cpu", copy=True)
            memo[id(tensor)] = (
                nn.Parameter(data, False) if isinstance(tensor, nn.Parameter) else data
            )
    for module in model.modules():
        state = module.__dict__.get(ATTR)
        if state is not None:
            memo[id(state)] = None
    return memo


def _original_class(model: nn.Module) -> type:
    """The model's own class under FSDP2's wrapper class (``FSDP<Name>``)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def _rebuilt(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """A plain CPU model of ``model``'s class and config holding ``state_dict`` (whole tensors)."""
    dtype = next(iter(state_dict.values())).dtype
    plain = _original_class(model)(copy.deepcopy(model.config)).to(dtype)
    plain.load_state_dict(dict(state_dict), strict=True)
    return plain


def sparse_copy(
    model: nn.Module,
    config: NMSparsityConfig,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> tuple[nn.Module, NMSparsifier]:
    """A CPU copy of ``model`` with ``config``'s target masks baked in (``finalize`` on the copy,
    so W ⊙ Φ(W; target) exactly as finalizing the model now would give), and its finalized
    sparsifier. ``model`` and its attached sparsifier are left untouched.

    Args:
        model: the (unwrapped) model being trained.
        config: the sparsity config of the run.
        state_dict: whole tensors of the model (the gathered state under FSDP); the copy is then
            rebuilt from ``model``'s class and config with them.
    """
    if state_dict is not None:
        plain = _rebuilt(model, state_dict)
    else:
        plain = copy.deepcopy(model, _cpu_tensor_copies(model))
        for module in plain.modules():
            if ATTR in module.__dict__:  # the copied module gets its own, fresh sparsifier
                del module.__dict__[ATTR]
                module.__dict__.pop("forward", None)
    plain.eval()
    sparsifier = NMSparsifier(plain, config, total_steps=None)
    sparsifier.finalize()
    return plain, sparsifier


def save_sparse_snapshot(
    model: nn.Module,
    config: NMSparsityConfig,
    output_dir: str | os.PathLike,
    *,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    **save_kwargs: Any,
) -> Path:
    """Write the sparse model of ``model`` as it is now (`sparse_copy`) through
    `save_sparse_pretrained` (verified, metadata, card); ``save_kwargs`` are that function's
    (``processing_class``, ``eval_results``, ``model_name``, ``card``, ``overwrite`` ...).
    The training weights are not touched. Returns ``output_dir`` as a `Path`."""
    from ..export import save_sparse_pretrained

    plain, sparsifier = sparse_copy(model, config, state_dict)
    return save_sparse_pretrained(plain, sparsifier, output_dir, **save_kwargs)


def binary_at_target(config: NMSparsityConfig, total_steps: int | None, step: int) -> bool:
    """True when the effective weights at ``step`` are exactly the target-masked weights (binary
    mask at every location's target pattern), so an evaluation at that step measured the model
    `sparse_copy` gives."""
    if not total_steps:
        return False
    plan = SparsitySchedule(config, total_steps).at(step)
    return (
        plan.masked
        and float(plan.alpha) == 0.0
        and all(p == config.target_pattern(loc) for loc, p in plan.patterns.items())
    )


def _eval_at(folder: Path, step: int) -> dict[str, Any] | None:
    """The evaluation logged at ``step`` in the checkpoint's trainer_state.json, if any."""
    history = json.loads((folder / TRAINER_STATE).read_text(encoding="utf-8"))["log_history"]
    for entry in reversed(history):
        if entry.get("step") == step and any(k.startswith("eval_") for k in entry):
            return {k: v for k, v in entry.items() if k.startswith("eval_")}
    return None


def _processor(folder: Path) -> Any:
    """The processing class the Trainer saved beside the weights, or None."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _load_model(folder: Path) -> nn.Module:
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(folder))
    classes = [getattr(transformers, a, None) for a in (config.architectures or [])]
    cls = next((c for c in classes if c is not None), None)
    if cls is None:
        raise NMCheckpointError(
            f"{folder}: config.json names no model class transformers provides "
            f"(architectures={config.architectures}); cannot rebuild the model."
        )
    return cls.from_pretrained(str(folder))


def export_checkpoint(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    model_name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the sparse model of a Trainer ``checkpoint-N`` (dense master weights) to
    ``output_dir``: the target masks of the sparsity config recorded in the checkpoint applied
    to its weights (what ``finalize`` at step N gives), verified, with metadata, the processor
    saved beside the weights and a card. The card carries the evaluation logged at step N only
    when that evaluation ran on exactly these weights (binary masks at the target patterns).

    Raises:
        NMCheckpointError: the checkpoint cannot be read or records no sparsity settings.
        NMSparsityError: ``output_dir`` holds other files (unless ``overwrite``), or the result
            does not verify.
    """
    from ..export import save_sparse_pretrained

    folder = Path(checkpoint)
    problem = checkpoint_problem(folder)
    if problem is not None:
        raise NMCheckpointError(f"cannot export {folder}: {problem}")
    state = read_sparsity_state(folder)
    if state is None:
        raise NMCheckpointError(
            f"cannot export {folder}: it records no sparsity settings ({SPARSITY_STATE} is "
            f"missing: not written by NMSparseTrainer). Load it, attach an NMSparsifier with the "
            f"run's config, finalize and save_sparse_pretrained."
        )
    config, step = state["config"], state["step"]
    model = _load_model(folder)
    sparsifier = NMSparsifier(model, config, total_steps=None)
    sparsifier.finalize()
    evals = _eval_at(folder, step) if binary_at_target(config, state["total_steps"], step) else None
    return save_sparse_pretrained(
        model,
        sparsifier,
        output_dir,
        processing_class=_processor(folder),
        eval_results=evals,
        model_name=model_name,
        overwrite=overwrite,
    )
