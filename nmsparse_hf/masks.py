"""Pure tensor functions for N:M masks. No modules, no state, no transformers.

Grouping (docs/METHOD.md §1, §3):

* Linear weight ``[out, in]``: ``dim="row"`` groups M consecutive weights along ``in`` within one
  row (the hardware N:M layout); ``dim="col"`` groups along ``out`` within one column.
* Conv2d weight ``[O, I, kh, kw]``: ``row`` groups along the input channels ``I`` for each
  ``(o, kh, kw)``; ``col`` along the output channels ``O`` for each ``(i, kh, kw)``.

A group never spans two rows (or columns): M must divide the grouped dimension.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

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


PAIRWISE_MAX_M = 8  # compiled masks count pairwise up to this M (M^2 unrolled comparisons)


def _group_view(weight: torch.Tensor, m: int, dim: str) -> torch.Tensor:
    """``weight`` as a ``[P, m, Q]`` view (no copy for a contiguous weight) whose dimension 1 runs
    along one group: ``Q == 1`` for ``row`` Linear weights, ``Q`` = the trailing size otherwise."""
    axis = group_axis(weight.shape, dim)
    shape = weight.shape
    outer = 1
    for size in shape[:axis]:
        outer *= size
    inner = 1
    for size in shape[axis + 1 :]:
        inner *= size
    return weight.reshape(outer * (shape[axis] // m), m, inner)


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
        values = weight.detach()
        if values.dtype not in (torch.float32, torch.float64):
            values = values.float()
        if torch.compiler.is_compiling() and m <= PAIRWISE_MAX_M:
            # traced: small groups count pairwise, with no data-dependent branch (it would break
            # the graph), and inductor fuses that into one pass. Longer groups, traced or not, run
            # the eager kernel, which is a custom op: one opaque node in a graph (inductor's own
            # code for short top-k reductions is slower than it).
            return _topn_pairwise(_group_view(_magnitude_keys(values), m, dim), n).reshape(
                weight.shape
            )
        return _eager_nm_mask(values, n, m, dim)


COMPILED_RECOMPILE_LIMIT = 64  # graphs `compiled_nm_masks` may hold: weight shapes x patterns


def _every_mask(weights: tuple[torch.Tensor, ...], n: int, m: int, dim: str) -> list[torch.Tensor]:
    return [nm_mask(weight, n, m, dim) for weight in weights]


@functools.cache
def _compiled_kernel():
    return torch.compile(_every_mask, dynamic=False, fullgraph=True)


def compiled_nm_masks(
    weights: Sequence[torch.Tensor], n: int, m: int, dim: str = "row"
) -> list[torch.Tensor]:
    """`nm_mask` of each of ``weights`` through `torch.compile`, in one compiled call: the same
    masks bit for bit, computed by the traceable pairwise path, which the compiler fuses into one
    kernel per weight (on CPU 1:8 measured at about 0.4-0.6x the eager kernel's time; on a GPU one
    kernel instead of several). What `NMSparsifier.update` computes the step's masks with when
    the model runs compiled (``compile_masks``), one call per weight shape and pattern: one
    guard check and one call for a model's twelve FF1 weights instead of twelve.

    Compiles once per list of weight shapes and dtypes, grouping and pattern (the first call of
    each takes seconds; on CPU inductor needs a C++ compiler). Where a compiled graph would only
    call the eager kernel (M > 8, n == m) and inside a graph being traced, it is `nm_mask`."""
    if torch.compiler.is_compiling() or m > PAIRWISE_MAX_M or n >= m:
        return _every_mask(tuple(weights), n, m, dim)
    with torch._dynamo.config.patch(recompile_limit=COMPILED_RECOMPILE_LIMIT):
        return list(_compiled_kernel()(tuple(weights), n, m, dim))


def compiled_nm_mask(weight: torch.Tensor, n: int, m: int, dim: str = "row") -> torch.Tensor:
    """`compiled_nm_masks` of one weight."""
    return compiled_nm_masks((weight,), n, m, dim)[0]


@torch.library.custom_op("nmsparse_hf::nm_mask", mutates_args=())
def _eager_nm_mask(weight: torch.Tensor, n: int, m: int, dim: str) -> torch.Tensor:
    """The mask of a float32/64 ``weight`` by the eager kernel, on ``|weight|`` made here (so the
    kernel may reuse it as scratch). A custom op so that `torch.compile` calls it as one node
    instead of tracing its branches.

    On the CPU, `_topn_stable`: a threshold, then exact tie-breaking where a count says a group
    needs it; for n = 1 over contiguous groups (``row`` Linear weights), `_top1`. On an
    accelerator that count would be a host sync per layer per step (the CPU waits for the device
    before it can queue anything else), so the exact rows of `_topn_stable_rows` run on every
    group instead: a few kernels, no data-dependent branch, the same mask."""
    if weight.device.type != "cpu":
        return _rows_mask(weight.abs(), n, m, dim)
    source = _group_view(weight, m, dim)
    if n == 1 and source.shape[2] == 1:
        return _top1(source).reshape(weight.shape)
    groups = _group_view(weight.abs(), m, dim)
    return _topn_stable(groups, n, source=source).reshape(weight.shape)


def _rows_mask(magnitude: torch.Tensor, n: int, m: int, dim: str) -> torch.Tensor:
    """`_topn_stable_rows` over every group of ``magnitude`` (``|weight|``), shaped like it: the
    groups laid out as ``[G, m]`` rows (a copy for ``col`` and conv weights). No host sync."""
    groups = _group_view(magnitude, m, dim)
    rows = groups.transpose(1, 2).reshape(-1, m)
    keep = _topn_stable_rows(rows, n).view(groups.shape[0], groups.shape[2], m)
    return keep.transpose(1, 2).reshape(magnitude.shape)


@_eager_nm_mask.register_fake
def _(weight: torch.Tensor, n: int, m: int, dim: str) -> torch.Tensor:
    return torch.empty_like(weight, dtype=torch.bool)


PEEL_MAX_ROUNDS = 8  # `_nth_largest` peels up to this many maxima before falling back to topk


def _group_max(groups: torch.Tensor) -> torch.Tensor:
    """The largest value of each group of ``groups`` ``[P, m, Q]`` (along dim 1), ``[P, 1, Q]``;
    NaN where a group holds one."""
    return groups.amax(dim=1, keepdim=True)


def _nth_largest(groups: torch.Tensor, n: int) -> tuple[torch.Tensor, bool | None]:
    """A threshold ``t`` per group of the non-negative ``groups`` ``[P, m, Q]`` (along dim 1),
    shaped ``[P, 1, Q]``, such that ``groups >= t`` keeps exactly the n largest of every group
    that has no tie at the keep/prune boundary, NaN or inf; and whether some group may have one
    (True/False when known here, ``None``: the caller counts).

    For n - 1 <= PEEL_MAX_ROUNDS, ``t`` is the n-th largest *distinct* value, found by peeling:
    take the maximum, zero every entry at or above it, repeat. Where the n largest are distinct
    that is the n-th largest; where they are not, ``groups >= t`` keeps more than n, and the
    caller's count sends the group to the exact tie-breaking (as it does NaN: its comparisons are
    false). A handful of maxima and comparisons over the weight; ``topk`` over many short rows
    costs several times more on CPU, and remains the path for larger n.
    """
    m = groups.shape[1]
    if n == 2 and m == 4:
        # sorted (a, b, c, d): 2nd = max(high, low), 3rd = min(high, low) with
        # high = min(max(a, b), max(c, d)), low = max(min(a, b), min(c, d))
        a, b, c, d = groups.unbind(dim=1)
        high = torch.minimum(torch.maximum(a, b), torch.maximum(c, d))
        low = torch.maximum(torch.minimum(a, b), torch.minimum(c, d))
        # {high, low} = {2nd, 3rd} in either order. ``not >`` also flags NaN (maximum and minimum
        # propagate it), which then takes the exact path like a tie.
        second, third = torch.maximum(high, low), torch.minimum(high, low)
        return second.unsqueeze(1), not bool((second > third).all())
    if n - 1 <= PEEL_MAX_ROUNDS:
        threshold = _group_max(groups)
        below, flags = groups, torch.empty_like(groups)  # two weight-sized buffers, reused
        for _ in range(n - 1):
            # entries >= threshold become 0 (below it they are kept as they are)
            torch.lt(below, threshold, out=flags)
            below = below.mul_(flags) if below is not groups else below * flags
            threshold = _group_max(below)
        return threshold, None
    kth = groups.topk(n, dim=1, largest=True, sorted=False).values.amin(dim=1, keepdim=True)
    return kth, None


def _topn_stable(groups: torch.Tensor, n: int, source: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask of the n largest values in each group of ``groups`` ``[P, m, Q]`` (along dim 1),
    ties to the lower index. With ``source`` given, ``groups`` is ``|source|``, a tensor of the
    caller's that this function may overwrite (the comparison is written into it).

    With ``t`` the n-th largest value of a group, ``groups >= t`` keeps exactly n entries unless
    the n-th and (n+1)-th largest are equal (for n = m - 1: ``groups > min``, unless the minimum
    is repeated). One global count (or the (n+1)-th largest, where it is cheap) tells whether that
    happened anywhere; only such groups go through the exact tie-breaking of `_topn_stable_rows`.
    """
    if n == groups.shape[1] - 1:
        # prune the single smallest: exact unless a group's minimum is repeated
        threshold, op, tied = groups.amin(dim=1, keepdim=True), torch.gt, None
    else:
        (threshold, tied), op = _nth_largest(groups, n), torch.ge
    # written as 1.0/0.0 floats: on CPU a comparison into a float tensor is vectorized, into a
    # bool tensor it is not (about 2x slower)
    keep = op(groups, threshold, out=groups if source is not None else torch.empty_like(groups))
    if tied is None:
        tied = _count_ones(keep) != groups.numel() // groups.shape[1] * n
    keep = keep.bool()
    if tied:
        exact = groups if source is None else source.abs()
        counts = keep.sum(dim=1)
        bad = (counts != n).nonzero(as_tuple=True)
        rows = exact.transpose(1, 2)[bad]
        keep.transpose(1, 2)[bad] = _topn_stable_rows(rows, n)
    return keep


def _top1(groups: torch.Tensor) -> torch.Tensor:
    """Bool mask of the largest magnitude in each group of the float32/64 ``groups`` ``[P, m, 1]``
    (along dim 1), the lower index on ties, NaN above +inf: the first maximum of the integer keys
    of `_magnitude_keys` (``argmax`` returns the first of equal maxima), set by one scatter. Exact
    by construction, so no count and no tie path; ATen's integer ``argmax`` over short contiguous
    groups is several times faster than its float ``amax`` and comparison there (1:8 on 1536x384
    at 2 threads: 0.66 against 0.93 ms a mask, docs/BENCHMARKS.md)."""
    first = _magnitude_keys(groups).argmax(dim=1, keepdim=True)
    return torch.zeros(groups.shape, dtype=torch.bool, device=groups.device).scatter_(
        1, first, True
    )


def _count_ones(flags: torch.Tensor) -> int:
    """The number of 1.0 entries of a 0/1 float tensor, exactly: a float32 sum of integers is exact
    while every partial sum stays below 2**24, i.e. for up to 2**24 entries."""
    exact = flags.dtype == torch.float64 or flags.numel() <= 2**24
    return int(flags.sum() if exact else flags.sum(dtype=torch.float64))


def _topn_pairwise(keys: torch.Tensor, n: int) -> torch.Tensor:
    """`_topn_stable` on the integer keys ``[P, m, Q]`` of `_magnitude_keys`: an entry is kept
    when fewer than n entries of its group outrank it (a larger key, or an equal key at a lower
    index). Elementwise ops over ``[P, Q]`` slices, no reduction and no data-dependent branch:
    under `torch.compile` they fuse into one pass over the weight. Used for m <= 8.

    For n = 1 and n = m - 1 on 32-bit keys (float32 weights) every entry's rank is made unique by
    packing, ``key * m + (m - 1 - i)`` in 64 bits (an equal key at a lower index packs larger):
    n = 1 keeps the group's largest packed key, n = m - 1 prunes its smallest, each found by a
    tree of m - 1 maxima (minima), about 3 ops per entry. 1:8, ViT-S's 24 FF weights compiled:
    12.5 ms against 16.4 ms for running maxima from both ends (docs/BENCHMARKS.md). Other n, and
    64-bit keys (which have no spare bits), count the m - 1 comparisons per entry."""
    columns = keys.unbind(dim=1)
    m = len(columns)
    if n in (1, m - 1) and keys.dtype == torch.int32:
        packed = [key.to(torch.int64) * m + (m - 1 - i) for i, key in enumerate(columns)]
        if n == 1:
            best = _tree(torch.maximum, packed)
            keep = [key == best for key in packed]
        else:
            worst = _tree(torch.minimum, packed)
            keep = [key != worst for key in packed]
        return torch.stack(keep, dim=1)
    keep = []
    for i in range(m):
        beats = [
            columns[j] >= columns[i] if j < i else columns[j] > columns[i]
            for j in range(m)
            if j != i
        ]
        count = functools.reduce(torch.add, [b.to(torch.int32) for b in beats])
        keep.append(count < n)
    return torch.stack(keep, dim=1)


def _tree(op, tensors: list[torch.Tensor]) -> torch.Tensor:
    """``op`` (a binary elementwise op) folded over ``tensors`` as a balanced tree: the same value
    as a left fold for an associative op, with a dependency chain of log2(m) instead of m - 1."""
    while len(tensors) > 1:
        pairs = [op(a, b) for a, b in zip(tensors[::2], tensors[1::2], strict=False)]
        tensors = pairs + tensors[len(pairs) * 2 :]
    return tensors[0]


def _magnitude_keys(values: torch.Tensor) -> torch.Tensor:
    """`_order_keys` of ``|values|`` (float32/64) in one op: the bits of ``values`` as integers
    with the sign bit cleared, which is what ``abs`` does to a float's bits (NaN included)."""
    if values.dtype == torch.float32:
        return values.view(torch.int32) & 0x7FFFFFFF
    return values.view(torch.int64) & 0x7FFFFFFFFFFFFFFF


def _topn_stable_rows(groups: torch.Tensor, n: int) -> torch.Tensor:
    """`_topn_stable` for ``[G, m]`` rows, exact for any ties (NaN and inf included): the n-th
    largest key ``t`` of each row comes from ``topk``; everything strictly above ``t`` is kept,
    and the remaining slots go to the entries equal to ``t`` in index order."""
    keys = _order_keys(groups)
    kth = keys.topk(n, dim=-1, largest=True, sorted=False).values.amin(dim=-1, keepdim=True)
    above = keys > kth
    equal = keys == kth
    need = n - above.sum(dim=-1, keepdim=True)
    return above | (equal & (equal.cumsum(dim=-1) <= need))


def _order_keys(magnitude: torch.Tensor) -> torch.Tensor:
    """Integer keys ordered like ``magnitude`` (float32/64, sign bit clear), NaN above +inf.

    The bits of a non-negative IEEE float, read as a signed integer of the same width, increase
    with its value, and a NaN's bits lie above +inf's; so the keys give a total order that matches
    `topk` (which ranks NaN largest) and make equality exact, where float comparisons with NaN are
    all false. A free view, no copy."""
    return magnitude.view(torch.int32 if magnitude.dtype == torch.float32 else torch.int64)


def is_nm(weight: torch.Tensor, n: int, m: int, dim: str = "row") -> bool:
    """True when every group of ``m`` along ``dim`` holds at most ``n`` non-zeros (N:M-compliant)."""
    return bool((nm_group_nonzeros(weight, m, dim) <= n).all())


def nm_group_nonzeros(weight: torch.Tensor, m: int, dim: str = "row") -> torch.Tensor:
    """Number of non-zeros in each group of ``m`` along ``dim``, as a 1-D int tensor."""
    check_divisible(weight.shape, m, dim)
    groups, _ = _grouped(weight.detach() != 0, m, dim)
    return groups.sum(dim=-1)


def count_nonzeros(weight: torch.Tensor) -> int:
    """Number of non-zero entries of ``weight`` (NaN counts as non-zero): the one count behind
    every sparsity figure nmsparse_hf reports, logs or records."""
    return int(torch.count_nonzero(weight.detach()))
