"""Multi-process workers for test_distributed.py (run by `accelerate launch` or `torchrun`).

    accelerate launch --config_file accelerate_configs/multi_cpu.yaml _dist_worker.py ddp OUT
    torchrun --nproc_per_node 2 _dist_worker.py fsdp OUT --steps 8 [--stop-at K] [--resume CKPT]
    torchrun --nproc_per_node 2 _dist_worker.py fsdp-trainer OUT

Each rank writes its evidence to OUT (``rank{r}.json``, ``rank{r}.safetensors``); rank 0 writes the
gathered final weights. The pytest side asserts on those files, not on the exit code alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from conftest import TINY_SPARSITY, RandomImages, tiny_training_args, tiny_vit  # noqa: E402


def _dump(out: str, rank: int, evidence: dict, tensors: dict | None = None) -> None:
    from safetensors.torch import save_file

    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump(evidence, fh, indent=1, default=str)
    if tensors:
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(tensors, os.path.join(out, f"rank{rank}.safetensors"))


# ---------------------------------------------------------------------------------------- DDP
def run_ddp(a) -> None:
    """NMSparseTrainer under `accelerate launch` (two gloo processes, DDP)."""
    import torch.distributed as dist
    from transformers import TrainerCallback

    from nmsparse_hf.integrations import NMSparseTrainer

    model = tiny_vit()
    args = tiny_training_args(
        os.path.join(a.out, "run"),
        max_steps=a.steps,
        per_device_train_batch_size=4,
        **TINY_SPARSITY,
    )
    masks: dict[str, torch.Tensor] = {}
    phases: list[str] = []

    class Record(TrainerCallback):
        """The phase each optimizer step runs in; after each step (with the plan of the next step
        applied) the masks the next forward will use, and the weights."""

        def on_step_begin(self, args, state, control, **kw):
            phases.append(trainer.sparsifier.plan.phase)

        def on_step_end(self, args, state, control, **kw):
            sp = trainer.sparsifier
            for name, layer in sp.layers.items():
                weight = layer_modules[name].weight.detach()
                if layer.active:
                    masks[f"step{state.global_step}.{name}"] = layer.mask(weight)
                masks[f"weight{state.global_step}.{name}"] = weight.clone()

    trainer = NMSparseTrainer(
        model=model, args=args, train_dataset=RandomImages(), callbacks=[Record()]
    )
    layer_modules = dict(model.named_modules())
    trainer.train()
    rank, world = dist.get_rank(), dist.get_world_size()
    for name in trainer.sparsifier.layers:
        masks[f"final.{name}"] = layer_modules[name].weight.detach().clone()
    evidence = {
        "rank": rank,
        "world_size": world,
        "backend": dist.get_backend(),
        "wrapper": type(trainer.model_wrapped).__name__,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "device": str(trainer.args.device),
        "phases": phases,
        "finalized": trainer.sparsifier.finalized,
        "targets": sorted(trainer.sparsifier.layers),
        "global_step": trainer.state.global_step,
    }
    final_dir = os.path.join(a.out, "final")
    trainer.save_model(final_dir)  # collective-safe: every rank calls it
    evidence["saved_by"] = "NMSparseTrainer.save_model"
    trainer.accelerator.wait_for_everyone()
    _dump(a.out, rank, evidence, masks)


# ---------------------------------------------------------------------------------------- FSDP2
def _batch(step: int, rank: int, bs: int = 4):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(bs, 3, 32, 32, generator=g), torch.randint(0, 10, (bs,), generator=g)


def _full_state(model) -> dict[str, torch.Tensor]:
    """The full (gathered) model state dict on rank 0, {} elsewhere (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def _reference_loss(full: dict, step: int, total: int, x, y) -> float:
    """Rank 0: a plain (unsharded) copy with the same weights and the same sparsifier plan."""
    from nmsparse_hf import NMSparsifier, NMSparsityConfig

    ref = tiny_vit()
    ref.load_state_dict(full, strict=True)
    sp = NMSparsifier(ref, NMSparsityConfig(**TINY_SPARSITY), total_steps=total)
    sp.update(step)
    with torch.no_grad():
        return float(ref(pixel_values=x, labels=y).loss)


def _param_evidence(w, full_shape) -> dict:
    """How FSDP2 holds one weight at rest: a DTensor sharded on dim 0, and its shapes."""
    from torch.distributed.tensor import DTensor, Shard

    sharded = isinstance(w, DTensor)
    return {
        "is_dtensor": sharded,
        "placements": [str(p) for p in w.placements] if sharded else None,
        "shard0": sharded and tuple(w.placements) == (Shard(0),),
        "full_shape": full_shape,
        "dtensor_shape": list(w.shape),
        "local_shape": list(w.to_local().shape) if sharded else None,
    }


def _probe_hook(evidence: dict, current: dict):
    """A forward hook recording what the probed layer really multiplies with at each step."""
    from torch.distributed.tensor import DTensor

    from nmsparse_hf import is_nm

    def hook(module, inputs, output):
        state = module._nm_sparse
        weight = module.weight
        record = {
            "step": current["step"],
            "weight_is_dtensor": isinstance(weight, DTensor),
            "weight_shape": list(weight.shape),
            "active": state.active,
        }
        with torch.no_grad():
            eff = state.effective(weight.detach())
            expected = torch.nn.functional.linear(inputs[0], eff, module.bias)
            record["output_matches_effective"] = bool(torch.allclose(output, expected, atol=1e-6))
            if state.active:
                n, m = state.patterns[0]
                record["pattern"] = [n, m]
                record["effective_is_nm"] = is_nm(eff, n, m)
                dense = torch.nn.functional.linear(inputs[0], weight, module.bias)
                record["differs_from_dense"] = not torch.allclose(output, dense)
        evidence["hook_checks"].append(record)

    return hook


def run_fsdp(a) -> None:
    """NMSparsifier attached before `fully_shard`; a plain AdamW loop on gloo; DCP resume."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    from nmsparse_hf import NMSparsifier, NMSparsityConfig

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = tiny_vit()
    full_shapes = {n: list(p.shape) for n, p in model.named_parameters()}
    sp = NMSparsifier(model, NMSparsityConfig(**TINY_SPARSITY), total_steps=a.steps)
    modules = dict(model.named_modules())
    for layer in model.vit.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    evidence: dict = {
        "rank": rank,
        "world_size": world,
        "backend": dist.get_backend(),
        "wrapper": type(model).__name__,
        "params": {},
        "steps": {},
        "hook_checks": [],
        "reference": {},
    }
    for name in sp.layers:
        evidence["params"][name] = _param_evidence(
            modules[name].weight, full_shapes[f"{name}.weight"]
        )

    # inside forward FSDP2 has unsharded the weight: check what the layer really multiplies with
    probe = "vit.layers.0.mlp.fc1"
    current = {"step": 0}
    modules[probe].register_forward_hook(_probe_hook(evidence, current))

    start = 0
    if a.resume:
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=a.resume)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        with open(os.path.join(a.resume, "step.json")) as fh:
            start = json.load(fh)["step"]
    evidence["start"] = start
    stop = a.steps if a.stop_at is None else a.stop_at
    check_reference = {3, 6} if not a.resume else set()
    for step in range(start, stop):
        current["step"] = step
        plan = sp.update(step)
        x, y = _batch(step, rank)
        if step in check_reference:
            full = _full_state(model)  # collective: before the step's forward
        loss = model(pixel_values=x, labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        stats = sp.stats()  # rank-local: realised sparsity and flip rate of the local shard
        evidence["steps"][step] = {
            "phase": plan.phase,
            "loss": float(loss),
            "sparsity_FF": stats.get("sparsity/FF"),
        }
        if step in check_reference and rank == 0:
            ref = _reference_loss(full, step, a.steps, x, y)
            evidence["reference"][step] = {
                "fsdp_loss": float(loss),
                "reference_loss": ref,
                "phase": plan.phase,
            }
    if a.stop_at is not None:
        msd, osd = get_state_dict(model, opt)
        ckpt = os.path.join(a.out, "ckpt")
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
        if rank == 0:
            with open(os.path.join(ckpt, "step.json"), "w") as fh:
                json.dump({"step": stop}, fh)
        dist.barrier()
        _dump(a.out, rank, evidence)
        dist.destroy_process_group()
        return

    evidence["frozen"] = _frozen_finetune_check()
    # dense weights at the end (what an uninterrupted / resumed run must agree on)
    dense = _full_state(model)
    report = sp.finalize()  # row grouping on the local shard of each rank
    evidence["local_verify_ok"] = report.ok
    evidence["local_checked_shapes"] = {c.name: list(c.shape) for c in report.layers}
    final = _full_state(model)
    layers = sp.metadata()["layers"]
    if rank == 0:
        from nmsparse_hf import verify_nm

        plain = tiny_vit()
        plain.load_state_dict(final, strict=True)
        full_report = verify_nm(plain, layers=layers, sparse_dim="row", strict=False)
        evidence["full_verify_ok"] = full_report.ok
        evidence["full_checked"] = {
            c.name: [list(c.shape), c.violations, c.sparsity] for c in full_report.layers
        }
        tensors = {f"dense.{k}": v for k, v in dense.items()}
        tensors.update({f"final.{k}": v for k, v in final.items()})
        save_file(
            {k: v.contiguous() for k, v in tensors.items()}, os.path.join(a.out, "full.safetensors")
        )
    dist.barrier()
    _dump(a.out, rank, evidence)
    dist.destroy_process_group()


def _frozen_finetune_check() -> list[dict]:
    """finetune_mask="frozen" under FSDP2: update() fixes the masks and zeroes the pruned weights
    on each rank's local shard (masked_fill_ on DTensor.to_local()); the gathered weights must
    then be N:M after every optimizer step of the fine-tune phase."""
    from torch.distributed.fsdp import fully_shard

    from nmsparse_hf import NMSparsifier, NMSparsityConfig, is_nm

    model = tiny_vit(seed=1)
    cfg = dict(TINY_SPARSITY, dense_fraction=0.0, finetune_fraction=0.5, finetune_mask="frozen")
    sp = NMSparsifier(model, NMSparsityConfig(**cfg), total_steps=4)
    modules = dict(model.named_modules())
    for layer in model.vit.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out = []
    for step in range(4):
        plan = sp.update(step)
        full = {n: modules[n].weight.full_tensor() for n in sp.layers}  # collective
        out.append(
            {"step": step, "phase": plan.phase, "nm": {n: is_nm(w, 1, 4) for n, w in full.items()}}
        )
        x, y = _batch(step, 0)
        model(pixel_values=x, labels=y).loss.backward()
        opt.step()
        opt.zero_grad()
    return out


# ---------------------------------------------------------------------------- FSDP2 via accelerate
def _force_fsdp_on_cpu() -> None:
    """Test-only shim: accelerate keeps MULTI_CPU (i.e. DDP) when an FSDP plugin is
    given on CPU; switch the state to FSDP right after its init so FSDP2 really runs on gloo."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = init


def run_fsdp_trainer(a) -> None:
    """NMSparseTrainer with fsdp="full_shard" + fsdp_version 2 under `accelerate launch`."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from nmsparse_hf.integrations import NMSparseTrainer

    _force_fsdp_on_cpu()
    model = tiny_vit()
    args = tiny_training_args(
        os.path.join(a.out, "run"),
        max_steps=a.steps,
        per_device_train_batch_size=4,
        fsdp="full_shard",
        fsdp_config={
            "fsdp_version": 2,
            "transformer_layer_cls_to_wrap": ["ViTLayer"],
            "reshard_after_forward": True,
            "state_dict_type": "SHARDED_STATE_DICT",
            "cpu_ram_efficient_loading": False,
        },
        **TINY_SPARSITY,
    )
    trainer = NMSparseTrainer(model=model, args=args, train_dataset=RandomImages())
    trainer.train()
    rank = dist.get_rank()
    modules = dict(trainer.model_wrapped.named_modules())
    weights = {n: modules[n].weight for n in trainer.sparsifier.layers}
    evidence = {
        "rank": rank,
        "world_size": dist.get_world_size(),
        "backend": dist.get_backend(),
        "wrapper": type(trainer.model_wrapped).__name__,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "is_fsdp_enabled": trainer.is_fsdp_enabled,
        "dtensor": {n: isinstance(w, DTensor) for n, w in weights.items()},
        "placements": {
            n: [str(p) for p in w.placements] for n, w in weights.items() if isinstance(w, DTensor)
        },
        "finalized": trainer.sparsifier.finalized,
        "global_step": trainer.state.global_step,
    }
    _dump(a.out, rank, evidence)  # before saving: evidence survives a failing save
    full = {n: w.full_tensor() if isinstance(w, DTensor) else w for n, w in weights.items()}
    from nmsparse_hf import is_nm

    evidence["full_nm"] = {n: is_nm(w.detach(), 1, 4) for n, w in full.items()}
    evidence["full_numel"] = sum(w.numel() for w in full.values())
    evidence["full_nonzeros"] = sum(int((w != 0).sum()) for w in full.values())
    _dump(a.out, rank, evidence)
    # count the all-gathers of the sparse export: one per sharded parameter, no more
    # count the gathers of the sparse export: each sharded parameter is gathered once
    # (get_model_state_dict redistributes every DTensor to a replicated one; full_tensor would too)
    gathers: dict[str, int] = {}
    patched = [(name, getattr(DTensor, name)) for name in ("full_tensor", "redistribute")]

    def counter(key, fn):
        def counting(*args, **kwargs):
            gathers[key] = gathers.get(key, 0) + 1
            return fn(*args, **kwargs)

        return counting

    for name, fn in patched:
        setattr(DTensor, name, counter(name, fn))
    try:
        trainer.save_model(os.path.join(a.out, "final"))
        evidence["save_model"] = "ok"
    except Exception as exc:  # noqa: BLE001 - reported to the test
        evidence["save_model"] = f"{type(exc).__name__}: {exc}"
    finally:
        for name, fn in patched:
            setattr(DTensor, name, fn)
    evidence["save_gathers"] = sum(gathers.values())
    evidence["sharded_params"] = sum(
        isinstance(p, DTensor) for p in trainer.model_wrapped.parameters()
    )
    if rank == 0 and evidence["save_model"] == "ok":
        # what the checkpoint records: counts of the whole weights, not of one shard
        from nmsparse_hf.export import load_sparse_metadata

        meta = load_sparse_metadata(os.path.join(a.out, "final"))
        evidence["metadata_numel"] = meta.numel
        evidence["metadata_nonzeros"] = meta.nonzeros
        evidence["metadata_achieved"] = meta.achieved_sparsity
    _dump(a.out, rank, evidence)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["ddp", "fsdp", "fsdp-trainer"])
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--stop-at", type=int, default=None)
    p.add_argument("--resume", default=None)
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    torch.set_num_threads(1)
    {"ddp": run_ddp, "fsdp": run_fsdp, "fsdp-trainer": run_fsdp_trainer}[a.mode](a)
    import torch.distributed as dist

    if dist.is_initialized():  # gloo left to interpreter shutdown can abort the process
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
