"""GPU only: a finalized 2:4 ViT on sparse tensor cores against the same model dense.

    python bench/semi_structured.py [--vit-b] [--batch 64] [--repeats 50]

Finalizes a ViT (random weights; the speed does not depend on training) with 2:4 on FF (and
optionally Q/K/V/O), converts it to fp16 on CUDA, swaps the qualifying linears to
`torch.sparse.to_sparse_semi_structured`, checks the logits match the dense fp16 model, and prints
the median forward time ratio sparse / dense. On a machine without a CUDA GPU (sm80+) it prints why
and exits 0.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys

import torch


def main(argv=None) -> int:
    from transformers import ViTConfig, ViTForImageClassification

    from nmsparse_hf import NMSparsifier, NMSparsityConfig
    from nmsparse_hf.export.inference import cuda_semi_structured_available, to_semi_structured

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vit-b", action="store_true", help="ViT-B/16 instead of ViT-S/16")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--locations", default="FF")
    a = p.parse_args(argv)
    available, reason = cuda_semi_structured_available()
    if not available:
        print(f"SKIPPED: semi-structured sparse kernels {reason}.")
        return 0
    hidden, heads = (768, 12) if a.vit_b else (384, 6)
    torch.manual_seed(0)
    model = ViTForImageClassification(
        ViTConfig(
            hidden_size=hidden,
            num_attention_heads=heads,
            intermediate_size=4 * hidden,
            num_labels=1000,
        )
    )
    sp = NMSparsifier(model, NMSparsityConfig(n_keep=2, m=4, locations=a.locations), 1)
    sp.finalize()
    names = list(sp.layers)
    sp.detach()
    dense = model.half().cuda().eval()
    sparse = copy.deepcopy(dense)
    swapped = to_semi_structured(sparse, names)
    print(
        f"swapped {sum(c.ok for c in swapped)}/{len(swapped)} layers; "
        + "; ".join(f"{c.name}: {c.reason}" for c in swapped if not c.ok)[:500]
    )
    x = torch.randn(a.batch, 3, 224, 224, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        ref, out = dense(pixel_values=x).logits, sparse(pixel_values=x).logits
        err = (ref - out).abs().max().item()
        print(f"max |logits sparse - dense| = {err:.3e}")
        times = {"dense": [], "sparse": []}
        for _ in range(a.repeats):
            for key, m in (("dense", dense), ("sparse", sparse)):
                start, end = torch.cuda.Event(True), torch.cuda.Event(True)
                start.record()
                m(pixel_values=x)
                end.record()
                torch.cuda.synchronize()
                times[key].append(start.elapsed_time(end))
    d, s = statistics.median(times["dense"]), statistics.median(times["sparse"])
    print(
        f"median forward: dense {d:.3f} ms, 2:4 sparse {s:.3f} ms, ratio sparse/dense {s / d:.3f}"
    )
    return 0 if err < 5e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
