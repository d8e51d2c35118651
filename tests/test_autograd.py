"""Executable spec of the effective weight (docs/METHOD.md §4): forward W̃ and the gradient written to W.

Every case uses small literal tensors and a known upstream gradient G = ∂L/∂W̃, injected with
``(out * G).sum().backward()``.

Note: torch.autograd.gradcheck is NOT applicable here. The backward is deliberately not the
derivative of the forward (STE passes g to pruned weights whose forward contribution is 0 or α·w;
SR-STE adds a decay term), so a numerical-vs-analytical gradient check must fail by design.
"""

from __future__ import annotations

import pytest
import torch

from nmsparse_hf import EffectiveWeight, effective_weight

T, F = True, False

W = [[1.0, -2.0, 3.0, -4.0], [0.5, 6.0, -7.0, 8.0]]
MASK = [[T, F, F, T], [F, T, T, F]]
G = [[0.1, 0.2, 0.3, 0.4], [-1.0, -2.0, -3.0, -4.0]]


def _run(alpha=0.0, srste_lambda=0.0, freeze_pruned=False, dtype=torch.float32):
    """Effective weight of the literal W, and the gradient that reaches W under upstream G."""
    w = torch.tensor(W, dtype=dtype, requires_grad=True)
    out = effective_weight(
        w, torch.tensor(MASK), alpha, srste_lambda=srste_lambda, freeze_pruned=freeze_pruned
    )
    (out * torch.tensor(G, dtype=dtype)).sum().backward()
    return out.detach(), w.grad


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows)


def test_ste_forward_masks_and_backward_is_identity():
    out, grad = _run(alpha=0.0)
    assert torch.equal(out, _t([[1.0, 0.0, 0.0, -4.0], [0.0, 6.0, -7.0, 0.0]]))
    # pruned weights get the full gradient
    assert torch.equal(grad, _t(G))


def test_srste_backward_adds_lambda_times_pruned_weights():
    out, grad = _run(alpha=0.0, srste_lambda=0.5)
    assert torch.equal(out, _t([[1.0, 0.0, 0.0, -4.0], [0.0, 6.0, -7.0, 0.0]]))
    # g + 0.5 * (1 - m) * W
    expected = _t([[0.1, 0.2 - 1.0, 0.3 + 1.5, 0.4], [-1.0 + 0.25, -2.0, -3.0, -4.0 + 4.0]])
    torch.testing.assert_close(grad, expected)


def test_mdgf_forward_scales_pruned_weights_by_alpha():
    out, _ = _run(alpha=0.25)
    # W * (m + 0.25 * (1 - m))
    assert torch.equal(out, _t([[1.0, -0.5, 0.75, -4.0], [0.125, 6.0, -7.0, 2.0]]))


def test_mdgf_backward_is_not_alpha_scaled():
    _, grad = _run(alpha=0.25)
    assert torch.equal(grad, _t(G))
    # What plain autograd of W * (m + α(1 - m)) would write instead: g scaled by 0.25 where pruned.
    # That is a different algorithm; the effective weight must not do it.
    w = torch.tensor(W, requires_grad=True)
    m = torch.tensor(MASK).float()
    (w * (m + 0.25 * (1 - m)) * torch.tensor(G)).sum().backward()
    naive = _t([[0.1, 0.05, 0.075, 0.4], [-0.25, -2.0, -3.0, -1.0]])
    torch.testing.assert_close(w.grad, naive)
    assert not torch.allclose(grad, w.grad)


@pytest.mark.parametrize("alpha", [0.0, 0.25, 1.0])
def test_alpha_as_0d_tensor_is_the_same(alpha):
    out_f, grad_f = _run(alpha=alpha)
    out_t, grad_t = _run(alpha=torch.tensor(alpha))
    assert torch.equal(out_t, out_f)
    assert torch.equal(grad_t, grad_f)
    assert torch.equal(grad_t, _t(G))


def test_alpha_one_is_the_dense_weight():
    out, grad = _run(alpha=1.0)
    assert torch.equal(out, _t(W))
    assert torch.equal(grad, _t(G))


def test_all_true_mask_is_the_dense_weight():
    w = torch.tensor(W, requires_grad=True)
    out = effective_weight(w, torch.ones(2, 4, dtype=torch.bool))
    (out * torch.tensor(G)).sum().backward()
    assert torch.equal(out.detach(), _t(W))
    assert torch.equal(w.grad, _t(G))


def test_freeze_pruned_backward_is_g_times_mask():
    out, grad = _run(alpha=0.0, freeze_pruned=True)
    assert torch.equal(out, _t([[1.0, 0.0, 0.0, -4.0], [0.0, 6.0, -7.0, 0.0]]))
    assert torch.equal(grad, _t([[0.1, 0.0, 0.0, 0.4], [0.0, -2.0, -3.0, 0.0]]))


def test_freeze_pruned_with_srste_keeps_pruned_gradient_zero():
    _, grad = _run(alpha=0.0, srste_lambda=0.5, freeze_pruned=True)
    assert torch.equal(grad, _t([[0.1, 0.0, 0.0, 0.4], [0.0, -2.0, -3.0, 0.0]]))


def test_apply_matches_functional_form():
    w1 = torch.tensor(W, requires_grad=True)
    w2 = torch.tensor(W, requires_grad=True)
    mask = torch.tensor(MASK)
    out1 = EffectiveWeight.apply(w1, mask, 0.25, 0.5, False)
    out2 = effective_weight(w2, mask, 0.25, srste_lambda=0.5)
    (out1 * torch.tensor(G)).sum().backward()
    (out2 * torch.tensor(G)).sum().backward()
    assert torch.equal(out1, out2) and torch.equal(w1.grad, w2.grad)
    # MDGF + λ: forward scaled by α, backward g + λ(1 - m)W, still not α-scaled
    expected = _t([[0.1, -0.8, 1.8, 0.4], [-0.75, -2.0, -3.0, 0.0]])
    torch.testing.assert_close(w1.grad, expected)


def test_gradient_through_a_linear_layer():
    # y = x @ W̃ᵀ; with upstream dy = 1 the gradient at W̃ is 1ᵀx (every row gets sum of x rows),
    # and STE hands it to W unchanged, pruned entries included.
    w = torch.tensor([[2.0, -1.0], [0.5, 3.0]], requires_grad=True)
    mask = torch.tensor([[T, F], [F, T]])
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    y = torch.nn.functional.linear(x, effective_weight(w, mask))
    torch.testing.assert_close(y, _t([[2.0, 6.0], [6.0, -3.0]]))
    y.sum().backward()
    assert torch.equal(w.grad, _t([[4.0, 1.0], [4.0, 1.0]]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_keeps_dtype(dtype):
    out, grad = _run(alpha=0.25, srste_lambda=0.5, dtype=dtype)
    assert out.dtype == dtype and grad.dtype == dtype
    # all the literals are exact in bf16/fp16 except 0.1, 0.2, 0.3 (and 1.8, -0.8, -0.75 sums)
    expected = _t([[0.1, -0.8, 1.8, 0.4], [-0.75, -2.0, -3.0, 0.0]])
    torch.testing.assert_close(grad.float(), expected, atol=2e-2, rtol=2e-2)
    assert torch.equal(out.float(), _t([[1.0, -0.5, 0.75, -4.0], [0.125, 6.0, -7.0, 2.0]]))


def test_mask_and_alpha_receive_no_gradient():
    w = torch.tensor(W, requires_grad=True)
    alpha = torch.tensor(0.25, requires_grad=True)
    out = effective_weight(w, torch.tensor(MASK), alpha)
    (out * torch.tensor(G)).sum().backward()
    assert alpha.grad is None
    assert torch.equal(w.grad, _t(G))
