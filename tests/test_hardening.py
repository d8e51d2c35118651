"""Hardening: mixed precision, extreme sparsity, long runs."""

from __future__ import annotations

import gc
import math

import pytest
import torch
from conftest import tiny_vit
from torch import nn

from nmsparse_hf import NMSparsifier, NMSparsityConfig, nm_mask


def test_bf16_autocast_trains_and_masks_ignore_compute_dtype(batch):
    x, y = batch
    model = tiny_vit()
    sp = NMSparsifier(
        model, NMSparsityConfig(n_keep=1, m=4, decay_type="exp", decay_coef=0.1), total_steps=6
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fc1 = model.vit.layers[0].mlp.fc1
    seen = []
    fc1.register_forward_hook(lambda mod, inp, out, s=seen: s.append(out.dtype))
    for step in range(6):
        sp.update(step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(pixel_values=x, labels=y).loss
        assert torch.isfinite(loss)
        # the mask comes from the fp32 master weight, whatever dtype the matmul runs in
        state = sp.layers["vit.layers.0.mlp.fc1"]
        assert torch.equal(state.mask(fc1.weight), nm_mask(fc1.weight.float(), 1, 4))
        loss.backward()
        assert fc1.weight.grad.dtype == torch.float32
        opt.step()
        opt.zero_grad()
    assert seen and all(d == torch.bfloat16 for d in seen)
    assert sp.finalize().ok


def test_mask_of_bf16_weight_equals_mask_of_its_fp32_copy():
    w = torch.randn(64, 128).to(torch.bfloat16)
    for n, m in [(2, 4), (1, 8), (1, 32)]:
        assert torch.equal(nm_mask(w, n, m), nm_mask(w.float(), n, m))


class ViTBFeedForward(nn.Module):
    """The two feed-forward linears of a ViT-B block (768 -> 3072 -> 768)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(768, 3072)
        self.fc2 = nn.Linear(3072, 768)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def test_extreme_sparsity_1_of_128_on_vit_b_feed_forward():
    torch.manual_seed(0)
    model = ViTBFeedForward()
    cfg = NMSparsityConfig(
        n_keep=1, m=128, target_modules=["fc1", "fc2"], decay_type="exp", decay_coef=0.5
    )
    sp = NMSparsifier(model, cfg, total_steps=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 768)
    for step in range(4):
        sp.update(step)
        loss = model(x).pow(2).mean()
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
    report = sp.finalize()
    assert report.ok
    for check in report.layers:
        assert check.sparsity == pytest.approx(127 / 128)
    assert (model.fc1.weight != 0).sum(dim=1).eq(768 // 128).all()


@pytest.mark.slow
def test_soak_800_steps_no_nan_flat_memory_final_nm():
    psutil = pytest.importorskip("psutil")
    torch.manual_seed(0)
    model = tiny_vit(hidden=32, layers=1)
    steps = 800
    cfg = NMSparsityConfig(
        n_keep=1,
        m=8,
        locations="FF,QKV",
        decay_type="exp",
        decay_coef=7.0 / (0.6 * steps),
        dense_fraction=0.1,
        finetune_fraction=0.2,
    )
    sp = NMSparsifier(model, cfg, total_steps=steps)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    proc = psutil.Process()
    rss = {}
    phases = set()
    for step in range(steps):
        plan = sp.update(step)
        phases.add(plan.phase)
        i = (step * 4) % 64
        loss = model(pixel_values=x[i : i + 4], labels=y[i : i + 4]).loss
        assert math.isfinite(loss.item()), f"non-finite loss at step {step}"
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0:
            sp.stats()  # logging cadence: must not accumulate state either
        if step in (200, steps - 1):
            gc.collect()
            rss[step] = proc.memory_info().rss
    assert phases == {"dense", "sparse", "finetune"}
    growth_mb = (rss[steps - 1] - rss[200]) / 2**20
    assert growth_mb < 20, f"memory grew by {growth_mb:.1f} MiB between step 200 and {steps}"
    assert sp.finalize().ok
