"""Train-step time and memory of each N:M recipe relative to dense, on a ViT-S/16-shaped model.

One process builds ``ViTForImageClassification`` from a ``ViTConfig`` (ViT-S/16-224 by default,
``--vit-b`` for ViT-B/16), one copy per variant (same initial weights) with its own AdamW, and runs
the variants round-robin: step k of every variant runs before step k+1 of any, so load from other
processes hits all variants alike. A train step is ``sparsifier.update(step)`` + forward + loss +
backward + ``optimizer.step()`` + ``zero_grad``; the sparsifier is in its sparse phase (masks on
FF, 2:4 row) from the first step.

Memory: torch's CPU allocations are invisible to ``tracemalloc`` and process RSS barely moves when
the allocator reuses freed pages, so the script counts what training actually holds per step:
the bytes of the tensors autograd saves for backward (``saved_tensors_hooks``, unique storages,
parameters excluded since they exist anyway) -- the activation memory, which is where a sparse
forward adds anything -- and, as a second figure, that plus the fixed training state (parameters,
gradients, two AdamW moments).

    python bench/step_overhead.py --batch 8 --repeats 5
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import ViTConfig, ViTForImageClassification

import nmsparse_hf.sparsifier as sparsifier_module
from nmsparse_hf.config import NMSparsityConfig
from nmsparse_hf.sparsifier import NMSparsifier

RECIPES: dict[str, dict | None] = {
    "dense": None,
    "STE": {"sparsity_type": "structure_nm", "decay_type": "step"},
    "SR-STE": {"sparsity_type": "srste"},
    "MDGF-exp": {"sparsity_type": "structure_nm", "decay_type": "exp", "decay_coef": 1e-3},
    "SDGF": {"structure_decay": True, "structure_decay_type": "sparsify"},
}


class PrototypeMaskedLinear(torch.autograd.Function):
    """Prototype (``--prototype-fused``) of a proposed change to sparsifier/autograd: the sparse
    Linear as one Function that saves the bool mask (1 byte per weight) instead of letting
    ``F.linear`` save the fp32 effective weight W~ (4 bytes per weight), and rebuilds W~ in
    backward. Same gradients as `EffectiveWeight` + ``F.linear``: grad_x = g W~, grad_W = g^T x
    (+ lambda (1 - m) W for SR-STE; times m for a frozen fine-tune mask), grad_b = sum g."""

    @staticmethod
    def forward(ctx, x, weight, bias, mask, alpha, srste_lambda, freeze_pruned):
        ctx.alpha, ctx.srste_lambda, ctx.freeze_pruned = alpha, srste_lambda, freeze_pruned
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, mask)
        return F.linear(x, PrototypeMaskedLinear.effective(weight, mask, alpha), bias)

    @staticmethod
    def effective(weight, mask, alpha):
        if isinstance(alpha, torch.Tensor) or alpha != 0:
            return torch.where(mask, weight, weight * alpha)
        return weight * mask

    @staticmethod
    def backward(ctx, grad):
        x, weight, mask = ctx.saved_tensors
        grad_x = grad @ PrototypeMaskedLinear.effective(weight, mask, ctx.alpha)
        flat_g = grad.reshape(-1, grad.shape[-1])
        grad_w = flat_g.t() @ x.reshape(-1, x.shape[-1])
        if ctx.srste_lambda:
            grad_w += ctx.srste_lambda * weight.masked_fill(mask, 0)
        if ctx.freeze_pruned:
            grad_w.masked_fill_(~mask, 0)
        grad_b = flat_g.sum(0) if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None, None, None, None


def _prototype_linear_forward(self, input):
    state = getattr(self, sparsifier_module.ATTR)
    if not state.active or state.final:
        return F.linear(input, self.weight, self.bias)
    return PrototypeMaskedLinear.apply(
        input,
        self.weight,
        self.bias,
        state.mask(self.weight),
        state.alpha,
        state.srste_lambda,
        state.freeze_pruned,
    )


def build_model(vit_b: bool, layers: int | None, image: int) -> ViTForImageClassification:
    hidden, depth, heads, mlp = (768, 12, 12, 3072) if vit_b else (384, 12, 6, 1536)
    config = ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=layers or depth,
        num_attention_heads=heads,
        intermediate_size=mlp,
        image_size=image,
        patch_size=16,
        num_labels=1000,
    )
    torch.manual_seed(0)
    return ViTForImageClassification(config)


class SavedBytes:
    """Counts the unique storage bytes autograd saves for backward, parameters excluded."""

    def __init__(self, model: torch.nn.Module):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.params:
            self.seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    def total(self) -> int:
        return sum(self.seen.values())


class Variant:
    """One model copy with its optimizer and (unless dense) its sparsifier."""

    def __init__(self, name: str, base: torch.nn.Module, recipe: dict | None, total_steps: int):
        self.name = name
        self.model = copy.deepcopy(base).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.sparsifier = None
        if recipe is not None:
            config = NMSparsityConfig(n_keep=2, m=4, sparse_dim="row", locations="FF", **recipe)
            self.sparsifier = NMSparsifier(self.model, config, total_steps=total_steps)
        self.times: list[float] = []
        self.saved: list[int] = []
        self.state_bytes = 0

    def step(self, step: int, pixels: torch.Tensor, labels: torch.Tensor) -> None:
        counter = SavedBytes(self.model)
        start = time.perf_counter()
        if self.sparsifier is not None:
            plan = self.sparsifier.update(step)
            assert plan.phase == "sparse", plan
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            loss = self.model(pixel_values=pixels, labels=labels).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.times.append(time.perf_counter() - start)
        self.saved.append(counter.total())
        if not self.state_bytes:
            params = sum(p.numel() * p.element_size() for p in self.model.parameters())
            self.state_bytes = 4 * params  # weights, gradients, exp_avg, exp_avg_sq


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant")
    parser.add_argument("--layers", type=int, default=None, help="encoder depth (default 12)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--vit-b", action="store_true", help="ViT-B/16 instead of ViT-S/16")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument(
        "--prototype-fused",
        action="store_true",
        help="monkeypatch the sparse Linear forward with PrototypeMaskedLinear (saves the mask, "
        "not W~) to measure that proposed change",
    )
    args = parser.parse_args(argv)
    if args.prototype_fused:
        sparsifier_module._linear_forward = _prototype_linear_forward
    if args.threads:
        torch.set_num_threads(args.threads)
    names = ["dense"] + [r for r in args.recipes if r != "dense"]
    base = build_model(args.vit_b, args.layers, args.image_size)
    total_steps = 100_000
    variants = [Variant(name, base, RECIPES[name], total_steps) for name in names]
    generator = torch.Generator().manual_seed(0)
    size = args.image_size
    pixels = torch.randn(args.batch, 3, size, size, generator=generator)
    labels = torch.randint(0, 1000, (args.batch,), generator=generator)
    model_name = "ViT-B/16" if args.vit_b else "ViT-S/16"
    print(
        f"{model_name} layers={base.config.num_hidden_layers} image={size} batch={args.batch} "
        f"FF 2:4 row, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"{args.warmup} warm-up + {args.repeats} timed steps per variant, round-robin"
        + (", PROTOTYPE fused masked linear" if args.prototype_fused else "")
    )
    for step in range(args.warmup + args.repeats):
        for variant in variants:
            variant.step(step, pixels, labels)
    dense = variants[0]
    skip = args.warmup

    def med_time(v: Variant) -> float:
        return statistics.median(v.times[skip:])

    def med_saved(v: Variant) -> float:
        return statistics.median(v.saved[skip:])

    header = (
        f"{'recipe':>9} {'step ms':>9} {'time/dense':>10} {'saved MB':>9} {'saved/dense':>11} "
        f"{'(saved+state)/dense':>19}"
    )
    print(header)
    print("-" * len(header))
    for v in variants:
        total = (med_saved(v) + v.state_bytes) / (med_saved(dense) + dense.state_bytes)
        print(
            f"{v.name:>9} {med_time(v) * 1e3:9.1f} {med_time(v) / med_time(dense):10.3f} "
            f"{med_saved(v) / 2**20:9.1f} {med_saved(v) / med_saved(dense):11.3f} {total:19.3f}"
        )
    print("targets: time/dense <= 1.05 and memory/dense <= 1.05 for every recipe")


if __name__ == "__main__":
    main()
