"""The elementwise passes of the sparse step are written with fewer temporaries, and give the same
bits as the plain expressions of docs/METHOD.md §4 (NaN, ±inf, ±0 and subnormals included)."""

from __future__ import annotations

import pytest
import torch

from nmsparse_hf.autograd import _masked, _straight_through, sparse_linear

SPECIAL = [float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-40, -1e-40, 3.0]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _tensors(dtype):
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(64, 32, generator=g).to(dtype)
    weight = torch.randn(64, 32, generator=g).to(dtype)
    weight[0, :8] = torch.tensor(SPECIAL)
    grad[1, :4] = torch.tensor([-0.0, 0.0, float("nan"), float("inf")])
    mask = torch.rand(64, 32, generator=g) > 0.5
    mask[0, :8] = torch.tensor([0, 1, 0, 1, 0, 1, 0, 0]).bool()
    return grad, weight, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_place", [False, True])
def test_gradient_terms_are_the_plain_expressions_bit_for_bit(dtype, in_place):
    grad, weight, mask = _tensors(dtype)
    lam = 2e-4
    for srste, frozen in ((lam, False), (0.0, True), (lam, True)):
        expected = grad.clone()
        if srste:
            expected = expected + srste * weight.masked_fill(mask, 0)
        if frozen:
            expected = expected.masked_fill(~mask, 0)
        given = grad.clone()
        got = _straight_through(given, weight, mask, srste, frozen, in_place=in_place)
        assert torch.equal(_bits(got), _bits(expected)), (srste, frozen)
        assert (got.data_ptr() == given.data_ptr()) == in_place
        if not in_place:
            assert torch.equal(_bits(given), _bits(grad))  # the incoming gradient is untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_effective_weight_is_the_plain_expression_bit_for_bit(dtype):
    _, weight, mask = _tensors(dtype)
    for alpha in (torch.tensor(0.37), 0.37, 0.25, torch.tensor(1e-42), -2.0, 1.0, 0.0):
        expected = torch.where(mask, weight, weight * alpha) if alpha != 0 else weight * mask
        assert torch.equal(_bits(_masked(weight, mask, alpha)), _bits(expected))


def test_double_backward_still_records_a_graph():
    """Writing into tensors is off while a graph is recorded through them."""
    x = torch.randn(3, 8, requires_grad=True)
    w = torch.randn(4, 8, requires_grad=True)
    mask = torch.rand(4, 8) > 0.5
    y = sparse_linear(x, w, None, mask, torch.tensor(0.5), 2e-4, True)
    (gw,) = torch.autograd.grad(y.square().sum(), w, create_graph=True)
    (gx,) = torch.autograd.grad(gw.sum(), x)
    assert gx.shape == x.shape and torch.isfinite(gx).all()


@pytest.mark.parametrize(
    "weight_dtype,dtype",
    [
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.float16),
        (torch.float64, torch.float32),
        (torch.bfloat16, torch.float32),  # wider than W: W̃ rounds to W's dtype first
        (torch.float16, torch.float16),
    ],
)
def test_effective_weight_in_a_compute_dtype_is_the_plain_expression_cast(weight_dtype, dtype):
    """Under autocast W̃ is written straight in the compute dtype: the same bits as building it in
    W's dtype and casting (one rounding saved, none changed)."""
    _, weight, mask = _tensors(weight_dtype)
    weight = weight * 1.37  # products that round in the narrower dtype
    for alpha in (torch.tensor(0.37), 0.37, 0.25, torch.tensor(1e-42), -2.0, 1.0, 0.0):
        expected = torch.where(mask, weight, weight * alpha) if alpha != 0 else weight * mask
        got = _masked(weight, mask, alpha, dtype)
        assert got.dtype == dtype
        assert torch.equal(_bits(got), _bits(expected.to(dtype))), alpha


def test_recorded_passes_give_the_same_bits_as_the_fast_ones():
    """While a graph is recorded (double backward) the plain expressions run; same values."""
    grad, weight, mask = _tensors(torch.float32)
    for alpha in (torch.tensor(0.37), 0.0):
        fast = _masked(weight, mask, alpha)
        recorded = _masked(weight.clone().requires_grad_(), mask, alpha)
        assert recorded.requires_grad and torch.equal(_bits(recorded.detach()), _bits(fast))
    fast = _straight_through(grad.clone(), weight, mask, 2e-4, True)
    recorded = _straight_through(grad.clone().requires_grad_(), weight, mask, 2e-4, True)
    assert recorded.requires_grad and torch.equal(_bits(recorded.detach()), _bits(fast))
