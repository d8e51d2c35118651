"""Distributed training: accelerate configs, DDP through `accelerate launch`, FSDP2 through torchrun.

The multi-process tests start two real CPU processes talking over gloo and assert on evidence each
rank writes (backend, wrapper class, DTensor placements, masks), not only on the exit code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import free_port, tiny_swin, tiny_swinv2, tiny_vit, torchrun_command
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "accelerate_configs"
WORKER = Path(__file__).with_name("_dist_worker.py")
BIN = Path(sys.executable).parent
TIMEOUT = 240


# ---------------------------------------------------------------------------- configs
def _load(name: str):
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(str(CONFIGS / name))


def _layer_classes(config) -> list[str]:
    return [c.strip() for c in config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(",")]


def test_accelerate_configs_parse_with_accelerate():
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType

    single, multi, cpu = _load("single_gpu.yaml"), _load("multi_gpu.yaml"), _load("multi_cpu.yaml")
    assert all(isinstance(c, ClusterConfig) for c in (single, multi, cpu))
    assert single.distributed_type == DistributedType.NO and single.num_processes == 1
    assert multi.distributed_type == DistributedType.MULTI_GPU and multi.num_processes == 8
    assert multi.num_machines == 1 and not multi.use_cpu
    # MULTI_GPU + use_cpu: accelerate launches it through torchrun (MULTI_CPU would start one
    # process), and each process runs on the CPU with gloo
    assert cpu.distributed_type == DistributedType.MULTI_GPU
    assert cpu.num_processes == 2 and cpu.use_cpu is True and cpu.mixed_precision == "no"


@pytest.mark.parametrize(
    ("name", "factory", "layer_cls"),
    [
        ("fsdp.yaml", tiny_vit, "ViTLayer"),
        ("fsdp_swin.yaml", tiny_swin, "SwinLayer"),
        ("fsdp_swinv2.yaml", tiny_swinv2, "Swinv2Layer"),
    ],
)
def test_fsdp_configs_are_fsdp2_and_wrap_real_layer_classes(name, factory, layer_cls):
    import transformers
    from accelerate.utils import DistributedType
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    config = _load(name)
    fsdp = config.fsdp_config
    assert config.distributed_type == DistributedType.FSDP
    assert int(fsdp["fsdp_version"]) == 2
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    assert fsdp["fsdp_reshard_after_forward"] is True
    assert config.mixed_precision == "bf16"
    classes = _layer_classes(config)
    assert classes == [layer_cls]
    assert isinstance(getattr(transformers, layer_cls, None) or _find_class(layer_cls), type)
    # accelerate's own FSDP2 wrap-policy builder finds the class in a model of that family and
    # wraps each transformer layer
    model = factory()
    plugin = SimpleNamespace(
        auto_wrap_policy=transformer_auto_wrap_policy, transformer_cls_names_to_wrap=classes
    )
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = [n for n, m in model.named_modules() if policy(m)]
    assert wrapped and all(
        type(m).__name__ == layer_cls for n, m in model.named_modules() if n in wrapped
    )


def test_fsdp_layer_classes_cannot_be_combined_in_one_config():
    """Why there is one FSDP config per family: accelerate refuses a listed class the model
    does not contain."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    plugin = SimpleNamespace(
        auto_wrap_policy=transformer_auto_wrap_policy,
        transformer_cls_names_to_wrap=["ViTLayer", "SwinLayer"],
    )
    with pytest.raises(ValueError, match="SwinLayer"):
        fsdp2_prepare_auto_wrap_policy(plugin, tiny_vit())


def _find_class(name: str):
    import importlib

    for module in ("vit", "swin", "swinv2"):
        mod = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
        if hasattr(mod, name):
            return getattr(mod, name)
    return None


# ---------------------------------------------------------------------------- launching


def _launch(cmd: list[str], out: Path) -> float:
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        WANDB_DISABLED="true",
    )
    env.pop("ACCELERATE_CONFIG_FILE", None)
    start = time.monotonic()
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            f"{' '.join(cmd)} timed out after {TIMEOUT}s\n{_text(exc.stdout)}\n{_text(exc.stderr)}"
        )
    elapsed = time.monotonic() - start
    if proc.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} failed ({proc.returncode})\nSTDOUT:\n{proc.stdout[-6000:]}"
            f"\nSTDERR:\n{proc.stderr[-12000:]}"
        )
    (out / "launch.log").write_text(proc.stdout + proc.stderr)
    return elapsed


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else str(data or "")


def _evidence(out: Path) -> list[dict]:
    found = sorted(out.glob("rank*.json"))
    assert len(found) == 2, f"expected evidence from 2 ranks in {out}, got {found}"
    return [json.loads(f.read_text()) for f in found]


def _torchrun(out: Path, *extra: str) -> float:
    return _launch(torchrun_command(WORKER, "fsdp", str(out), "--steps", "8", *extra), out)


def _accelerate_launch(mode: str, out: Path) -> float:
    """Two gloo processes through `accelerate launch` with multi_cpu.yaml, running the worker."""
    out.mkdir()
    cmd = [
        str(BIN / "accelerate"),
        "launch",
        "--config_file",
        str(CONFIGS / "multi_cpu.yaml"),
        "--main_process_port",
        str(free_port()),
        str(WORKER),
        mode,
        str(out),
    ]
    return _launch(cmd, out)


# ---------------------------------------------------------------------------- DDP
@pytest.mark.multiprocess
def test_ddp_two_gloo_processes_nmsparse_trainer(tmp_path):
    out = tmp_path / "ddp"
    elapsed = _accelerate_launch("ddp", out)
    ranks = _evidence(out)
    assert sorted(e["rank"] for e in ranks) == [0, 1]
    for e in ranks:
        assert e["world_size"] == 2
        assert e["backend"] == "gloo"
        assert e["wrapper"] == "DistributedDataParallel"  # DDP really ran (not 2 lone runs)
        assert e["device"].startswith("cpu")
        assert e["global_step"] == 8 and e["finalized"]
        # 8 steps, dense 0.25 / fine-tune 0.25: the run went through all three phases
        assert e["phases"] == ["dense"] * 2 + ["sparse"] * 4 + ["finetune"] * 2
    assert ranks[0]["targets"] == ranks[1]["targets"] and len(ranks[0]["targets"]) == 10
    # every rank computed the same masks from the same (all-reduced) weights, bitwise
    t0, t1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    assert t0.keys() == t1.keys()
    mask_keys = [k for k in t0 if k.startswith("step")]
    # masks recorded after each optimizer step whose next plan is masked: steps 2..8
    assert sorted({int(k.split(".")[0][4:]) for k in mask_keys}) == list(range(2, 9))
    assert len(mask_keys) == 10 * 7
    for key in t0:
        assert torch.equal(t0[key], t1[key]), key
    for key in mask_keys:
        assert t0[key].dtype == torch.bool
    # the saved final checkpoint (rank 0) is N:M where its metadata says so
    final = out / "final"
    from nmsparse_hf.export import checkpoint as hub

    if hasattr(hub, "verify_checkpoint"):
        report = hub.verify_checkpoint(final)
        assert report.ok, str(report)
    from transformers import ViTForImageClassification

    from nmsparse_hf import verify_nm

    model = ViTForImageClassification.from_pretrained(final)
    meta = model.config.nm_sparsity
    report = verify_nm(model, layers=meta.get("layers_current") or meta["layers"])
    assert report.ok and len(report.layers) == 10
    card = (final / "README.md").read_text()  # the card says how the run really ran
    assert "| distributed mode | DDP |" in card and "| processes | 2 |" in card
    for name in ranks[0]["targets"]:
        saved = dict(model.named_modules())[name].weight.detach()
        assert torch.equal(saved, t0[f"final.{name}"]), name
    print(f"DDP launch: {elapsed:.1f}s, saved by {ranks[0]['saved_by']}")


# ---------------------------------------------------------------------------- FSDP2
@pytest.mark.multiprocess
def _check_fsdp2_rank(e: dict) -> None:
    """What one rank of the FSDP2 sparsifier run reports (see `_dist_worker.run_fsdp`)."""
    assert e["backend"] == "gloo" and e["world_size"] == 2
    assert e["wrapper"].startswith("FSDP")  # fully_shard swaps in an FSDP* subclass
    assert len(e["params"]) == 10
    for name, p in e["params"].items():
        # at rest: DTensors sharded on dim 0, each rank holding half of the rows
        assert p["is_dtensor"] and p["shard0"] and p["placements"] == ["S(0)"], name
        assert p["dtensor_shape"] == p["full_shape"]
        assert p["local_shape"] == [p["full_shape"][0] // 2, p["full_shape"][1]], name
    phases = [e["steps"][str(s)]["phase"] for s in range(8)]
    assert phases == ["dense"] * 2 + ["sparse"] * 4 + ["finetune"] * 2
    # inside forward the weight is whole (unsharded) and the layer multiplies with W~
    checks = e["hook_checks"]
    assert [c["step"] for c in checks] == list(range(8))
    for c in checks:
        assert not c["weight_is_dtensor"] and c["weight_shape"] == [128, 64]
        assert c["output_matches_effective"], c
        assert c["active"] == (c["step"] >= 2)
    for c in checks[3:]:  # alpha < 1 from the 2nd sparse step: masking changes the output
        assert c["differs_from_dense"], c
    for c in checks[6:]:  # fine-tune: the effective weight is exactly 1:4
        assert c["effective_is_nm"] and c["pattern"] == [1, 4], c
    # finalize() on each rank's local shard (half the rows) passes, and in frozen fine-tune
    # the pruned weights are zeroed on the local shards
    assert e["local_verify_ok"]
    assert all(s[0] in (32, 64) for s in e["local_checked_shapes"].values())
    for f in e["frozen"]:
        assert all(f["nm"].values()) == (f["phase"] == "finetune"), f
    assert sum(f["phase"] == "finetune" for f in e["frozen"]) == 2


def test_fsdp2_sparsifier_sharded_training_and_exact_resume(tmp_path):
    full, first, resumed = tmp_path / "full", tmp_path / "first", tmp_path / "resumed"
    for d in (full, first, resumed):
        d.mkdir()
    times = {"full": _torchrun(full)}
    ranks = _evidence(full)
    assert sorted(e["rank"] for e in ranks) == [0, 1]
    for e in ranks:
        _check_fsdp2_rank(e)
    rank0 = next(e for e in ranks if e["rank"] == 0)
    # the sharded forward gives bitwise the loss of a plain model with the same masks
    assert set(rank0["reference"]) == {"3", "6"}
    for step, ref in rank0["reference"].items():
        assert ref["fsdp_loss"] == pytest.approx(ref["reference_loss"], abs=1e-6), step
    # gathered full weights after finalize: every targeted layer is 1:4 on the whole weight
    assert rank0["full_verify_ok"] and len(rank0["full_checked"]) == 10
    for name, (shape, violations, sparsity) in rank0["full_checked"].items():
        assert violations == 0 and sparsity >= 0.75, name
        assert shape == rank0["params"][name]["full_shape"]

    # stop at step 5 (sparse phase), save with torch.distributed.checkpoint, resume in a new launch
    times["first"] = _torchrun(first, "--stop-at", "5")
    assert (first / "ckpt" / ".metadata").is_file()
    assert len(list((first / "ckpt").glob("*.distcp"))) == 2  # one shard file per rank
    times["resumed"] = _torchrun(resumed, "--resume", str(first / "ckpt"))
    for e in _evidence(resumed):
        assert e["start"] == 5 and sorted(map(int, e["steps"])) == [5, 6, 7]
    a, b = load_file(full / "full.safetensors"), load_file(resumed / "full.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("final.") for k in a)
    diffs = {k: float((a[k].float() - b[k].float()).abs().max()) for k in a}
    assert max(diffs.values()) == 0.0, {k: v for k, v in diffs.items() if v}  # bitwise
    print(f"FSDP2 launches: {times}")


# ---------------------------------------------------------------------------- FSDP2 + Trainer
@pytest.mark.multiprocess
def test_fsdp2_nmsparse_trainer_through_accelerate(tmp_path):
    """NMSparseTrainer with fsdp_version 2 under `accelerate launch` (two gloo processes), with the
    test-only shim that keeps accelerate from turning FSDP into DDP on CPU."""
    out = tmp_path / "fsdp_trainer"
    elapsed = _accelerate_launch("fsdp-trainer", out)
    ranks = _evidence(out)
    assert sorted(e["rank"] for e in ranks) == [0, 1]
    for e in ranks:
        assert e["backend"] == "gloo" and e["world_size"] == 2
        assert e["is_fsdp_enabled"] and e["wrapper"] == "FSDPViTForImageClassification"
        assert len(e["dtensor"]) == 10 and all(e["dtensor"].values())
        assert all(p == ["S(0)"] for p in e["placements"].values())
        assert e["global_step"] == 8 and e["finalized"]
        # on_train_end finalized each rank's local shard; the gathered weights are all 1:4
        assert all(e["full_nm"].values())
        assert e["save_model"] == "ok"
        # the sparse export gathers each sharded weight once (one full state dict), no more
        assert e["sharded_params"] > 0
        assert e["save_gathers"] == e["sharded_params"], (e["save_gathers"], e["sharded_params"])
    # the metadata counts the whole (gathered) weights, not one rank's shard
    (e,) = [e for e in ranks if e["rank"] == 0]
    assert e["metadata_numel"] == e["full_numel"]
    assert e["metadata_nonzeros"] == e["full_nonzeros"]
    assert e["metadata_achieved"] == 1.0 - e["full_nonzeros"] / e["full_numel"]
    # the sparse export gathers the full state dict: a plain checkpoint that verifies
    from nmsparse_hf.export import verify_checkpoint

    assert verify_checkpoint(out / "final").ok
    print(
        f"FSDP2 Trainer launch: {elapsed:.1f}s; metadata numel {ranks[0]['metadata_numel']} "
        f"of whole weights {ranks[0]['full_numel']}"
    )
