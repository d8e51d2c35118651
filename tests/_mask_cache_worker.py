"""FSDP2 worker for test_mask_cache.py (run by ``torchrun --nproc_per_node 2``, gloo).

    torchrun --nproc_per_node 2 _mask_cache_worker.py OUT

Trains two FSDP2 copies of one tiny ViT (N:M on FF, Q, K, V; SR-STE) with gradient accumulation,
3 optimizer steps of 3 micro-batches: ``cached`` calls ``update(step)`` once per optimizer step
(the micro-steps share one mask per layer), ``uncached`` also drops the cached masks before every
micro-batch (every forward computes its masks). Each rank writes ``rank{r}.json``: how many masks each copy computed,
and whether every parameter shard and gradient shard of the two copies is bitwise equal.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from conftest import tiny_vit  # noqa: E402

STEPS, MICRO = 3, 3


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def main(out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from nmsparse_hf import NMSparsifier, NMSparsityConfig
    from nmsparse_hf import sparsifier as sparsifier_module

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    calls = {"now": "setup", "setup": 0, "cached": 0, "uncached": 0}
    real = sparsifier_module.nm_mask

    def counting(weight, n, m, dim="row"):
        calls[calls["now"]] += 1
        return real(weight, n, m, dim)

    sparsifier_module.nm_mask = counting
    config = NMSparsityConfig(n_keep=1, m=4, locations="FF,QKV", sparsity_type="srste")
    base = tiny_vit()
    runs = {}
    for name in ("cached", "uncached"):
        model = copy.deepcopy(base)
        sparsifier = NMSparsifier(model, config, total_steps=10)
        for layer in model.vit.layers:
            fully_shard(layer)
        fully_shard(model)
        runs[name] = (model, sparsifier, torch.optim.AdamW(model.parameters(), lr=1e-2))
    grads: dict[str, dict[str, torch.Tensor]] = {}
    for step in range(STEPS):
        g = torch.Generator().manual_seed(100 * step + rank)
        batches = [
            (torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 10, (2,), generator=g))
            for _ in range(MICRO)
        ]
        for name, (model, sparsifier, optimizer) in runs.items():
            calls["now"] = name
            sparsifier.update(step)
            for x, y in batches:
                if name == "uncached":  # drop the cached mask: this forward computes its own
                    for state in sparsifier.layers.values():
                        state.cached_mask = None
                (model(pixel_values=x, labels=y).loss / MICRO).backward()
            grads[name] = {
                n: _local(p.grad).clone() for n, p in model.named_parameters() if p.grad is not None
            }
            optimizer.step()
            optimizer.zero_grad()
    params = {
        name: {n: _local(p.detach()).clone() for n, p in runs[name][0].named_parameters()}
        for name in runs
    }
    evidence = {
        "rank": rank,
        "calls": {k: calls[k] for k in ("cached", "uncached")},
        "blocks": sum(len(t.blocks) for t in runs["cached"][1].targets),
        "sharded": any(hasattr(p, "to_local") for p in runs["cached"][0].parameters()),
        "grads_equal": all(
            torch.equal(grads["cached"][n], grads["uncached"][n]) for n in grads["cached"]
        ),
        "params_equal": all(
            torch.equal(params["cached"][n], params["uncached"][n]) for n in params["cached"]
        ),
        # training moved the weights (rows of this rank's shard against the initial ones)
        "params_changed": any(
            not torch.equal(params["cached"][n], p.detach().chunk(world, 0)[rank])
            for n, p in base.named_parameters()
            if n.endswith("mlp.fc1.weight")  # 128 rows: 64 per rank
        ),
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump(evidence, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
