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

``--compile`` runs every variant (dense included) through ``torch.compile`` (inductor), as
``TrainingArguments(torch_compile=True)`` would; the warm-up steps then include compilation, and
the memory columns are left out (autograd's saved-tensor hooks do not see inside a compiled graph).

    python bench/step_overhead.py --batch 8 --repeats 5
    python bench/step_overhead.py --batch 8 --repeats 5 --compile --warmup 2
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import types

import torch
import torch._dynamo
import torch.nn.functional as F
from transformers import ViTConfig, ViTForImageClassification

from nmsparse_hf.config import NMSparsityConfig
from nmsparse_hf.sparsifier import ATTR, NMSparsifier

RECIPES: dict[str, dict | None] = {
    "dense": None,
    "STE": {"sparsity_type": "structure_nm", "decay_type": "step"},
    "SR-STE": {"sparsity_type": "srste"},
    "MDGF-exp": {"sparsity_type": "structure_nm", "decay_type": "exp", "decay_coef": 1e-3},
    "SDGF": {"structure_decay": True, "structure_decay_type": "sparsify"},
}


def _unfused_linear_forward(self: torch.nn.Linear, input: torch.Tensor) -> torch.Tensor:
    """``--unfused``: the sparse Linear as it was before `autograd.SparseLinear`, ``F.linear`` on
    W~ from `EffectiveWeight`, which saves W~ (a new fp32 tensor per layer) for backward."""
    return F.linear(input, getattr(self, ATTR).effective(self.weight), self.bias)


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

    def __init__(
        self,
        name: str,
        base: torch.nn.Module,
        recipe: dict | None,
        total_steps: int,
        unfused: bool = False,
        compile: bool = False,
    ):
        self.name = name
        self.model = copy.deepcopy(base).train()
        self.compile = compile
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.sparsifier = None
        if recipe is not None:
            config = NMSparsityConfig(n_keep=2, m=4, sparse_dim="row", locations="FF", **recipe)
            self.sparsifier = NMSparsifier(self.model, config, total_steps=total_steps)
            if unfused:
                for target in self.sparsifier.targets:
                    if target.kind == "linear":
                        target.module.forward = types.MethodType(
                            _unfused_linear_forward, target.module
                        )
        # attach first, then compile (the sparsifier's forwards trace into the graph)
        self.forward = torch.compile(self.model) if compile else self.model
        self.times: list[float] = []
        self.saved: list[int] = []
        self.state_bytes = 0

    def step(self, step: int, pixels: torch.Tensor, labels: torch.Tensor) -> None:
        counter = SavedBytes(self.model)
        start = time.perf_counter()
        if self.sparsifier is not None:
            plan = self.sparsifier.update(step)
            assert plan.phase == "sparse", plan
        if self.compile:
            loss = self.forward(pixel_values=pixels, labels=labels).loss
        else:
            with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
                loss = self.forward(pixel_values=pixels, labels=labels).loss
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
        "--unfused",
        action="store_true",
        help="run the sparse Linears as before the fused SparseLinear: F.linear on W~ from "
        "EffectiveWeight (saves W~ for backward), to compare",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile every variant (dense too); time only, warm-up includes compilation",
    )
    args = parser.parse_args(argv)
    if args.compile and args.unfused:
        parser.error("--compile and --unfused measure different things; pick one")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile:
        # every variant is a copy of the same classes, so they share dynamo's per-code cache; in a
        # real run one model compiles once per distinct phase/pattern (see tests/test_sparsifier)
        torch._dynamo.config.recompile_limit = 64
    names = ["dense"] + [r for r in args.recipes if r != "dense"]
    base = build_model(args.vit_b, args.layers, args.image_size)
    total_steps = 100_000
    variants = [
        Variant(n, base, RECIPES[n], total_steps, args.unfused, args.compile) for n in names
    ]
    generator = torch.Generator().manual_seed(0)
    size = args.image_size
    pixels = torch.randn(args.batch, 3, size, size, generator=generator)
    labels = torch.randint(0, 1000, (args.batch,), generator=generator)
    model_name = "ViT-B/16" if args.vit_b else "ViT-S/16"
    print(
        f"{model_name} layers={base.config.num_hidden_layers} image={size} batch={args.batch} "
        f"FF 2:4 row, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"{args.warmup} warm-up + {args.repeats} timed steps per variant, round-robin"
        + (", UNFUSED sparse Linear (F.linear on W~)" if args.unfused else "")
        + (", torch.compile (inductor)" if args.compile else "")
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
        if args.compile:
            print(f"{v.name:>9} {med_time(v) * 1e3:9.1f} {med_time(v) / med_time(dense):10.3f}")
            continue
        total = (med_saved(v) + v.state_bytes) / (med_saved(dense) + dense.state_bytes)
        print(
            f"{v.name:>9} {med_time(v) * 1e3:9.1f} {med_time(v) / med_time(dense):10.3f} "
            f"{med_saved(v) / 2**20:9.1f} {med_saved(v) / med_saved(dense):11.3f} {total:19.3f}"
        )
    print("targets: time/dense <= 1.05 and memory/dense <= 1.05 for every recipe")


if __name__ == "__main__":
    main()
