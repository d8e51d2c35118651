"""Where a sparse training step's extra time goes: `update(step)`, forward, backward, optimizer.

    python bench/step_breakdown.py --compile --pattern 1:8 --steps 14 --warmup 3

Builds the ViT-S/16 of `step_overhead.py` (one copy per variant, same initial weights, AdamW) and
runs dense, MDGF-exp and SR-STE round-robin, timing each part of every step separately:
``sparsifier.update(step)`` (the step's masks), the forward with the loss, ``backward()``, and
``optimizer.step()`` + ``zero_grad``. Prints the median of each part per variant over the steps
after ``--warmup``. With ``--compile`` every variant runs under ``torch.compile`` (inductor) and
the sparsifiers compute their masks compiled (``compile_masks``), as ``torch_compile: true`` does.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from step_overhead import RECIPES, TOTAL_STEPS, build_model, keep_heap

from nmsparse_hf import NMSparsifier, NMSparsityConfig

PARTS = ("update", "forward", "backward", "optimizer")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compile", action="store_true", help="torch.compile every variant")
    p.add_argument("--pattern", default="1:8", help="N:M on FF, N kept")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--layers", type=int, default=None, help="encoder blocks (default 12)")
    p.add_argument("--steps", type=int, default=14)
    p.add_argument("--warmup", type=int, default=3)
    a = p.parse_args(argv)
    n_keep, m = (int(v) for v in a.pattern.split(":"))
    heap = keep_heap()  # as step_overhead.py: no page faults from the heap's state in any part
    torch._dynamo.config.recompile_limit = 64
    base = build_model(False, a.layers, a.image_size)
    pixels = torch.randn(a.batch, 3, a.image_size, a.image_size)
    labels = torch.randint(0, 1000, (a.batch,))
    variants = {}
    for name in ("dense", "MDGF-exp", "SR-STE"):
        model = copy.deepcopy(base).train()
        sparsifier = None
        if RECIPES[name] is not None:
            config = NMSparsityConfig(n_keep=n_keep, m=m, locations="FF", **RECIPES[name])
            sparsifier = NMSparsifier(model, config, TOTAL_STEPS, compile_masks=a.compile)
        forward = torch.compile(model) if a.compile else model
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        variants[name] = (sparsifier, forward, optimizer, {part: [] for part in PARTS})
    for step in range(a.steps):
        for sparsifier, forward, optimizer, times in variants.values():
            marks = [time.perf_counter()]
            if sparsifier is not None:
                sparsifier.update(step)
            marks.append(time.perf_counter())
            loss = forward(pixel_values=pixels, labels=labels).loss
            marks.append(time.perf_counter())
            loss.backward()
            marks.append(time.perf_counter())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            marks.append(time.perf_counter())
            if step >= a.warmup:
                for part, start, end in zip(PARTS, marks[:-1], marks[1:], strict=True):
                    times[part].append((end - start) * 1e3)
    mode = "torch.compile (inductor), compile_masks" if a.compile else "eager"
    print(
        f"ViT-S/16 layers={a.layers or 12} image={a.image_size} batch={a.batch} FF {a.pattern} "
        f"row, {mode}, threads {torch.get_num_threads()}, heap kept: {heap}, medians of "
        f"{a.steps - a.warmup} steps (ms)"
    )
    print(f"{'variant':>10}" + "".join(f"{part:>11}" for part in PARTS) + f"{'step':>11}")
    for name, (*_, times) in variants.items():
        medians = [statistics.median(times[part]) for part in PARTS]
        print(f"{name:>10}" + "".join(f"{v:>11.1f}" for v in medians) + f"{sum(medians):>11.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
