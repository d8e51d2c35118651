"""Semi-structured (2:4) sparse kernels: layer selection everywhere, the swap on a CUDA GPU only."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_vit

from nmsparse_hf import NMSparsifier, NMSparsityConfig, NMSparsityError
from nmsparse_hf.export.inference import (
    cuda_semi_structured_available,
    semi_structured_candidates,
    to_semi_structured,
)


def _finalized(hidden=64, **cfg):
    model = tiny_vit(hidden=hidden)
    sp = NMSparsifier(model, NMSparsityConfig(**cfg), total_steps=1)
    sp.finalize()
    return model, list(sp.layers)


def test_candidates_need_2_of_4_and_kernel_shapes():
    model, names = _finalized(hidden=64, n_keep=2, m=4, locations="FF,Q")
    got = {c.name: c for c in semi_structured_candidates(model, names + ["classifier"])}
    # fc1 is 128x64, fc2 64x128, q 64x64: multiples of every backend's minimum shape
    assert all(got[n].ok for n in names)
    assert not got["classifier"].ok and got["classifier"].reason  # 10x64, dense
    model, names = _finalized(hidden=24, n_keep=2, m=4)
    cand = semi_structured_candidates(model, names)
    assert any(not c.ok and "multiple of" in c.reason for c in cand)
    # 1:8 is sparser than 2:4: it runs on the 2:4 kernels too; dense weights do not
    model, names = _finalized(hidden=64, n_keep=1, m=8)
    assert all(c.ok for c in semi_structured_candidates(model, names))
    dense = tiny_vit(hidden=64)
    assert all(not c.ok and "2:4" in c.reason for c in semi_structured_candidates(dense, names))
    with pytest.raises(NMSparsityError, match="float16 or bfloat16"):
        semi_structured_candidates(model, names, torch.float32)


def test_swap_without_gpu_is_a_clear_error():
    available, reason = cuda_semi_structured_available()
    if available:
        pytest.skip("a GPU is present: the swap itself is tested below")
    model, names = _finalized()
    with pytest.raises(NMSparsityError, match="CUDA"):
        to_semi_structured(model, names)


@pytest.mark.skipif(
    not cuda_semi_structured_available()[0],
    reason=f"semi-structured kernels: {cuda_semi_structured_available()[1]}",
)
def test_swap_on_gpu_keeps_logits():
    model, names = _finalized(hidden=128, n_keep=2, m=4, locations="FF,QKV,O")
    for layer in names:
        dict(model.named_modules())[layer].__dict__.pop("forward", None)
    model = model.half().cuda().eval()
    x = torch.randn(4, 3, 32, 32, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        ref = model(pixel_values=x).logits
        swapped = to_semi_structured(model, names)
        out = model(pixel_values=x).logits
    assert any(c.ok for c in swapped)
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
