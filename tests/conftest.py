"""Shared fixtures: tiny models built from configs (no network), seeded."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("WANDB_DISABLED", "true")


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


def tiny_swin(seed: int = 0):
    from transformers import SwinConfig, SwinForImageClassification

    torch.manual_seed(seed)
    return SwinForImageClassification(
        SwinConfig(
            image_size=32,
            patch_size=4,
            embed_dim=32,
            depths=[1, 1],
            num_heads=[2, 2],
            window_size=4,
            num_labels=10,
        )
    )


def tiny_swinv2(seed: int = 0):
    from transformers import Swinv2Config, Swinv2ForImageClassification

    torch.manual_seed(seed)
    return Swinv2ForImageClassification(
        Swinv2Config(
            image_size=32,
            patch_size=4,
            embed_dim=32,
            depths=[1, 1],
            num_heads=[2, 2],
            window_size=4,
            num_labels=10,
        )
    )


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
