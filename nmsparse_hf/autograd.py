"""The one custom autograd Function of nmsparse_hf: the effective weight of a sparse layer.

SPEC §4, with m the keep-mask and g the gradient at the effective weight W̃:

    forward:   W̃ = W ⊙ (m + α·(1 − m))
    backward:  ∂L/∂W = g + λ·(1 − m) ⊙ W          (λ = 0 except for SR-STE)
               ∂L/∂W = g ⊙ m                        (frozen-mask fine-tune only)

The backward is deliberately *not* the derivative of the forward: MDGF scales the pruned weights'
contribution to the forward by α, but their own update keeps the full straight-through gradient g.
"""

from __future__ import annotations

import torch


class EffectiveWeight(torch.autograd.Function):
    """``EffectiveWeight.apply(weight, mask, alpha, srste_lambda, freeze_pruned)`` -> W̃.

    Args:
        weight: the dense parameter W (stays dense; the optimizer updates it).
        mask: bool keep-mask m, shaped like ``weight`` (no gradient).
        alpha: float or 0-d tensor; 0 gives a binary mask.
        srste_lambda: float λ; adds λ·(1−m)⊙W to the gradient (SR-STE), 0 disables it.
        freeze_pruned: if True, the gradient of pruned weights is zero (frozen-mask fine-tune).

    Returns:
        W̃ = W ⊙ (m + α(1−m)). Backward returns g (+ λ(1−m)W), or g ⊙ m when ``freeze_pruned``;
        it never scales g by α.
    """

    @staticmethod
    def forward(ctx, weight, mask, alpha, srste_lambda: float, freeze_pruned: bool):
        ctx.srste_lambda = float(srste_lambda)
        ctx.freeze_pruned = bool(freeze_pruned)
        if ctx.srste_lambda:
            ctx.save_for_backward(mask, weight)
        elif ctx.freeze_pruned:
            ctx.save_for_backward(mask)
        if isinstance(alpha, torch.Tensor) or alpha != 0:
            return torch.where(mask, weight, weight * alpha)
        return weight * mask

    @staticmethod
    def backward(ctx, grad_output):
        grad = grad_output
        if ctx.srste_lambda:
            mask, weight = ctx.saved_tensors
            grad = grad + ctx.srste_lambda * weight.masked_fill(mask, 0)
        if ctx.freeze_pruned:
            mask = ctx.saved_tensors[0]
            grad = grad.masked_fill(~mask, 0)
        return grad, None, None, None, None


def effective_weight(
    weight: torch.Tensor,
    mask: torch.Tensor,
    alpha: float | torch.Tensor = 0.0,
    srste_lambda: float = 0.0,
    freeze_pruned: bool = False,
) -> torch.Tensor:
    """Functional form of `EffectiveWeight` (see its docstring for the contract)."""
    return EffectiveWeight.apply(weight, mask, alpha, srste_lambda, freeze_pruned)
