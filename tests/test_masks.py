"""Executable spec of the N:M mask Φ(W; N, M, dim) (docs/METHOD.md §1, §3): `nm_mask`, `is_nm`,
`nm_group_nonzeros`, `check_divisible`.

Expected masks are written out by hand; the random-shape tests use an independent oracle (a stable
sort by descending magnitude, so ties go to the lower index).
"""

from __future__ import annotations

import os
import re
import shutil

import pytest
import torch

from nmsparse_hf import NMSparsityError, is_nm, nm_mask
from nmsparse_hf.masks import check_divisible, nm_group_nonzeros

T, F = True, False


def _mask(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def _keep_indices(shape: tuple[int, int], kept: list[list[int]]) -> torch.Tensor:
    """A bool mask of ``shape`` with True exactly at the listed column indices of each row."""
    out = torch.zeros(shape, dtype=torch.bool)
    for r, cols in enumerate(kept):
        out[r, cols] = True
    return out


def _oracle_row(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Reference row-wise mask of a 2-D weight: per group, the n largest |w|, ties to lower index."""
    groups = weight.detach().float().abs().reshape(-1, m)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices[:, :n]
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, order, True)
    return keep.reshape(weight.shape)


# ----------------------------------------------------------------------------- hand-computed masks
def test_row_2_4_hand_computed():
    w = torch.tensor(
        [
            [0.1, -0.9, 0.5, 0.3, 2.0, -1.0, 0.0, 1.5],
            [-3.0, 1.0, 2.0, -0.5, 0.2, 0.1, -0.4, 0.3],
        ]
    )
    expected = _mask(
        [
            [F, T, T, F, T, F, F, T],
            [T, F, T, F, F, F, T, T],
        ]
    )
    got = nm_mask(w, 2, 4, "row")
    assert got.dtype == torch.bool and got.shape == w.shape
    assert torch.equal(got, expected)
    assert torch.equal(nm_mask(w, 2, 4), expected)  # row is the default


def test_col_2_4_hand_computed_with_all_zero_column():
    # groups run down each column; column 2 is all zero: ties -> the two lowest rows are kept
    w = torch.tensor(
        [
            [1.0, -5.0, 0.0],
            [4.0, 2.0, 0.0],
            [-3.0, 1.0, 0.0],
            [2.0, 6.0, 0.0],
        ]
    )
    expected = _mask(
        [
            [F, T, T],
            [T, F, T],
            [T, F, F],
            [F, T, F],
        ]
    )
    assert torch.equal(nm_mask(w, 2, 4, "col"), expected)


def test_conv_2_4_groups_along_input_channels_per_output_and_position():
    # weight [O=2, I=4, kh=1, kw=2], written as w[o][i][0] = [kw=0, kw=1]
    # (o=0,kw=0): I-values 1,2,3,4  -> keep i=2,3     (o=0,kw=1): 4,3,2,1 -> keep i=0,1
    # (o=1,kw=0): -5,0,5,1 -> keep i=0,2 (|5| tie, both)  (o=1,kw=1): all 0 -> keep i=0,1
    w = torch.tensor(
        [
            [[[1.0, 4.0]], [[2.0, 3.0]], [[3.0, 2.0]], [[4.0, 1.0]]],
            [[[-5.0, 0.0]], [[0.0, 0.0]], [[5.0, 0.0]], [[1.0, 0.0]]],
        ]
    )
    expected = torch.tensor(
        [
            [[[F, T]], [[F, T]], [[T, F]], [[T, F]]],
            [[[T, T]], [[F, T]], [[T, F]], [[F, F]]],
        ]
    )
    got = nm_mask(w, 2, 4, "row")
    assert got.shape == (2, 4, 1, 2)
    assert torch.equal(got, expected)
    # grouping the flattened [O, I*kh*kw] rows instead would keep a different set
    flat_wrong = nm_mask(w.reshape(2, 8), 2, 4, "row").reshape(w.shape)
    assert not torch.equal(flat_wrong, expected)


def test_conv_col_groups_along_output_channels():
    # weight [O=4, I=1, kh=1, kw=2]; col groups run along O for each (i, kh, kw)
    w = torch.tensor([[[[1.0, -8.0]]], [[[7.0, 1.0]]], [[[-2.0, 2.0]]], [[[3.0, 9.0]]]])
    expected = torch.tensor([[[[F, T]]], [[[T, F]]], [[[F, F]]], [[[T, T]]]])
    assert torch.equal(nm_mask(w, 2, 4, "col"), expected)


def test_row_1_8_hand_computed_with_ties():
    w = torch.full((2, 16), 0.1)
    w[0, 5] = -3.0  # row 0, group 0: the one large magnitude is negative
    w[0, 8:] = torch.arange(1.0, 9.0)  # row 0, group 1: 1..8 -> keep the last
    w[1, :8] = 0.5  # row 1, group 0: all equal -> keep the lowest index
    w[1, 8:] = torch.tensor([0, 0, 0, 0, 0, 0, 0, -0.001])  # row 1, group 1
    expected = _mask(
        [
            [F, F, F, F, F, T, F, F, F, F, F, F, F, F, F, T],
            [T, F, F, F, F, F, F, F, F, F, F, F, F, F, F, T],
        ]
    )
    assert torch.equal(nm_mask(w, 1, 8), expected)


def test_row_1_32_hand_computed_on_2x64():
    w = torch.full((2, 64), 0.01)
    w[0, 5] = -2.0
    w[0, 40] = 1.0
    w[1, 31] = 3.0  # last weight of group 0
    w[1, 32] = 0.5  # first weight of group 1 ...
    w[1, 33] = -0.5  # ... ties with this one: the lower index wins
    expected = _keep_indices((2, 64), [[5, 40], [31, 32]])
    assert torch.equal(nm_mask(w, 1, 32), expected)


def test_row_8_64_hand_computed():
    w = torch.full((3, 64), 0.1)
    big = [0, 3, 10, 17, 30, 41, 55, 63]
    w[0, big] = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0])
    w[1] = -0.1 * torch.arange(64.0)  # magnitude grows with the index: keep the last 8
    w[2] = 0.25  # all equal: keep the first 8
    expected = _keep_indices((3, 64), [big, list(range(56, 64)), list(range(8))])
    assert torch.equal(nm_mask(w, 8, 64), expected)


def test_negative_values_use_magnitude():
    w = torch.tensor([[-4.0, 1.0, -3.0, 2.0]])
    assert torch.equal(nm_mask(w, 2, 4), _mask([[T, F, T, F]]))
    assert torch.equal(nm_mask(-w, 2, 4), _mask([[T, F, T, F]]))


def test_groups_never_cross_rows():
    # all large values sit in row 0; each row still keeps exactly 2 of its own 4
    w = torch.tensor([[10.0, 20.0, 30.0, 40.0], [1.0, 2.0, 3.0, 4.0]])
    assert torch.equal(nm_mask(w, 2, 4), _mask([[F, F, T, T], [F, F, T, T]]))


def test_m_that_does_not_divide_the_row_is_an_error_not_a_cross_row_group():
    # 2x6 flattened is 3 groups of 4, but such groups would span both rows: refuse
    w = torch.randn(2, 6)
    with pytest.raises(NMSparsityError) as err:
        nm_mask(w, 2, 4)
    msg = str(err.value)
    assert "(2, 6)" in msg
    assert re.search(r"M\s*=\s*4\b", msg)


# ----------------------------------------------------------------------------- ties / determinism
def test_ties_break_to_lower_index():
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, -2.0, 2.0, 2.0]])
    assert torch.equal(nm_mask(w, 2, 4), _mask([[T, T, F, F, F, T, T, F]]))
    assert torch.equal(nm_mask(w, 1, 4), _mask([[T, F, F, F, F, T, F, F]]))
    assert torch.equal(nm_mask(w, 3, 4), _mask([[T, T, T, F, F, T, T, T]]))


def test_repeated_calls_give_the_same_mask():
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-2, 3, (64, 64), generator=g).float()  # many ties
    first = nm_mask(w, 2, 8)
    for _ in range(3):
        assert torch.equal(nm_mask(w, 2, 8), first)
    assert torch.equal(first, _oracle_row(w, 2, 8))


def test_permuted_then_unpermuted_gives_the_same_mask():
    g = torch.Generator().manual_seed(1)
    w = torch.randint(-2, 3, (16, 32), generator=g).float()
    base = nm_mask(w, 2, 8)
    # a non-contiguous view of the same values (memory permuted, logical layout unchanged)
    noncontig = w.t().contiguous().t()
    assert not noncontig.is_contiguous()
    assert torch.equal(nm_mask(noncontig, 2, 8), base)
    # permuting rows permutes the mask the same way
    perm = torch.randperm(16, generator=g)
    assert torch.equal(nm_mask(w[perm], 2, 8)[torch.argsort(perm)], base)
    # permuting whole groups within the rows permutes the mask the same way
    gperm = torch.tensor([2, 0, 3, 1])
    cols = (gperm[:, None] * 8 + torch.arange(8)).reshape(-1)
    assert torch.equal(nm_mask(w[:, cols], 2, 8)[:, torch.argsort(cols)], base)


def test_col_grouping_equals_row_grouping_of_the_transpose():
    g = torch.Generator().manual_seed(2)
    for w in (
        torch.randn(32, 24, generator=g),
        torch.randint(-1, 2, (32, 24), generator=g).float(),
    ):
        for n, m in ((2, 4), (1, 8), (1, 32), (3, 16)):
            assert torch.equal(nm_mask(w, n, m, "col"), nm_mask(w.t(), n, m, "row").t())


def test_conv_masks_match_the_linear_mask_of_each_kernel_position():
    g = torch.Generator().manual_seed(3)
    w = torch.randint(-3, 4, (6, 16, 3, 3), generator=g).float()
    row = nm_mask(w, 1, 8, "row")
    col = nm_mask(w, 1, 2, "col")
    for kh in range(3):
        for kw in range(3):
            assert torch.equal(row[:, :, kh, kw], _oracle_row(w[:, :, kh, kw], 1, 8))
            assert torch.equal(col[:, :, kh, kw], _oracle_row(w[:, :, kh, kw].t(), 1, 2).t())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights_give_the_fp32_mask(dtype):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(64, 128, generator=g).to(dtype)
    for n, m in ((2, 4), (1, 8), (8, 64)):
        for dim in ("row", "col"):
            assert torch.equal(nm_mask(w, n, m, dim), nm_mask(w.float(), n, m, dim))


def test_mask_is_detached_and_has_no_grad():
    w = torch.randn(4, 8, requires_grad=True)
    mask = nm_mask(w, 2, 4)
    assert mask.dtype == torch.bool and not mask.requires_grad


# ----------------------------------------------------------------------------- random ViT shapes
@pytest.mark.parametrize("shape", [(192, 384), (384, 192), (576, 192), (64, 64, 3, 3)], ids=str)
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (1, 8), (4, 8), (1, 16), (1, 32), (8, 64)])
def test_exactly_n_largest_per_group_on_vit_shapes(shape, n, m):
    g = torch.Generator().manual_seed(n * 100 + m)
    w = torch.randn(shape, generator=g)
    mask = nm_mask(w, n, m, "row")
    groups = w.abs().movedim(1, -1).reshape(-1, m)
    keep = mask.movedim(1, -1).reshape(-1, m)
    assert torch.equal(keep.sum(-1), torch.full((groups.shape[0],), n))
    kept_min = groups.masked_fill(~keep, float("inf")).amin(-1)
    pruned_max = groups.masked_fill(keep, -1.0).amax(-1)
    assert (kept_min >= pruned_max).all()
    assert is_nm(w * mask, n, m)
    assert torch.equal(nm_group_nonzeros(w * mask, m), torch.full((groups.shape[0],), n))


@pytest.mark.parametrize("n,m", [(2, 4), (1, 8), (1, 32)])
def test_exactly_n_per_group_with_heavy_ties(n, m):
    g = torch.Generator().manual_seed(5)
    w = torch.randint(-1, 2, (96, 192), generator=g).float()  # only -1, 0, 1
    for dim in ("row", "col"):
        mask = nm_mask(w, n, m, dim)
        ref = _oracle_row(w, n, m) if dim == "row" else _oracle_row(w.t(), n, m).t()
        assert torch.equal(mask, ref)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("n,m", [(0, 4), (-1, 4), (5, 4), (9, 8)])
def test_n_out_of_range_is_an_error(n, m):
    with pytest.raises(NMSparsityError):
        nm_mask(torch.randn(2, 8), n, m)


def test_n_equal_m_keeps_everything():
    assert nm_mask(torch.randn(2, 8), 4, 4).all()


def test_check_divisible_names_layer_shape_and_m():
    check_divisible((3, 8), 4, "row")  # fine: no error
    check_divisible((8, 3, 3, 3), 4, "col")
    with pytest.raises(NMSparsityError) as err:
        check_divisible((3, 6), 4, "row", name="blocks.0.mlp.fc1")
    msg = str(err.value)
    assert "blocks.0.mlp.fc1" in msg and "(3, 6)" in msg and re.search(r"M\s*=\s*4\b", msg)
    with pytest.raises(NMSparsityError, match=r"\(6, 8\)"):
        check_divisible((6, 8), 4, "col")
    with pytest.raises(NMSparsityError, match=r"M\s*=\s*8\b"):
        check_divisible((16, 12, 3, 3), 8, "row")


def test_bad_dim_and_1d_weight_are_errors():
    with pytest.raises(NMSparsityError, match="diag"):
        nm_mask(torch.randn(4, 4), 2, 4, "diag")
    with pytest.raises(NMSparsityError, match=r"\(8,\)"):
        nm_mask(torch.randn(8), 2, 4)


def test_conv_mask_error_names_shape_and_m():
    with pytest.raises(NMSparsityError) as err:
        nm_mask(torch.randn(8, 3, 3, 3), 2, 4, "row")
    assert "(8, 3, 3, 3)" in str(err.value) and re.search(r"M\s*=\s*4\b", str(err.value))


# ----------------------------------------------------------------------------- is_nm / counts
def test_nm_group_nonzeros_hand_computed():
    w = torch.tensor(
        [
            [1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            [1.0, -1.0, 3.0, 4.0, 0.0, 0.0, 5.0, 0.0],
        ]
    )
    got = nm_group_nonzeros(w, 4)
    assert not got.is_floating_point()
    assert got.tolist() == [2, 0, 4, 1]
    # col: groups of 2 down each column, ordered column by column
    assert nm_group_nonzeros(w, 2, "col").tolist() == [2, 1, 2, 1, 0, 0, 1, 0]


def test_is_nm_hand_computed():
    ok = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0]])  # 2 and 1 non-zeros
    bad = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 4.0, 5.0, 3.0]])  # 2 and 3 non-zeros
    assert is_nm(ok, 2, 4)  # "at most N": a group with fewer non-zeros complies
    assert not is_nm(bad, 2, 4)
    assert is_nm(bad, 3, 4)
    assert not is_nm(ok, 1, 4)
    assert is_nm(torch.zeros(2, 8), 1, 4)
    assert not is_nm(torch.ones(2, 8), 2, 4)


def test_is_nm_col_and_masked_weights():
    g = torch.Generator().manual_seed(6)
    w = torch.randn(16, 8, generator=g)
    assert not is_nm(w, 2, 4, "col")
    assert is_nm(w * nm_mask(w, 2, 4, "col"), 2, 4, "col")
    # a column-wise 2:4 mask is not (in general) row-wise 2:4
    assert not is_nm(w * nm_mask(w, 2, 4, "col"), 2, 4, "row")
    with pytest.raises(NMSparsityError, match=r"\(16, 8\)"):
        is_nm(w, 1, 32, "col")


# ---------------------------------------------------------------------------------------------
# NaN/inf, and the compiled path (what a torch.compile'd model runs)


def test_nan_and_inf_rank_above_every_finite_weight_and_still_keep_exactly_n():
    nan, inf = float("nan"), float("inf")
    weight = torch.tensor(
        [
            [nan, 1.0, nan, 2.0, -inf, 1.0, nan, 0.0],  # nan and inf beat finite; nan beats inf
            [0.5, nan, -nan, nan, inf, -inf, 3.0, inf],  # equal keys: the lower index wins
        ]
    )
    expected = _mask(
        [
            [T, F, T, F, T, F, T, F],
            [F, T, T, F, T, T, F, F],
        ]
    )
    assert torch.equal(nm_mask(weight, 2, 4), expected)
    assert torch.equal(nm_mask(weight.double(), 2, 4), expected)
    assert int(nm_mask(weight, 1, 8).sum()) == 2  # one per group whatever the NaNs


def _tie_heavy(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randint(-3, 4, shape, generator=g).float()
    flat = weight.view(-1)
    flat[:7] = float("nan")
    flat[9:13] = float("inf")
    flat[20:24] = float("-inf")
    return weight


# each branch of the pairwise path (counting, n = 1, n = m - 1) and the custom op (m = 16)
COMPILED_CASES = [(2, 4), (1, 8), (7, 8), (1, 16)]


@pytest.mark.skipif(
    not (shutil.which("g++") or shutil.which("clang++") or os.environ.get("CXX")),
    reason="torch.compile (inductor) on CPU needs a C++ compiler; none found on PATH",
)
@pytest.mark.parametrize(("n", "m"), COMPILED_CASES)
def test_compiled_mask_equals_eager(n, m):
    """Under torch.compile (inductor, the default backend) M <= 8 takes the pairwise-count path and
    longer groups the eager kernel as a custom op; both must give the eager mask bit for bit, also
    with ties, NaN and +-inf, for row and col grouping and for conv weights."""
    torch._dynamo.reset()
    cases = [
        (torch.randn(48, 64), "row"),
        (_tie_heavy((48, 64), 1), "row"),
        (_tie_heavy((64, 48), 2), "col"),
        (_tie_heavy((16, 32, 3, 3), 3), "row"),
        (_tie_heavy((48, 64), 4).bfloat16(), "row"),
        (_tie_heavy((48, 64), 5).double(), "row"),
    ]

    def every_mask(*weights):  # one graph for all cases: one compilation per pattern
        return [nm_mask(w, n, m, dim) for w, (_, dim) in zip(weights, cases, strict=True)]

    compiled = torch.compile(every_mask, fullgraph=True, dynamic=False)
    got = compiled(*(weight for weight, _ in cases))
    for (weight, dim), mask in zip(cases, got, strict=True):
        expected = nm_mask(weight, n, m, dim)
        assert torch.equal(mask, expected), (n, m, dim, weight.shape)
    torch._dynamo.reset()


def test_compiled_masks_trace_without_graph_breaks():
    """Both compiled paths (pairwise for M <= 8, the custom op above) stay in one graph."""
    torch._dynamo.reset()
    for n, m in ((2, 4), (1, 32)):
        explained = torch._dynamo.explain(nm_mask)(torch.randn(8, 64), n, m)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), (n, m)
    torch._dynamo.reset()


def test_2_4_network_finds_no_tie_in_a_tie_free_weight():
    """The 2:4 fast path decides ties from its own 2nd/3rd largest: on a weight with no tie at any
    group's keep/prune boundary it must say so, or every call falls back to the slow exact path
    (an earlier version compared high > low, true for only some orderings, and took that path ~always)."""
    from nmsparse_hf.masks import _group_view, _nth_largest

    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    kth, tied = _nth_largest(_group_view(weight.abs(), 4, "row"), 2)
    assert tied is False
    expected = weight.abs().reshape(-1, 4).sort(dim=1, descending=True).values[:, 1]
    assert torch.equal(kth.reshape(-1), expected)
    weight.view(-1)[:4] = torch.tensor([5.0, -1.0, 1.0, 0.0])  # 2nd == 3rd in one group: seen
    assert _nth_largest(_group_view(weight.abs(), 4, "row"), 2)[1] is True


def _oracle_any(weight: torch.Tensor, n: int, m: int, dim: str) -> torch.Tensor:
    """Independent reference for any weight and grouping: group the weight along its group axis,
    rank |w| with NaN above +inf above every finite value (stable sort, so ties go to the lower
    index) and keep the first n of each group."""
    axis = 1 if dim == "row" else 0
    moved = weight.detach().double().abs().movedim(axis, -1)
    key = moved.nan_to_num(nan=2e300, posinf=1e300).reshape(-1, m)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :n]
    keep = torch.zeros_like(key, dtype=torch.bool).scatter_(1, order, True)
    return keep.reshape(moved.shape).movedim(-1, axis)


PEELED_AND_FALLBACK = [
    (2, 8),
    (3, 8),
    (4, 8),
    (5, 8),
    (6, 8),
    (2, 16),
    (4, 32),
    (8, 64),
    (9, 16),
    (10, 16),
    (12, 16),
    (2, 4),
    (1, 4),
    (3, 4),
    (7, 8),
    (1, 8),
    (1, 16),
]


@pytest.mark.parametrize(("n", "m"), PEELED_AND_FALLBACK)
@pytest.mark.parametrize("kind", ["random", "ties", "special"])
def test_every_pattern_equals_the_sorting_oracle(n, m, kind):
    """Every kernel path (2:4 network, first maximum for n = 1, group maximum, peeled maxima, topk
    fallback for n - 1 > 8, n = m - 1, the accelerators' all-rows path, and for M <= 8 the traceable pairwise path that
    compiled masks run, here eagerly) against the stable-sort oracle, on tie-free, tie-heavy
    (-1/0/1, zeros) and NaN/inf weights, row and col, Linear and Conv2d shapes, fp32 and fp64."""
    from nmsparse_hf.masks import (
        PAIRWISE_MAX_M,
        _group_view,
        _magnitude_keys,
        _rows_mask,
        _topn_pairwise,
    )

    g = torch.Generator().manual_seed(n * 1000 + m)
    for shape in ((64, 128), (128, 64, 1, 3)):
        if kind == "random":
            weight = torch.randn(shape, generator=g)
        else:
            weight = torch.randint(-1, 2, shape, generator=g).float()
            if kind == "special":
                weight = _tie_heavy(shape, n + m)
        for dim in ("row", "col"):
            expected = _oracle_any(weight, n, m, dim)
            for values in (weight, weight.double()):
                assert torch.equal(nm_mask(values, n, m, dim), expected), (shape, dim, values.dtype)
            # what the custom op runs on a GPU (no host sync), here on the CPU
            assert torch.equal(_rows_mask(weight.abs(), n, m, dim), expected), (shape, dim)
            if m <= PAIRWISE_MAX_M:
                for values in (weight, weight.double()):
                    keys = _group_view(_magnitude_keys(values), m, dim)
                    traced = _topn_pairwise(keys, n).reshape(shape)
                    assert torch.equal(traced, expected), (shape, dim, values.dtype)


@pytest.mark.parametrize(("n", "m"), [(2, 8), (4, 8), (6, 8), (2, 16), (4, 32), (8, 64), (7, 8)])
def test_tie_free_weights_never_take_the_exact_tie_path(n, m, monkeypatch):
    """The thresholds are exact where no group has a tie: the slow per-row tie-breaking is not
    needed (and would be a silent slowdown, not a wrong mask, so it is checked here)."""
    from nmsparse_hf import masks

    def no_tie_path(rows, n):
        raise AssertionError(f"{rows.shape[0]} groups sent to the tie path")

    monkeypatch.setattr(masks, "_topn_stable_rows", no_tie_path)
    weight = torch.randn(192, 384, generator=torch.Generator().manual_seed(n + m))
    for dim in ("row", "col"):
        assert torch.equal(nm_mask(weight, n, m, dim), _oracle_any(weight, n, m, dim))
