"""The fused sparse Linear (`SparseLinear`) against its unfused definition, and what it saves.

Reference: ``F.linear(x, effective_weight(W, m, α, λ, freeze), b)`` — the contract of
docs/METHOD.md §4 that tests/test_autograd.py pins on literal tensors. The fused Function must
give the same output and the same gradients for x, W and b, for every recipe, and keep only the
bool mask on top of what a dense Linear saves for backward (docs/BENCHMARKS.md §2: saving W̃
cost 11-15% of the activations).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nmsparse_hf import NMSparsifier, NMSparsityConfig, effective_weight, nm_mask
from nmsparse_hf.autograd import SparseLinear, sparse_linear

# recipe -> (pattern of the mask, alpha, srste_lambda, freeze_pruned), as NMSparsifier.update sets
RECIPES = {
    "STE": ((2, 4), 0.0, 0.0, False),
    "SR-STE": ((2, 4), 0.0, 0.5, False),
    "MDGF-linear": ((2, 4), 0.4, 0.0, False),
    "MDGF-exp": ((2, 4), torch.tensor(math.exp(-0.3)), 0.0, False),
    "SDGF": ((3, 4), 0.0, 0.0, False),
    "frozen-finetune": ((2, 4), 0.0, 0.0, True),
    "frozen-finetune-SR-STE": ((2, 4), 0.0, 0.5, True),
}


def _tensors(bias: bool, shape=(3, 5, 16), out_features=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, requires_grad=True)
    w = torch.randn(out_features, shape[-1], generator=gen, requires_grad=True)
    b = torch.randn(out_features, generator=gen, requires_grad=True) if bias else None
    return x, w, b


def _run(fused: bool, x, w, b, recipe, autocast=False, upstream_seed=1):
    """Output and (x, W, b) gradients of the fused or the reference path under one upstream g."""
    pattern, alpha, lam, freeze = RECIPES[recipe]
    mask = nm_mask(w.detach(), *pattern)
    for t in (x, w, b):
        if t is not None:
            t.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if fused:
            y = sparse_linear(x, w, b, mask, alpha, lam, freeze)
        else:
            y = F.linear(x, effective_weight(w, mask, alpha, lam, freeze), b)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(upstream_seed))
    y.backward(g.to(y.dtype))
    grads = [None if t is None else t.grad for t in (x, w, b)]
    return y.detach(), grads


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("bias", [True, False])
def test_fused_matches_unfused_fp32(recipe, bias):
    x, w, b = _tensors(bias)
    y_ref, g_ref = _run(False, x, w, b, recipe)
    y, g = _run(True, x, w, b, recipe)
    torch.testing.assert_close(y, y_ref)
    for name, got, want in zip(("x", "weight", "bias"), g, g_ref, strict=True):
        if want is None:
            assert got is None, name
        else:
            assert got.dtype == want.dtype == torch.float32, name
            torch.testing.assert_close(got, want, msg=name)


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("bias", [True, False])
def test_fused_matches_unfused_under_bf16_autocast(recipe, bias):
    x, w, b = _tensors(bias)
    y_ref, g_ref = _run(False, x, w, b, recipe, autocast=True)
    y, g = _run(True, x, w, b, recipe, autocast=True)
    # computes in the autocast dtype as F.linear does; gradients come back in the master dtype
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), atol=3e-2, rtol=2e-2)
    for name, got, want in zip(("x", "weight", "bias"), g, g_ref, strict=True):
        if want is None:
            assert got is None, name
        else:
            assert got.dtype == want.dtype == torch.float32, name
            torch.testing.assert_close(got, want, atol=3e-2, rtol=2e-2, msg=name)


@pytest.mark.parametrize("shape", [(16,), (7, 16), (2, 3, 4, 16)])
def test_any_number_of_leading_dims(shape):
    x, w, b = _tensors(True, shape=shape)
    y_ref, g_ref = _run(False, x, w, b, "MDGF-exp")
    y, g = _run(True, x, w, b, "MDGF-exp")
    assert y.shape == shape[:-1] + (8,)
    torch.testing.assert_close(y, y_ref)
    for got, want in zip(g, g_ref, strict=True):
        torch.testing.assert_close(got, want)


def test_weight_gradient_is_straight_through_not_alpha_scaled():
    # hand-computed: grad_W = gᵀx over all leading positions, pruned entries included, unscaled
    x = torch.tensor([[[1.0, 2.0, 0.0, -1.0]], [[0.5, 0.0, 1.0, 2.0]]], requires_grad=True)
    w = torch.tensor([[4.0, -3.0, 2.0, 1.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False, False]])
    y = sparse_linear(x, w, None, mask, alpha=0.5)
    # W̃ = [4, -3, 1, 0.5]
    torch.testing.assert_close(y, torch.tensor([[[-2.5]], [[4.0]]]))
    y.backward(torch.tensor([[[1.0]], [[2.0]]]))
    torch.testing.assert_close(w.grad, torch.tensor([[2.0, 2.0, 2.0, 3.0]]))
    torch.testing.assert_close(
        x.grad, torch.tensor([[[4.0, -3.0, 1.0, 0.5]], [[8.0, -6.0, 2.0, 1.0]]])
    )


def test_only_requested_gradients_are_computed():
    x, w, b = _tensors(True)
    mask = nm_mask(w.detach(), 2, 4)
    # input without grad (the first layer's input) -> only W and b get gradients
    sparse_linear(x.detach(), w, b, mask).sum().backward()
    assert w.grad is not None and b.grad is not None
    # frozen weight and bias -> only x gets a gradient, equal to g W̃ with g = 1
    w2, b2 = w.detach(), b.detach()
    sparse_linear(x, w2, b2, mask).sum().backward()
    assert w2.grad is None and b2.grad is None
    torch.testing.assert_close(x.grad, (w2 * mask).sum(0).expand_as(x))


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 64)
        self.head = nn.Linear(64, 8)

    def forward(self, x):
        return self.head(torch.relu(self.fc(x)))


def _saved_bytes(model: nn.Module, x: torch.Tensor, autocast: bool) -> int:
    """Unique storage bytes autograd saves for backward in one forward, parameters excluded (as
    bench/step_overhead.py counts)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(x).sum().backward()
    return sum(seen.values())


SPARSIFIER_RECIPES = {
    "STE": (dict(), 0),
    "SR-STE": (dict(sparsity_type="srste"), 0),
    "MDGF-exp": (dict(decay_type="exp", decay_coef=0.1), 0),
    "SDGF": (dict(structure_decay=True, structure_decay_type="sparsify"), 0),
    "frozen-finetune": (dict(finetune_fraction=0.5, finetune_mask="frozen"), 8),
}


@pytest.mark.parametrize("recipe", list(SPARSIFIER_RECIPES))
def test_sparse_linear_saves_what_dense_saves_plus_the_bool_mask(recipe):
    cfg, step = SPARSIFIER_RECIPES[recipe]
    torch.manual_seed(0)
    dense = TwoLinears()
    sparse = copy.deepcopy(dense)
    sp = NMSparsifier(sparse, NMSparsityConfig(target_modules=["fc"], **cfg), total_steps=10)
    sp.update(step)
    assert sp.layers["fc"].masked
    x = torch.randn(4, 10, 32, requires_grad=True)  # a hidden layer's input
    state = sp.layers["fc"]
    extra = sparse.fc.weight.numel()  # the bool mask, 1 byte per weight
    if isinstance(state.alpha, torch.Tensor):
        extra += state.alpha.untyped_storage().nbytes()
    assert _saved_bytes(sparse, x, autocast=False) == _saved_bytes(dense, x, autocast=False) + extra


def test_sparse_linear_saves_less_than_dense_under_autocast():
    # both save the bf16 cast of x; dense F.linear also saves a bf16 copy of W (2 B/weight), the
    # fused one the fp32 parameter (free) and the mask (1 B/weight)
    torch.manual_seed(0)
    dense = TwoLinears()
    sparse = copy.deepcopy(dense)
    NMSparsifier(sparse, NMSparsityConfig(target_modules=["fc"]), total_steps=10)
    x = torch.randn(4, 10, 32, requires_grad=True)
    numel = sparse.fc.weight.numel()
    expected = _saved_bytes(dense, x, autocast=True) - 2 * numel + numel
    assert _saved_bytes(sparse, x, autocast=True) == expected


def test_dense_phase_and_finalized_layers_use_plain_linear():
    torch.manual_seed(0)
    model = TwoLinears()
    sp = NMSparsifier(
        model, NMSparsityConfig(target_modules=["fc"], dense_fraction=0.5), total_steps=10
    )
    x = torch.randn(2, 32)
    assert not sp.layers["fc"].masked
    assert not isinstance(model.fc(x).grad_fn, SparseLinear._backward_cls)
    sp.update(6)
    assert isinstance(model.fc(x).grad_fn, SparseLinear._backward_cls)
    sp.finalize()
    assert not isinstance(model.fc(x).grad_fn, SparseLinear._backward_cls)
