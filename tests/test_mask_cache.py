"""One mask per optimizer step: the cache of `LayerSparsity.mask` (docs/METHOD.md §4, Cadence).

The micro-steps of one optimizer step (gradient accumulation) see the same weights, so they share
one mask. The cache is keyed by the weight's storage address, layout and autograd version counter
and cleared when `NMSparsifier.update(step)` moves to another step. These tests pin what invalidates it (a new step,
an in-place change, a replaced tensor, a moved model) and that training with it is bitwise the
training without it; and they pin the one thing the key cannot see, a rewrite that keeps the
version counter (FSDP2's all-gather into the unsharded parameter does that), which is safe because
such a rewrite only brings new values after an optimizer step, and every optimizer step starts
with `update(step)`.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_vit

from nmsparse_hf import NMSparsifier, NMSparsityConfig
from nmsparse_hf import sparsifier as sparsifier_module
from nmsparse_hf.masks import nm_mask

RECIPES = {
    "SR-STE": dict(n_keep=1, m=4, locations="FF,QKV", sparsity_type="srste"),
    "MDGF-exp": dict(n_keep=1, m=4, locations="FF,QKV", decay_type="exp", decay_coef=0.1),
}
FC1 = "vit.layers.0.mlp.fc1"


@pytest.fixture
def mask_calls(monkeypatch):
    """Counts the masks the sparsifier computes."""
    calls: list[tuple] = []
    real = sparsifier_module.nm_mask

    def counting(weight, n, m, dim="row"):
        calls.append((tuple(weight.shape), n, m))
        return real(weight, n, m, dim)

    monkeypatch.setattr(sparsifier_module, "nm_mask", counting)
    return calls


def _micro_batches(k: int = 3):
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 10, (2,), generator=g))
        for _ in range(k)
    ]


def _accumulate(model, sparsifier, step, batches, update_every_micro_step=False):
    sparsifier.update(step)
    for x, y in batches:
        if update_every_micro_step:
            sparsifier.update(step)  # the same step again: the cached mask is kept
        model(pixel_values=x, labels=y).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _pair(recipe: str):
    base = tiny_vit()
    ref = copy.deepcopy(base)
    config = NMSparsityConfig(**RECIPES[recipe])
    return (base, NMSparsifier(base, config, 10)), (ref, NMSparsifier(ref, config, 10))


def _fresh_mask(sparsifier, name=FC1):
    state = sparsifier.layers[name]
    weight = dict(sparsifier.model.named_modules())[name].weight
    return nm_mask(weight, *state.patterns[0], state.dim)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_one_mask_per_step_and_bitwise_the_same_training(recipe, mask_calls):
    (model, sp), (ref, ref_sp) = _pair(recipe)
    blocks = sum(len(t.blocks) for t in sp.targets)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref_optimizer = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for step in range(1, 4):  # (the constructor's update(0) computed step 0's masks)
        before = len(mask_calls)
        grads = _accumulate(model, sp, step, _micro_batches())
        assert len(mask_calls) - before == blocks  # 3 micro-steps, one mask per block
        with torch.no_grad():  # an evaluation in the same step reuses it too
            model(pixel_values=_micro_batches(1)[0][0])
        sp.stats()
        assert len(mask_calls) - before == blocks
        ref_grads = _accumulate(ref, ref_sp, step, _micro_batches(), update_every_micro_step=True)
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            assert torch.equal(grads[name], ref_grads[name]), (step, name)
        optimizer.step()
        ref_optimizer.step()
        optimizer.zero_grad()
        ref_optimizer.zero_grad()
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def _forward(model, batches=None):
    x, y = (batches or _micro_batches(1))[0]
    return model(pixel_values=x, labels=y).loss


def test_in_place_change_between_micro_steps_recomputes(mask_calls):
    (model, sp), _ = _pair("MDGF-exp")
    sp.update(1)
    _forward(model).backward()
    fc1 = dict(model.named_modules())[FC1]
    old = sp.layers[FC1].cached_mask[1]
    with torch.no_grad():
        fc1.weight.copy_(fc1.weight.flip(1))  # bumps the version counter
    calls = len(mask_calls)
    _forward(model).backward()
    assert len(mask_calls) == calls + 1  # only fc1 changed
    new = sp.layers[FC1].cached_mask[1]
    assert torch.equal(new, _fresh_mask(sp)) and not torch.equal(new, old)


def test_param_data_swap_recomputes(mask_calls):
    (model, sp), _ = _pair("SR-STE")
    sp.update(1)
    _forward(model).backward()
    fc1 = dict(model.named_modules())[FC1]
    version = fc1.weight._version
    fc1.weight.data = fc1.weight.detach().flip(1).clone()  # .data swap: same version counter
    assert fc1.weight._version == version
    calls = len(mask_calls)
    _forward(model)
    assert len(mask_calls) == calls + 1
    assert torch.equal(sp.layers[FC1].cached_mask[1], _fresh_mask(sp))


def test_moving_the_model_recomputes(mask_calls):
    (model, sp), _ = _pair("SR-STE")
    sp.update(1)
    _forward(model)
    calls = len(mask_calls)
    model.double()
    x, y = _micro_batches(1)[0]
    model(pixel_values=x.double(), labels=y)
    assert len(mask_calls) == calls + sum(len(t.blocks) for t in sp.targets)
    assert sp.layers[FC1].cached_mask[1].equal(_fresh_mask(sp))


def _fsdp2_style_regather(weight: torch.Tensor, values: torch.Tensor) -> None:
    """What FSDP2 does to an unsharded parameter between two forwards: free its storage
    (reshard), allocate it again and copy the all-gathered values in without bumping the
    version counter (``_unsafe_preserve_version_counter``, as torch's FSDP2 does)."""
    storage = weight.untyped_storage()
    nbytes = storage.nbytes()
    storage.resize_(0)
    storage.resize_(nbytes)
    with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(weight):
        weight.copy_(values)


def test_fsdp2_style_regather_within_a_step_gives_the_same_training():
    """Within one optimizer step FSDP2 re-gathers the same values (the shards change only at
    the optimizer step), so a reused mask is the mask of the values the layer multiplies with."""
    (model, sp), (ref, ref_sp) = _pair("SR-STE")
    batches = _micro_batches()
    sp.update(2)
    ref_sp.update(2)
    for i, (x, y) in enumerate(batches):
        if i:
            for name, module in model.named_modules():
                if name in sp.layers:
                    _fsdp2_style_regather(module.weight, module.weight.detach().clone())
        model(pixel_values=x, labels=y).loss.backward()
        ref_sp.update(2)
        ref(pixel_values=x, labels=y).loss.backward()
    assert torch.equal(sp.layers[FC1].cached_mask[1], _fresh_mask(sp))
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name


def test_fsdp2_style_regather_after_an_optimizer_step_is_caught_by_the_step(mask_calls):
    """New values arrive through a version-preserving copy only after an optimizer step, and
    every optimizer step begins with ``update(step)``, which clears the cache. The key alone
    does not see such a rewrite (same storage, same version): that is why the step clears it."""
    (model, sp), _ = _pair("MDGF-exp")
    sp.update(2)
    _forward(model)
    fc1 = dict(model.named_modules())[FC1]
    key = sparsifier_module._mask_key(fc1.weight)
    _fsdp2_style_regather(fc1.weight, fc1.weight.detach().flip(1).clone())  # "after opt.step()"
    assert sparsifier_module._mask_key(fc1.weight)[1:] == key[1:]  # version and layout kept
    calls = len(mask_calls)
    sp.update(3)  # the next optimizer step's forwards begin here (the Trainer's callback)
    _forward(model)
    assert len(mask_calls) > calls
    assert torch.equal(sp.layers[FC1].cached_mask[1], _fresh_mask(sp))


def test_no_cache_for_tensor_subclasses_and_explicit_patterns(mask_calls):
    (model, sp), _ = _pair("SR-STE")
    sp.update(1)
    state = sp.layers[FC1]
    weight = dict(model.named_modules())[FC1].weight
    target = state.target_patterns
    calls = len(mask_calls)
    state.mask(weight, target)
    state.mask(weight, target)
    assert len(mask_calls) == calls + 2  # explicit patterns (finalize, frozen masks): never cached

    class Sub(torch.Tensor):
        pass

    assert sparsifier_module._mask_key(weight.detach().as_subclass(Sub)) is None


def test_trainer_with_gradient_accumulation_computes_one_mask_per_step(tmp_path, mask_calls):
    """In `NMSparseTrainer` the callback calls ``update(step)`` once before each optimizer step's
    micro-batches, so 3 micro-batches per step cost one mask per block, not three."""
    from conftest import RandomImages, tiny_training_args

    from nmsparse_hf.integrations import NMSparseTrainer

    args = tiny_training_args(
        tmp_path,
        max_steps=4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=3,
        logging_steps=100,
        n_keep=1,
        m=4,
        sparsity_type="srste",
    )
    trainer = NMSparseTrainer(model=tiny_vit(), args=args, train_dataset=RandomImages(32))
    trainer.train()
    layers = sum(len(t.blocks) for t in trainer.sparsifier.targets)
    # one mask per block per optimizer step, plus the plan after the last step (what an
    # evaluation there would use) and finalize's target masks (a mask per forward would be
    # 4 x 3 per block, plus finalize's)
    assert len(mask_calls) == (4 + 2) * layers


@pytest.mark.multiprocess
def test_real_fsdp2_gradient_accumulation_is_bitwise_the_same(tmp_path):
    """Two gloo ranks, FSDP2 (`fully_shard`), 3 optimizer steps of 3 micro-batches: the cache
    gives bitwise the gradients and weights of a mask per forward. (FSDP2 frees and re-gathers
    each unsharded weight around every forward, and a re-gathered weight that lands at a new
    address is a cache miss: under FSDP2 most micro-steps recompute their mask, safely.)"""
    import json
    import os
    import subprocess
    from pathlib import Path

    from conftest import torchrun_command

    worker = Path(__file__).with_name("_mask_cache_worker.py")
    cmd = torchrun_command(worker, str(tmp_path))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for e in ranks:
        assert e["sharded"] and e["params_changed"]
        assert e["grads_equal"] and e["params_equal"], e
        steps, micro = 3, 3
        assert e["calls"]["uncached"] == steps * micro * e["blocks"]
        assert e["calls"]["cached"] <= e["calls"]["uncached"]  # FSDP2 re-gathers may move W
