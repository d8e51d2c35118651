"""Run a finalized 2:4 model on sparse tensor cores (`torch.sparse.to_sparse_semi_structured`).

Only 2:4 row-grouped Linear weights qualify (the hardware layout), in fp16/bf16, on a CUDA GPU of
compute capability 8.0 or newer, with shapes the kernels accept (multiples of the minimum rows and
columns PyTorch declares for the backend). `semi_structured_candidates` tells which layers qualify
and why the others do not (pure, runs anywhere); `to_semi_structured` swaps them in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import NMSparsityError
from ..masks import is_nm

SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class Candidate:
    """A Linear layer and whether it can become a semi-structured sparse weight (``reason`` if not)."""

    name: str
    shape: tuple[int, ...]
    ok: bool
    reason: str = ""


def cuda_semi_structured_available() -> tuple[bool, str]:
    """(available, reason): a CUDA GPU of compute capability >= 8.0 is needed."""
    if not torch.cuda.is_available():
        return False, "needs a CUDA GPU (sm80+); torch.cuda.is_available() is False"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return False, f"needs compute capability >= 8.0, this GPU has {major}.{minor}"
    return True, ""


def _min_shape(dtype: torch.dtype) -> tuple[int, int]:
    from torch.sparse import semi_structured as ss

    backend = ss.SparseSemiStructuredTensorCUTLASS
    if not getattr(ss.SparseSemiStructuredTensor, "_FORCE_CUTLASS", True):
        backend = ss.SparseSemiStructuredTensorCUSPARSELT
    config = backend._DTYPE_SHAPE_CONSTRAINTS[dtype]
    return config.sparse_min_rows, config.sparse_min_cols


def semi_structured_candidates(
    model: nn.Module, names: list[str], dtype: torch.dtype = torch.float16
) -> list[Candidate]:
    """Which of ``names`` (Linear layers that should be 2:4) can take the sparse kernels."""
    if dtype not in SEMI_STRUCTURED_DTYPES:
        raise NMSparsityError(
            f"dtype={dtype}: semi-structured sparse kernels take float16 or bfloat16 weights."
        )
    min_rows, min_cols = _min_shape(dtype)
    modules = dict(model.named_modules())
    out = []
    for name in names:
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            out.append(Candidate(name, (), False, "not an nn.Linear in this model"))
            continue
        rows, cols = module.weight.shape
        shape = (rows, cols)
        if rows % min_rows or cols % min_cols:
            out.append(
                Candidate(
                    name, shape, False, f"shape must be a multiple of ({min_rows}, {min_cols})"
                )
            )
        elif not is_nm(module.weight, 2, 4, "row"):
            out.append(Candidate(name, shape, False, "weight is not 2:4 along rows"))
        else:
            out.append(Candidate(name, shape, True))
    return out


@torch.no_grad()
def to_semi_structured(model: nn.Module, names: list[str]) -> list[Candidate]:
    """Replace the qualifying weights among ``names`` by semi-structured sparse tensors, in place.

    The model must already be on a CUDA GPU in float16 or bfloat16. Returns the candidates (the
    ``ok`` ones were swapped). Raises `NMSparsityError` when no GPU can run the kernels.
    """
    available, reason = cuda_semi_structured_available()
    if not available:
        raise NMSparsityError(f"to_semi_structured: {reason}.")
    from torch.sparse import to_sparse_semi_structured

    dtype = next(model.parameters()).dtype
    candidates = semi_structured_candidates(model, names, dtype)
    modules = dict(model.named_modules())
    for cand in candidates:
        if cand.ok:
            module = modules[cand.name]
            module.weight = nn.Parameter(
                to_sparse_semi_structured(module.weight), requires_grad=False
            )
    return candidates
