"""The custom autograd of nmsparse_hf: the effective weight of a sparse layer.

docs/METHOD.md §4, with m the keep-mask and g the gradient at the effective weight W̃:

    forward:   W̃ = W ⊙ (m + α·(1 − m))
    backward:  ∂L/∂W = g + λ·(1 − m) ⊙ W          (λ = 0 except for SR-STE)
               ∂L/∂W = g ⊙ m                        (frozen-mask fine-tune only)

The backward is deliberately *not* the derivative of the forward: MDGF scales the pruned weights'
contribution to the forward by α, but their own update keeps the full straight-through gradient g.

Two Functions implement that one contract:

- `EffectiveWeight` returns W̃ itself; the caller runs the layer with it. Used for Conv2d (and as
  the reference the tests compare against).
- `SparseLinear` is W̃ and ``F.linear`` in one Function, used for every sparse Linear. It saves
  the input, the parameter W and the bool mask, and rebuilds W̃ in backward. ``F.linear(x, W̃, b)``
  would save W̃, a new full-size tensor per layer (a dense layer saves only its parameter, which
  exists anyway): on ViT-S/16 that made the saved activations of sparse training 1.11-1.15x dense;
  fused, 1.03x, the bool masks only (docs/BENCHMARKS.md §2). The price is one elementwise pass
  per layer in backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The passes below take the bool mask as 0/1 bytes (``mask.view(torch.int8/uint8)``): on CPU a
# bool operand costs a slow cast (``w * mask`` about 7x ``w * mask.view(torch.uint8)``, and
# ``torch.where``/``masked_fill`` about 10x a vectorized pass), while a byte operand is read as is.
# Every result is bit for bit the plain expression it replaces (tests/test_step_passes.py).
_SAME_WIDTH_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _keep(mask: torch.Tensor) -> torch.Tensor:
    """The bool keep-mask of ``mask``, a bool mask or its 0/1 bytes (``mask.view(torch.uint8)``).

    A compiled forward receives the step's mask as bytes (`LayerSparsity.forward_mask`): inductor's
    CPU code reads a uint8 input with one vector load and a bool input entry by entry (W ⊙ m for
    ViT-S's 24 FF weights: 5.5 against 11.5 ms, docs/BENCHMARKS.md); ``mask != 0`` on the bytes
    fuses into the kernel that reads them."""
    return mask if mask.dtype == torch.bool else mask != 0


def _recording(*tensors: torch.Tensor) -> bool:
    """True when the plain expressions must be used: autograd records a graph through one of
    ``tensors`` (double backward: differentiable, nothing written in place), or `torch.compile`
    traces (inductor fuses the plain expressions into one vectorized pass; the byte-level forms
    below, written for ATen's CPU kernels, compile to scalar loops: 9.5 ms against 0.7 ms for
    MDGF's W̃ of a 1536x384 weight, docs/BENCHMARKS.md)."""
    if torch.compiler.is_compiling():
        return True
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _zero_where(tensor: torch.Tensor, mask: torch.Tensor, where: bool) -> torch.Tensor:
    """``tensor.masked_fill_(mask == where, 0)`` in place, bit for bit (NaN and inf entries become
    +0 too), as one AND of ``tensor``'s bits with 0 (to clear) or all-ones (to keep)."""
    flags = mask.view(torch.int8)  # 1 where True, 0 where False
    keep_bits = flags - 1 if where else flags.neg()  # 0 or -1 (all bits set) per entry
    tensor.view(_SAME_WIDTH_INT[tensor.element_size()]).bitwise_and_(keep_bits)
    return tensor


def _alpha_factor(mask: torch.Tensor, alpha: float | torch.Tensor, dtype: torch.dtype):
    """m + α(1 − m) as a ``dtype`` tensor: exactly 1 where kept and α (rounded to ``dtype``) where
    pruned, built on the bits. With A the bits of α and I those of 1.0, an entry's bits are
    A ^ m·(I ^ A): A where m = 0, I where m = 1, for any α (NaN and negatives included). Two integer
    passes over the mask's 0/1 values, where the float form m + α(1 − m) took four (a uint8
    operand in float arithmetic is first copied to a float tensor): 0.17 against 0.33 ms for a
    1536x384 mask, docs/BENCHMARKS.md."""
    ints = _SAME_WIDTH_INT[torch.finfo(dtype).bits // 8]
    if isinstance(alpha, torch.Tensor):  # a 0-d tensor: stays where it is (no host sync)
        alpha_bits = alpha.to(dtype).view(ints)
        flip = torch.ones((), dtype=dtype, device=alpha.device).view(ints) ^ alpha_bits
    else:
        alpha_bits = int(torch.tensor(alpha, dtype=dtype).view(ints))
        flip = int(torch.tensor(1.0, dtype=dtype).view(ints)) ^ alpha_bits
    bits = mask.view(torch.uint8).to(ints)
    return bits.mul_(flip).bitwise_xor_(alpha_bits).view(dtype)


def _masked(
    weight: torch.Tensor,
    mask: torch.Tensor,
    alpha: float | torch.Tensor,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """W ⊙ (m + α(1 − m)) as a ``dtype`` tensor (default: W's), bit for bit
    ``torch.where(mask, W, W * alpha).to(dtype)`` (``(W * mask).to(dtype)`` for α = 0): the
    product is computed in the precision ``W * alpha`` computes in, then rounded once to ``dtype``."""
    dtype = dtype or weight.dtype
    if torch.finfo(dtype).bits > torch.finfo(weight.dtype).bits:
        return _masked(weight, mask, alpha).to(dtype)  # W̃ is rounded to W's dtype first
    binary = not isinstance(alpha, torch.Tensor) and alpha == 0
    if _recording(weight):
        if binary:
            return (weight * mask).to(dtype)  # the same bits for a bool mask and its 0/1 bytes
        return torch.where(_keep(mask), weight, weight * alpha).to(dtype)
    if binary:
        factor = mask.view(torch.uint8)
    else:
        # half types compute W * alpha in float32; so does W * factor with a float32 factor
        factor = _alpha_factor(mask, alpha, torch.promote_types(weight.dtype, torch.float32))
    return torch.mul(weight, factor, out=torch.empty_like(weight, dtype=dtype))


def _straight_through(
    grad: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    srste_lambda: float,
    freeze_pruned: bool,
    in_place: bool = False,
) -> torch.Tensor:
    """The gradient written to W from g = ∂L/∂W̃: g (+ λ(1−m)⊙W), times m when frozen; never α.

    Bit for bit ``g + λ * W.masked_fill(m, 0)`` and ``.masked_fill(~m, 0)`` (pruned entries +0,
    whatever g held there). ``in_place`` writes into ``grad``, a tensor the caller owns."""
    if _recording(grad, weight):
        if srste_lambda:
            # g - (-λ)x is g + λx bit for bit; written as a subtraction because inductor rewrites
            # ``mm + tensor`` into an addmm that copies the decay into the output first, while a
            # pointwise epilogue fuses with the kernel that already reads W and m (CPU, ViT-S/16:
            # about 5 ms a step, docs/BENCHMARKS.md)
            grad = grad - (-srste_lambda) * weight.masked_fill(_keep(mask), 0)
        return grad.masked_fill(~_keep(mask), 0) if freeze_pruned else grad
    if srste_lambda:
        decay = _zero_where(weight * srste_lambda, mask, True)
        grad = grad.add_(decay) if in_place else grad + decay
        in_place = True  # grad is now a tensor of this function's own either way
    if freeze_pruned:
        grad = _zero_where(grad if in_place else grad.clone(), mask, False)
    return grad


class EffectiveWeight(torch.autograd.Function):
    """``EffectiveWeight.apply(weight, mask, alpha, srste_lambda, freeze_pruned)`` -> W̃.

    Args:
        weight: the dense parameter W (stays dense; the optimizer updates it).
        mask: bool keep-mask m, shaped like ``weight`` (no gradient), or its 0/1 bytes
            (``mask.view(torch.uint8)``, what a compiled forward passes).
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
        return _masked(weight, mask, alpha)

    @staticmethod
    def backward(ctx, grad_output):
        if not ctx.srste_lambda and not ctx.freeze_pruned:
            return grad_output, None, None, None, None
        mask, *weight = ctx.saved_tensors
        weight = weight[0] if weight else None
        grad = _straight_through(grad_output, weight, mask, ctx.srste_lambda, ctx.freeze_pruned)
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


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype ``F.linear`` would compute in under the active autocast, else None."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


class SparseLinear(torch.autograd.Function):
    """``SparseLinear.apply(x, weight, bias, mask, alpha, srste_lambda, freeze_pruned)`` -> y.

    Same result and gradients as ``F.linear(x, effective_weight(weight, mask, alpha,
    srste_lambda, freeze_pruned), bias)``, but only ``x``, the parameter ``weight``, the bool
    ``mask`` (and a tensor ``alpha``) are saved for backward, not W̃.

    Args:
        x: input ``[..., in]``, any number of leading dims.
        weight: the dense parameter W ``[out, in]``.
        bias: ``[out]`` or None.
        mask, alpha, srste_lambda, freeze_pruned: as in `EffectiveWeight`.

    Returns:
        y = x W̃ᵀ + b. Under autocast, x, W̃ (built from W in W's dtype, then cast) and b are cast to
        the autocast dtype as ``F.linear`` would cast them. Backward returns ``grad_x = g W̃``,
        ``grad_W = gᵀx`` (summed over the leading dims) + λ(1−m)⊙W, times m when
        ``freeze_pruned`` — never α-scaled — and ``grad_b = Σ g``; each in its input's dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mask, alpha, srste_lambda: float, freeze_pruned: bool):
        ctx.set_materialize_grads(False)
        ctx.srste_lambda = float(srste_lambda)
        ctx.freeze_pruned = bool(freeze_pruned)
        ctx.x_dtype, ctx.weight_dtype = x.dtype, weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.device_type = x.device.type
        ctx.compute_dtype = _autocast_dtype(ctx.device_type)
        weight_eff = _masked(weight, mask, alpha, ctx.compute_dtype)
        if ctx.compute_dtype is not None:
            x = x.to(ctx.compute_dtype)
            bias = None if bias is None else bias.to(ctx.compute_dtype)
        if isinstance(alpha, torch.Tensor):
            ctx.save_for_backward(x, weight, mask, alpha)
        else:
            ctx.alpha = alpha
            ctx.save_for_backward(x, weight, mask)
        return F.linear(x, weight_eff, bias)

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return (None,) * 7
        x, weight, mask, *alpha = ctx.saved_tensors
        alpha = alpha[0] if alpha else ctx.alpha
        grad_x = grad_w = grad_b = None
        # every dtype below is explicit; an autocast around backward must not change them
        with torch.autocast(ctx.device_type, enabled=False):
            if ctx.needs_input_grad[0]:
                weight_eff = _masked(weight, mask, alpha, grad.dtype)
                grad_x = grad.matmul(weight_eff).to(ctx.x_dtype)
            flat_grad = grad.reshape(-1, grad.shape[-1])
            if ctx.needs_input_grad[1]:
                grad_w = flat_grad.t().matmul(x.reshape(-1, x.shape[-1])).to(ctx.weight_dtype)
                # grad_w is a new tensor of this function's own: edited in place
                grad_w = _straight_through(
                    grad_w, weight, mask, ctx.srste_lambda, ctx.freeze_pruned, in_place=True
                )
            if ctx.needs_input_grad[2]:
                grad_b = flat_grad.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None


def sparse_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor,
    alpha: float | torch.Tensor = 0.0,
    srste_lambda: float = 0.0,
    freeze_pruned: bool = False,
) -> torch.Tensor:
    """Functional form of `SparseLinear` (see its docstring for the contract)."""
    return SparseLinear.apply(x, weight, bias, mask, alpha, srste_lambda, freeze_pruned)
