"""Shared fixtures: tiny models built from configs (no network), seeded."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one intra-op thread per xdist worker (the suite runs one worker per core): more OpenMP
    # threads than cores spin against each other, which made tiny-model tests several times
    # slower; the subprocesses that tests start get OMP_NUM_THREADS=1 the same way
    torch.set_num_threads(1)


def tiny_vit(
    hidden: int = 64,
    layers: int = 2,
    image: int = 32,
    patch: int = 8,
    labels: int = 10,
    channels: int = 3,
    seed: int = 0,
):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    return ViTForImageClassification(
        ViTConfig(
            image_size=image,
            patch_size=patch,
            num_channels=channels,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=2 * hidden,
            num_labels=labels,
        )
    )


def _tiny_swin_family(config_cls, model_cls, seed: int):
    torch.manual_seed(seed)
    return model_cls(
        config_cls(
            image_size=32,
            patch_size=4,
            embed_dim=32,
            depths=[1, 1],
            num_heads=[2, 2],
            window_size=4,
            num_labels=10,
        )
    )


def tiny_swin(seed: int = 0):
    from transformers import SwinConfig, SwinForImageClassification

    return _tiny_swin_family(SwinConfig, SwinForImageClassification, seed)


def tiny_swinv2(seed: int = 0):
    from transformers import Swinv2Config, Swinv2ForImageClassification

    return _tiny_swin_family(Swinv2Config, Swinv2ForImageClassification, seed)


def tiny_timm_vit(seed: int = 0):
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    torch.manual_seed(seed)
    return TimmWrapperForImageClassification(
        TimmWrapperConfig(
            architecture="vit_tiny_patch16_224",
            num_labels=10,
            model_args={
                "img_size": 32,
                "patch_size": 8,
                "embed_dim": 64,
                "depth": 2,
                "num_heads": 2,
            },
        )
    )


@pytest.fixture
def vit():
    return tiny_vit()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)


class RandomImages(torch.utils.data.Dataset):
    """``n`` seeded random 3x32x32 images with labels in 0..9, as Trainer examples."""

    def __init__(self, n: int = 32, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 32, 32, generator=g)
        self.y = torch.randint(0, 10, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a rendezvous of test processes)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_command(script, *args: str) -> list[str]:
    """The command that runs ``script args...`` as two processes on this machine (``torchrun``,
    rendezvous on a free local port)."""
    return [
        str(Path(sys.executable).parent / "torchrun"),
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(script),
        *args,
    ]


def tiny_training_args(output_dir, **overrides):
    """`SparseTrainingArguments` for the tiny test runs: CPU, seeded, no reporting, no saving."""
    from nmsparse_hf.integrations import SparseTrainingArguments

    values = dict(
        output_dir=str(output_dir),
        max_steps=8,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        logging_steps=2,
        save_strategy="no",
        report_to=[],
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    values.update(overrides)
    return SparseTrainingArguments(**values)


# 1:4 on FF and Q, K, V with MDGF-exp; over 8 steps: dense 0-1, sparse 2-5, fine-tune 6-7
TINY_SPARSITY = dict(
    n_keep=1,
    m=4,
    locations="FF,QKV",
    decay_type="exp",
    decay_coef=0.2,
    dense_fraction=0.25,
    finetune_fraction=0.25,
)


# flags that make a recipe run tiny: a few steps on a few digits, no evaluation during training
TINY_RECIPE_FLAGS = [
    "--max_steps",
    "6",
    "--eval_strategy",
    "no",
    "--logging_steps",
    "3",
    "--per_device_train_batch_size",
    "16",
    "--max_train_samples",
    "200",
    "--max_eval_samples",
    "64",
]
