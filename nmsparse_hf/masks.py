"""Pure tensor functions for N:M masks. No modules, no state, no transformers.

Grouping (SPEC §1, §3):

* Linear weight ``[out, in]``: ``dim="row"`` groups M consecutive weights along ``in`` within one
  row (the hardware N:M layout); ``dim="col"`` groups along ``out`` within one column.
* Conv2d weight ``[O, I, kh, kw]``: ``row`` groups along the input channels ``I`` for each
  ``(o, kh, kw)``; ``col`` along the output channels ``O`` for each ``(i, kh, kw)``.

A group never spans two rows (or columns): M must divide the grouped dimension.
"""

from __future__ import annotations

import torch

from .errors import NMSparsityError

GROUP_DIMS = ("row", "col")


def group_axis(weight_shape: torch.Size | tuple[int, ...], dim: str = "row") -> int:
    """The tensor axis along which groups of M run: 1 (input) for ``row``, 0 (output) for ``col``."""
    if dim not in GROUP_DIMS:
        raise NMSparsityError(f"dim = {dim!r} is not a group dimension; use 'row' or 'col'.")
    if len(weight_shape) < 2:
        raise NMSparsityError(
            f"N:M masks need a weight with at least 2 dimensions, got shape {tuple(weight_shape)}."
        )
    return 1 if dim == "row" else 0


def check_divisible(
    weight_shape: torch.Size | tuple[int, ...], m: int, dim: str = "row", name: str = "weight"
) -> None:
    """Raise `NMSparsityError` naming ``name``, its shape and M when M does not divide the grouped
    dimension (groups would have to cross rows)."""
    axis = group_axis(weight_shape, dim)
    size = weight_shape[axis]
    if m <= 0 or size % m:
        what = "input" if axis == 1 else "output"
        raise NMSparsityError(
            f"{name}: shape {tuple(weight_shape)} cannot be grouped {dim}-wise in groups of M={m}: "
            f"its {what} dimension {size} is not a multiple of {m}. Choose an M that divides "
            f"{size}, use the other sparse_dim, or exclude this layer (exclude_modules)."
        )


def _grouped(weight: torch.Tensor, m: int, dim: str) -> tuple[torch.Tensor, tuple[int, ...]]:
    """View/copy ``weight`` as ``[groups, m]`` with the grouped axis last; return the permuted shape."""
    axis = group_axis(weight.shape, dim)
    moved = weight.movedim(axis, -1)
    return moved.reshape(-1, m), tuple(moved.shape)


def _ungrouped(groups: torch.Tensor, moved_shape: tuple[int, ...], axis: int) -> torch.Tensor:
    return groups.reshape(moved_shape).movedim(-1, axis)


def nm_mask(weight: torch.Tensor, n: int, m: int, dim: str = "row") -> torch.Tensor:
    """The N:M keep-mask Φ(W; n, m, dim) of a Linear or Conv2d weight.

    In every group of ``m`` consecutive weights along the group dimension, the ``n`` entries with
    the largest magnitude are kept (True). Ties break towards the lower index inside the group, so
    the mask is the same on every rank and every run. Computed without autograd.

    Args:
        weight: a ``[out, in]`` Linear or ``[O, I, kh, kw]`` Conv2d weight (any float dtype).
        n: weights kept per group, ``0 < n <= m``.
        m: group length; must divide the grouped dimension.
        dim: ``"row"`` (along the input dimension) or ``"col"`` (along the output dimension).

    Returns:
        A bool tensor shaped like ``weight`` with exactly ``n`` True per group.
    """
    if not 0 < n <= m:
        raise NMSparsityError(f"n:m = {n}:{m}: need 0 < n <= m (n counts kept weights).")
    check_divisible(weight.shape, m, dim)
    if n == m:
        return torch.ones_like(weight, dtype=torch.bool)
    with torch.no_grad():
        groups, moved_shape = _grouped(weight.detach().abs(), m, dim)
        if groups.dtype not in (torch.float32, torch.float64):
            groups = groups.float()
        keep = _topn_stable(groups, n)
        return _ungrouped(keep, moved_shape, group_axis(weight.shape, dim))


def _topn_stable(groups: torch.Tensor, n: int) -> torch.Tensor:
    """Bool mask of the n largest values in each row of ``groups`` ``[G, m]``, ties to lower index.

    The n-th largest value ``t`` of each row comes from ``topk`` (its value is unique even when
    topk's choice among equal entries is not); everything strictly above ``t`` is kept, and the
    remaining slots go to the entries equal to ``t`` in index order.
    """
    kth = groups.topk(n, dim=-1, largest=True, sorted=False).values.amin(dim=-1, keepdim=True)
    above = groups > kth
    equal = groups == kth
    need = n - above.sum(dim=-1, keepdim=True)
    return above | (equal & (equal.cumsum(dim=-1) <= need))


def is_nm(weight: torch.Tensor, n: int, m: int, dim: str = "row") -> bool:
    """True when every group of ``m`` along ``dim`` holds at most ``n`` non-zeros (N:M-compliant)."""
    return bool((nm_group_nonzeros(weight, m, dim) <= n).all())


def nm_group_nonzeros(weight: torch.Tensor, m: int, dim: str = "row") -> torch.Tensor:
    """Number of non-zeros in each group of ``m`` along ``dim``, as a 1-D int tensor."""
    check_divisible(weight.shape, m, dim)
    groups, _ = _grouped(weight.detach() != 0, m, dim)
    return groups.sum(dim=-1)


def nm_violations(weight: torch.Tensor, n: int, m: int, dim: str = "row") -> int:
    """Number of groups with more than ``n`` non-zeros."""
    return int((nm_group_nonzeros(weight, m, dim) > n).sum())


def sparsity(weight: torch.Tensor) -> float:
    """Fraction of exact zeros in ``weight``."""
    return float((weight.detach() == 0).sum()) / max(weight.numel(), 1)
