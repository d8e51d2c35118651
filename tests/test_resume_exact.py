"""A run resumed from a mid-epoch checkpoint ends with the same weights as the uninterrupted run,
with random augmentation on: timm's random resized crop, flip, RandAugment and random erasing,
mixup and cutmix, in fresh processes (the recipe, and tests/_resume_worker.py).

The Trainer skips the batches of the resumed epoch without transforming them; the data pipeline's
draws are keyed by (seed, epoch, sample), so nothing depends on them. Map-style data: the recipe
itself, bitwise equal; two DDP processes (gloo), equal. Streamed data: bitwise equal for a
checkpoint inside the first pass over the stream (the Trainer counts the steps of a stream of
unknown length as one epoch, so after the stream has restarted it skips the wrong batches on
resume: see the README).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "_resume_worker.py"


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }


def _run(out: Path, *extra: str, ranks: int = 1) -> None:
    launcher = [sys.executable]
    if ranks > 1:
        launcher += [
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(ranks),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
        ]
    cmd = [*launcher, str(WORKER), str(out), *extra]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final.safetensors"))


def _batches(out: Path, rank: int = 0) -> list[str]:
    return json.loads((out / f"batches-rank{rank}.json").read_text())


def _assert_resumed_equal(full: Path, resumed: Path, ranks: int = 1) -> None:
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)}/{len(a)} tensors differ after resuming, e.g. {differ[:3]}"
    for rank in range(ranks):  # the resumed run trained on exactly the same last batches
        tail = _batches(resumed, rank)
        assert tail and _batches(full, rank)[-len(tail) :] == tail


@pytest.mark.multiprocess
def test_ddp_two_processes_resume_mid_epoch(tmp_path):
    """Two gloo processes, each its own half of every epoch (3 steps an epoch); resumed from
    checkpoint-4, in the middle of the second epoch."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _run(full, ranks=2)
    assert _batches(full, 0) != _batches(full, 1)  # really two shards of the data
    _run(resumed, "--resume", str(full / "checkpoint-4"), ranks=2)
    a, b = _weights(full), _weights(resumed)
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=1e-6), key
    for rank in (0, 1):
        tail = _batches(resumed, rank)
        assert _batches(full, rank)[-len(tail) :] == tail


@pytest.mark.slow
def test_streaming_resume_within_the_first_pass_is_bitwise_exact(tmp_path):
    """Streamed (shuffle buffer, 4 shards): the stream's first pass is 6 batches; resumed from
    checkpoint-4 the run skips 4 batches of the same seeded order and ends identical."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _run(full, "--streaming", "--max-steps", "6")
    _run(resumed, "--streaming", "--max-steps", "6", "--resume", str(full / "checkpoint-4"))
    _assert_resumed_equal(full, resumed)


RECIPE_RUN = """
import sys
from nmsparse_hf.recipes.image_classification import run
run(["--output_dir", sys.argv[1], "--max_steps", "12", "--save_strategy", "steps",
     "--save_steps", "5", "--max_train_samples", "128", "--max_eval_samples", "32",
     "--per_device_train_batch_size", "16", "--randaugment", "m9-n2", "--mixup_alpha", "0.8",
     "--cutmix_alpha", "1.0", "--label_smoothing_factor", "0.1", "--random_erasing", "0.25",
     "--eval_strategy", "no",
     *sys.argv[2:]], "vit")
"""


@pytest.mark.slow
def test_recipe_resumed_mid_epoch_ends_with_the_same_sparse_model(tmp_path):
    """The default digits recipe with timm's crop, RandAugment, random erasing, mixup/cutmix and
    label smoothing: 8 steps an epoch, 12 steps, resumed from checkpoint-10 (the second epoch,
    2 steps in); the final sparse checkpoints are bitwise equal."""

    def recipe(out: Path, *extra: str) -> None:
        cmd = [sys.executable, "-c", RECIPE_RUN, str(out), *extra]
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    recipe(full)
    recipe(resumed, "--resume_from_checkpoint", str(full / "checkpoint-10"))
    a = load_file(str(full / "final" / "model.safetensors"))
    b = load_file(str(resumed / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)}/{len(a)} tensors differ after resuming"
