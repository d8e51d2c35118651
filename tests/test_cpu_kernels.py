"""The native CPU kernels (`nmsparse_hf.cpu_kernels`) give the ATen path's bits, take only what they
are written for, and are built, cached and refused as documented."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from nmsparse_hf import cpu_kernels
from nmsparse_hf.autograd import _masked, _straight_through
from nmsparse_hf.masks import nm_mask

pytestmark = pytest.mark.skipif(
    not cpu_kernels.available(),
    reason=f"native CPU kernels unavailable: {cpu_kernels.unavailable_reason()}",
)

NAN_PAYLOADS = [0x7FC00000, 0x7FC00001, 0xFFC00000, 0x7F800001, 0x7FFFFFFF]  # incl. -NaN, sNaN


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


def _special(shape, seed: int) -> torch.Tensor:
    """Tie-heavy float32 weights with NaN (several payloads), ±inf, ±0 and subnormals."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-40, -1e-40, float("inf"), -float("inf"), 3.0])
    weight = pool[torch.randint(0, len(pool), shape, generator=g)]
    nan_at = torch.rand(shape, generator=g) < 0.05
    payloads = torch.tensor(NAN_PAYLOADS, dtype=torch.int64).to(torch.int32)
    chosen = payloads[torch.randint(0, len(NAN_PAYLOADS), shape, generator=g)]
    weight.view(torch.int32)[nan_at] = chosen[nan_at]
    return weight


def _weights(shape, seed: int):
    g = torch.Generator().manual_seed(seed)
    yield "random", torch.randn(shape, generator=g)
    yield "ternary", torch.randint(-1, 2, shape, generator=g).float()
    yield "special", _special(shape, seed)


@pytest.mark.parametrize("m", cpu_kernels.MASK_GROUP_SIZES)
def test_every_mask_equals_the_aten_path(m):
    """Every N of M = 4, 8, 16 and N <= 16 of M = 32, 64 (and 5 groups of M, not a multiple of the
    four groups the long kernel takes at once) on tie-free, tie-heavy and NaN/inf/±0/subnormal
    weights: the same mask as the ATen kernels (themselves checked against a stable-sort oracle in
    test_masks.py)."""
    for n in range(1, min(m, cpu_kernels.PEELED_MAX_N + 1)):
        for kind, weight in _weights((5, m) if n % 3 == 0 else (48, 192), seed=n * 100 + m):
            native = cpu_kernels.nm_mask(weight, n, m)
            assert native is not None and native.dtype == torch.bool
            with cpu_kernels.disabled():
                expected = nm_mask(weight, n, m)
            assert torch.equal(native, expected), (n, m, kind)
            assert torch.equal(nm_mask(weight, n, m), native)  # the public function takes it


def test_mask_of_a_1x1_conv_and_a_row_block_view():
    """Conv2d weights with 1x1 kernels and contiguous row blocks group along the last dimension too."""
    weight = torch.randn(32, 64, 1, 1)
    with cpu_kernels.disabled():
        expected = nm_mask(weight, 2, 8)
    assert torch.equal(cpu_kernels.nm_mask(weight, 2, 8), expected)
    rows = torch.randn(64, 32)[16:48]
    with cpu_kernels.disabled():
        expected = nm_mask(rows, 1, 4)
    assert torch.equal(cpu_kernels.nm_mask(rows, 1, 4), expected)


def test_long_groups_keep_more_than_16_through_aten():
    weight = torch.randn(8, 64)
    assert cpu_kernels.has_mask_kernel(16, 64) and not cpu_kernels.has_mask_kernel(17, 64)
    assert cpu_kernels.nm_mask(weight, 17, 64) is None
    assert cpu_kernels.nm_mask(weight, 20, 32) is None
    assert nm_mask(weight, 17, 64).sum() == 8 * 17


@pytest.mark.parametrize(
    "case",
    ["m=2", "m=128", "float64", "bfloat16", "transposed", "meta", "subclass"],
)
def test_what_the_kernels_refuse_goes_to_aten(case):
    weight = torch.randn(16, 64)
    arguments = {
        "m=2": (weight, 1, 2),
        "m=128": (torch.randn(16, 128), 4, 128),
        "float64": (weight.double(), 1, 8),
        "bfloat16": (weight.bfloat16(), 1, 8),
        "transposed": (weight.t(), 1, 8),
        "meta": (weight.to("meta"), 1, 8),
        "subclass": (weight.as_subclass(_Marked), 1, 8),
    }[case]
    assert cpu_kernels.nm_mask(*arguments) is None
    mask = torch.rand(16, 64) > 0.5
    if case in ("float64", "bfloat16", "transposed", "meta"):
        w = arguments[0]
        assert cpu_kernels.masked(w, mask.t() if case == "transposed" else mask, 0.5) is None
        grad = w.clone()
        assert not cpu_kernels.straight_through_(grad, w, mask.reshape(w.shape), 2e-4, True)


class _Marked(torch.Tensor):
    pass


def test_column_groups_and_conv_kernels_use_aten(monkeypatch):
    """Groups that do not run along the last dimension never reach the C kernel."""

    def refuse(*args):
        raise AssertionError("the C kernel was called")

    monkeypatch.setattr(cpu_kernels, "nm_mask", refuse)
    for weight, dim in ((torch.randn(64, 32), "col"), (torch.randn(16, 32, 3, 3), "row")):
        assert nm_mask(weight, 1, 8, dim).sum() == weight.numel() // 8


ALPHAS = [0.0, 0.25, 0.37, 1.0, 1e-30, 1e-45, torch.tensor(0.37), torch.tensor(0.0)]


def test_effective_weight_equals_the_aten_path():
    for kind, weight in _weights((64, 48), seed=3):
        mask = torch.rand(64, 48, generator=torch.Generator().manual_seed(4)) > 0.5
        for alpha in ALPHAS:
            native = cpu_kernels.masked(weight, mask, alpha)
            assert native is not None
            with cpu_kernels.disabled():
                expected = _masked(weight, mask, alpha)
            assert torch.equal(_bits(native), _bits(expected)), (kind, alpha)


def test_gradient_terms_equal_the_aten_path():
    g = torch.Generator().manual_seed(5)
    for kind, weight in _weights((64, 48), seed=6):
        mask = torch.rand(64, 48, generator=g) > 0.5
        for _, grad in _weights((64, 48), seed=7):
            for lam, freeze in ((2e-4, False), (0.0, True), (2e-4, True), (3.5, False)):
                native = grad.clone()
                assert cpu_kernels.straight_through_(native, weight, mask, lam, freeze)
                with cpu_kernels.disabled():
                    expected = _straight_through(grad.clone(), weight, mask, lam, freeze, True)
                assert torch.equal(_bits(native), _bits(expected)), (kind, lam, freeze)


def test_training_steps_are_bit_identical_with_and_without_the_kernels():
    """SR-STE, MDGF and a frozen fine-tune on a tiny ViT: the same parameters after a few steps."""
    from conftest import tiny_vit

    from nmsparse_hf import NMSparsifier, NMSparsityConfig

    def train(config_kwargs):
        model = tiny_vit()
        config = NMSparsityConfig(target_modules=["fc1", "fc2"], **config_kwargs)
        sparsifier = NMSparsifier(model, config, total_steps=6)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        g = torch.Generator().manual_seed(1)
        for step in range(6):
            sparsifier.update(step)
            x = torch.randn(4, 3, 32, 32, generator=g)
            model(pixel_values=x).logits.square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        return [p.detach().clone() for p in model.parameters()]

    for config_kwargs in (
        {"sparsity_type": "srste", "n_keep": 1, "m": 8, "srste_lambda": 0.5},
        {"n_keep": 2, "m": 4, "decay_type": "exp", "decay_coef": 0.2},
        {"n_keep": 1, "m": 8, "structure_decay": True},
        {"n_keep": 1, "m": 4, "finetune_fraction": 0.5, "finetune_mask": "frozen"},
    ):
        native = train(config_kwargs)
        with cpu_kernels.disabled():
            aten = train(config_kwargs)
        assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(native, aten, strict=True)), (
            config_kwargs
        )


def _probe(env: dict[str, str]) -> dict:
    """Import the package in a fresh process with ``env`` and report what the kernels did."""
    code = (
        "import json, torch; from nmsparse_hf import cpu_kernels, nm_mask;"
        "w = torch.randn(8, 16);"
        "print(json.dumps({'available': cpu_kernels.available(),"
        " 'reason': cpu_kernels.unavailable_reason(),"
        " 'kept': int(nm_mask(w, 1, 8).sum())}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_built_once_into_the_cache_and_reused(tmp_path):
    first = _probe({"NMSPARSE_HF_CACHE": str(tmp_path)})
    built = sorted(p.name for p in tmp_path.iterdir())
    assert first["available"] and len(built) == 1 and built[0].endswith(".so"), built
    stamp = (tmp_path / built[0]).stat().st_mtime_ns
    assert _probe({"NMSPARSE_HF_CACHE": str(tmp_path)})["available"]
    assert (tmp_path / built[0]).stat().st_mtime_ns == stamp  # loaded, not rebuilt
    assert sorted(p.name for p in tmp_path.iterdir()) == built  # no scratch files left


def test_processes_building_at_once_all_load_it(tmp_path):
    env = {**os.environ, "NMSPARSE_HF_CACHE": str(tmp_path)}
    code = "from nmsparse_hf import cpu_kernels; assert cpu_kernels.available()"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env) for _ in range(3)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0]
    assert len([p for p in tmp_path.iterdir() if p.suffix == ".so"]) == 1


def test_no_compiler_and_the_switch_fall_back_to_aten_with_a_reason(tmp_path):
    broken = _probe({"NMSPARSE_HF_CACHE": str(tmp_path), "CC": "/nonexistent/cc"})
    assert not broken["available"] and "/nonexistent/cc" in broken["reason"]
    assert broken["kept"] == 16  # masks still work, through ATen
    for value in ("0", "off"):
        off = _probe({"NMSPARSE_HF_CPU_KERNELS": value})
        assert not off["available"] and f"NMSPARSE_HF_CPU_KERNELS={value}" in off["reason"]
        assert off["kept"] == 16
    assert list(tmp_path.iterdir()) == []
