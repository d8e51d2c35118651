"""Which distributed mode a Trainer run actually used, read from the model itself.

Accelerate quietly changes modes (FSDP flags on a CPU machine become DDP; a launch without a
process group runs independent single processes), so the configuration is not evidence.
`distributed_mode` looks at what wraps the model: FSDP2 (``fully_shard`` turns modules into
``FSDPModule`` instances), FSDP1 (``FullyShardedDataParallel``), DDP (``DistributedDataParallel``).
"""

from __future__ import annotations

from typing import Any

from torch import nn


def _fully_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` (FSDP2) was applied to ``model`` or one of its submodules."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def _wrapper_mode(wrapped: nn.Module) -> str | None:
    from torch.nn.parallel import DistributedDataParallel

    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        FullyShardedDataParallel = ()  # noqa: N806
    if isinstance(wrapped, FullyShardedDataParallel):
        return "FSDP1"
    if isinstance(wrapped, DistributedDataParallel):
        return "DDP"
    return None


def _other_mode(trainer, processes: int) -> str:
    if getattr(trainer, "is_deepspeed_enabled", False):
        return "DeepSpeed"
    if processes < 2:
        return "single"
    kind = getattr(getattr(trainer, "accelerator", None), "distributed_type", None)
    return str(getattr(kind, "value", kind or "unknown"))


def distributed_mode(trainer) -> dict[str, Any]:
    """How ``trainer`` ran, from the model's wrapper, not from the configuration.

    Returns ``{"mode", "processes", "wrapper", "fsdp_configured", "note"}``: ``mode`` is
    ``"FSDP2"`` (``trainer.is_fsdp_enabled`` and the model really holds ``fully_shard`` modules),
    ``"FSDP1"``, ``"DDP"``, ``"DeepSpeed"``, ``"single"`` (one process), else accelerate's
    distributed type; ``processes`` is ``args.world_size``; ``note`` says when FSDP was
    configured but did not shard the model (else None).
    """
    wrapped = getattr(trainer, "model_wrapped", None)
    if wrapped is None:  # (not `or`: a compiled model's truth value calls len())
        wrapped = trainer.model
    processes = int(trainer.args.world_size)
    configured = bool(getattr(trainer, "is_fsdp_enabled", False))
    sharded = _fully_sharded(trainer.model) or _fully_sharded(wrapped)
    if configured and sharded:
        mode = "FSDP2"
    else:
        mode = _wrapper_mode(wrapped) or _other_mode(trainer, processes)
    note = None
    if configured and mode not in ("FSDP1", "FSDP2"):
        note = f"FSDP was configured but the model was not sharded: it ran as {mode}"
    return {
        "mode": mode,
        "processes": processes,
        "wrapper": type(wrapped).__name__,
        "fsdp_configured": configured,
        "note": note,
    }
