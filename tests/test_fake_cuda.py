"""GPU readiness without a GPU: sparse forwards on fake CUDA tensors.

Under ``FakeTensorMode`` a model built on CPU and moved with ``.to("cuda")`` runs its forward on
fake CUDA tensors (no data, shapes/dtypes/devices only), and any operation that mixes a CUDA
tensor with a CPU tensor (other than a 0-d scalar, which CUDA kernels accept too) raises as it
would on a GPU. So each test proves that no tensor of the sparse path is created on the wrong
device: the output and every mask are on ``cuda``.

Dtypes: ``torch.autocast("cuda")`` disables itself without CUDA, so autocast is switched on with
the low-level setters (``torch.set_autocast_enabled("cuda", True)``), which fake kernels honour:
the sparse model must then produce the dtype the dense model produces. A bf16 model (no autocast)
is checked too. Backward needs a real device context and is covered on CPU elsewhere
(tests/test_fused.py, tests/test_autograd.py).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from _tiny_text import example_inputs, tiny_text_model
from conftest import tiny_swin, tiny_swinv2, tiny_timm_vit, tiny_vit
from torch._subclasses.fake_tensor import FakeTensorMode

from nmsparse_hf import NMSparsifier, NMSparsityConfig
from nmsparse_hf.sparsifier import ATTR

# recipe -> (config fields, 0-based optimizer step of the 10-step run to test at, phase expected)
_BASE = dict(n_keep=1, m=4, locations="FF,QKV")
RECIPES: dict[str, tuple[dict, int, str]] = {
    "dense": (dict(_BASE, sparsity_type="dense"), 3, "dense"),
    "dense-phase": (dict(_BASE, dense_fraction=0.3), 1, "dense"),
    "STE": (_BASE, 3, "sparse"),
    "SR-STE": (dict(_BASE, sparsity_type="srste"), 3, "sparse"),
    "MDGF-lin": (dict(_BASE, decay_type="linear", decay_coef=0.1), 3, "sparse"),
    "MDGF-exp": (dict(_BASE, decay_type="exp", decay_coef=0.1), 3, "sparse"),
    "SDGF-step": (dict(_BASE, structure_decay=True), 3, "sparse"),
    "SDGF-geo": (
        dict(
            _BASE,
            structure_decay=True,
            structure_decay_type="fine",
            structure_decay_start_k=2,
        ),
        3,
        "sparse",
    ),
    "finetune-recompute": (dict(_BASE, decay_type="exp", finetune_fraction=0.5), 7, "finetune"),
    "finetune-frozen": (
        dict(_BASE, sparsity_type="srste", finetune_fraction=0.5, finetune_mask="frozen"),
        7,
        "finetune",
    ),
}


def _image_inputs(model) -> dict:
    return {"pixel_values": torch.randn(2, 3, 32, 32, device="cuda")}


def _text_inputs(task: str):
    def make(model) -> dict:
        return {k: v.to("cuda") for k, v in example_inputs(task).items()}

    return make


# family -> (model builder, inputs on cuda, locations)
FAMILIES = {
    "vit": (tiny_vit, _image_inputs, "FF,QKV,O"),
    "swin": (tiny_swin, _image_inputs, "FF,QKV,O"),
    "swinv2": (tiny_swinv2, _image_inputs, "FF,QKV,O"),
    "timm-vit": (tiny_timm_vit, _image_inputs, "FF,QKV,O"),
    "bert": (lambda: tiny_text_model("bert"), _text_inputs("cls"), "FF,QKV,O"),
    "llama": (lambda: tiny_text_model("llama"), _text_inputs("lm"), "FF,QKV,O"),
    "gpt2": (lambda: tiny_text_model("gpt2"), _text_inputs("lm"), "FF,QKV,O"),
}


@contextlib.contextmanager
def cuda_autocast(dtype: torch.dtype):
    """CUDA autocast switched on even without CUDA (``torch.autocast`` would disable itself)."""
    enabled, old_dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()  # as torch.autocast does: casts of weights are cached
        torch.set_autocast_enabled("cuda", enabled)
        torch.set_autocast_dtype("cuda", old_dtype)


def _output(result) -> torch.Tensor:
    return result.logits if hasattr(result, "logits") else result[0]


def _check_masks_on_cuda(sparsifier: NMSparsifier) -> None:
    for target in sparsifier.targets:
        state = getattr(target.module, ATTR)
        weight = target.module.weight
        assert weight.device.type == "cuda", target.name
        if not state.masked:
            continue
        laid_out = weight.t() if target.fan_in_fan_out else weight
        mask = state.mask(laid_out)
        assert mask.device.type == "cuda" and mask.dtype == torch.bool, target.name
        assert mask.shape == laid_out.shape, target.name
        if state.frozen_mask is not None:
            assert state.frozen_mask.device.type == "cuda", target.name


def _fake_cuda_forward(model, sparsifier, step, make_inputs, dtype=None, autocast=None):
    """Move ``model`` to fake CUDA (``dtype`` if given), apply ``step``'s plan there, run the
    forward (under CUDA autocast to ``autocast`` if given); return (output, dense-output dtype)."""
    if dtype is not None:
        model.to(dtype)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to("cuda")
        if sparsifier is not None:
            sparsifier.update(step)
            _check_masks_on_cuda(sparsifier)
        inputs = make_inputs(model)
        if dtype is not None and "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        with cuda_autocast(autocast) if autocast else contextlib.nullcontext():
            out = _output(model(**inputs))
            if sparsifier is not None:
                sparsifier.detach()
            dense_dtype = _output(model(**inputs)).dtype
    return out, dense_dtype


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("precision", ["fp32", "bf16", "autocast-bf16", "autocast-fp16"])
def test_every_recipe_runs_on_fake_cuda(recipe, precision):
    fields, step, phase = RECIPES[recipe]
    model = tiny_vit()
    sparsifier = NMSparsifier(model, NMSparsityConfig(**fields), total_steps=10)
    # the plan on CPU first (a frozen fine-tune mask is then computed on CPU, before the move)
    assert sparsifier.update(step).phase == phase
    dtype = torch.bfloat16 if precision == "bf16" else None
    autocast = {"autocast-bf16": torch.bfloat16, "autocast-fp16": torch.float16}.get(precision)
    out, dense_dtype = _fake_cuda_forward(model, sparsifier, step, _image_inputs, dtype, autocast)
    assert out.device.type == "cuda"
    assert out.shape == (2, 10)
    assert out.dtype == dense_dtype == (autocast or dtype or torch.float32)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "autocast-bf16"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_runs_on_fake_cuda(family, precision):
    build, make_inputs, locations = FAMILIES[family]
    model = build()
    config = NMSparsityConfig(n_keep=1, m=4, locations=locations, decay_type="exp")
    sparsifier = NMSparsifier(model, config, total_steps=10)
    assert sparsifier.targets
    dtype = torch.bfloat16 if precision == "bf16" else None
    autocast = torch.bfloat16 if precision == "autocast-bf16" else None
    out, dense_dtype = _fake_cuda_forward(model, sparsifier, 3, make_inputs, dtype, autocast)
    assert out.device.type == "cuda"
    assert out.dtype == dense_dtype


def test_sparse_linear_follows_cuda_autocast():
    """Inside one layer: the sparse Linear's output has F.linear's autocast dtype on CUDA."""
    linear = torch.nn.Linear(16, 8)
    sparsifier_model = torch.nn.Sequential()
    sparsifier_model.add_module("fc1", linear)
    config = NMSparsityConfig(n_keep=2, m=4, target_modules=["fc1"], decay_type="exp")
    sparsifier = NMSparsifier(sparsifier_model, config, total_steps=10)
    with FakeTensorMode(allow_non_fake_inputs=True):
        sparsifier_model.to("cuda")
        sparsifier.update(2)
        x = torch.randn(4, 16, device="cuda")
        for dtype in (torch.bfloat16, torch.float16):
            with cuda_autocast(dtype):
                y = linear(x)
                reference = torch.nn.functional.linear(x, linear.weight, linear.bias)
            assert y.device.type == "cuda" and y.dtype == reference.dtype == dtype
        assert linear(x).dtype == torch.float32


def test_frozen_mask_follows_the_model_to_cuda():
    """A frozen fine-tune mask computed on CPU moves with the model: the next `update` (which
    zeroes the pruned weights again) runs on the device the weights are on."""
    model = tiny_vit()
    config = NMSparsityConfig(n_keep=1, m=4, finetune_fraction=0.5, finetune_mask="frozen")
    sparsifier = NMSparsifier(model, config, total_steps=10)
    sparsifier.update(6)
    cpu_masks = {n: s.frozen_mask.clone() for n, s in sparsifier.layers.items()}
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to("cuda")
        sparsifier.update(7)
        for name, state in sparsifier.layers.items():
            assert state.frozen_mask.device.type == "cuda", name
            assert state.frozen_mask.shape == cpu_masks[name].shape
