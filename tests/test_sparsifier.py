"""NMSparsifier on real modules: forward/backward per recipe, nothing else changes, export."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_swin, tiny_swinv2, tiny_timm_vit, tiny_vit
from torch import nn

from nmsparse_hf import NMSparsifier, NMSparsityConfig, NMVerificationError, nm_mask, verify_nm

RECIPES = {
    "STE": dict(sparsity_type="structure_nm", decay_type="step"),
    "SR-STE": dict(sparsity_type="srste"),
    "MDGF-linear": dict(decay_type="linear", decay_coef=0.05),
    "MDGF-exp": dict(decay_type="exp", decay_coef=0.1),
    "SDGF-stepwise": dict(structure_decay=True, structure_decay_type="sparsify"),
    "SDGF-geometric": dict(
        structure_decay=True, structure_decay_type="fine", structure_decay_start_k=2
    ),
    "SDGF+MDGF": dict(structure_decay=True, decay_type="exp", decay_coef=0.1),
}


class OneLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 2)
        with torch.no_grad():
            self.fc.weight.copy_(
                torch.tensor(
                    [
                        [0.1, -0.9, 0.3, 0.2, 0.5, 0.05, -0.6, 0.4],
                        [-0.7, 0.2, 0.1, 0.8, 0.3, -0.35, 0.25, 0.0],
                    ]
                )
            )
            self.fc.bias.copy_(torch.tensor([0.5, -0.5]))

    def forward(self, x):
        return self.fc(x)


# 2:4 row masks of OneLinear's weight, by hand
HAND_MASK = torch.tensor(
    [
        [False, True, True, False, True, False, True, False],
        [True, False, False, True, True, True, False, False],
    ]
)


def _run(cfg, step, total=10):
    model = OneLinear()
    sp = NMSparsifier(model, NMSparsityConfig(target_modules=["fc"], **cfg), total_steps=total)
    sp.update(step)
    x = torch.arange(16, dtype=torch.float32).reshape(2, 8) / 10
    G = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    out = model(x)
    (out * G).sum().backward()
    W = model.fc.weight.detach()
    g_eff = G.t() @ x  # dL/dW̃ for out = x W̃ᵀ + b
    return model, sp, x, out, W, g_eff


def test_hand_mask_is_what_nm_mask_computes():
    assert torch.equal(nm_mask(OneLinear().fc.weight, 2, 4), HAND_MASK)


def test_ste_forward_masks_backward_passes_g():
    model, sp, x, out, W, g = _run(RECIPES["STE"], step=0)
    torch.testing.assert_close(out, x @ (W * HAND_MASK).t() + model.fc.bias)
    torch.testing.assert_close(model.fc.weight.grad, g)  # pruned weights get the full g


def test_srste_adds_lambda_times_pruned_weights():
    model, sp, x, out, W, g = _run(dict(sparsity_type="srste", srste_lambda=0.5), step=0)
    torch.testing.assert_close(out, x @ (W * HAND_MASK).t() + model.fc.bias)
    torch.testing.assert_close(model.fc.weight.grad, g + 0.5 * (~HAND_MASK) * W)


@pytest.mark.parametrize("decay, alpha", [("linear", 1 - 0.05 * 3), ("exp", math.exp(-0.05 * 3))])
def test_mdgf_forward_decays_backward_unscaled(decay, alpha):
    # dense for the first 2 of 10 steps: at step 5, j = 3
    cfg = dict(decay_type=decay, decay_coef=0.05, dense_fraction=0.2)
    model, sp, x, out, W, g = _run(cfg, step=5)
    assert sp.plan.j == 3 and sp.plan.alpha == pytest.approx(alpha)
    w_eff = W * (HAND_MASK + alpha * (~HAND_MASK))
    torch.testing.assert_close(out, x @ w_eff.t() + model.fc.bias)
    torch.testing.assert_close(model.fc.weight.grad, g)  # NOT alpha-scaled on pruned weights
    assert not torch.allclose(g * (HAND_MASK + alpha * (~HAND_MASK)), g)


def test_dense_phase_is_untouched():
    model, sp, x, out, W, g = _run(dict(dense_fraction=0.5, decay_type="exp"), step=4)
    assert sp.plan.phase == "dense"
    torch.testing.assert_close(out, x @ W.t() + model.fc.bias, rtol=0, atol=0)
    torch.testing.assert_close(model.fc.weight.grad, g)


def test_finetune_is_binary_even_with_mdgf():
    cfg = dict(decay_type="exp", decay_coef=1e-6, finetune_fraction=0.3)
    model, sp, x, out, W, g = _run(cfg, step=8)
    assert sp.plan.phase == "finetune" and sp.plan.alpha == 0.0
    torch.testing.assert_close(out, x @ (W * HAND_MASK).t() + model.fc.bias)
    torch.testing.assert_close(model.fc.weight.grad, g)


def test_srste_keeps_lambda_in_finetune():
    cfg = dict(sparsity_type="srste", srste_lambda=0.5, finetune_fraction=0.3)
    model, sp, x, out, W, g = _run(cfg, step=9)
    assert sp.plan.phase == "finetune"
    torch.testing.assert_close(model.fc.weight.grad, g + 0.5 * (~HAND_MASK) * W)


def test_sdgf_stage_patterns_on_a_layer():
    cfg = dict(n_keep=1, m=8, structure_decay=True, structure_decay_type="sparsify")
    model = OneLinear()
    sp = NMSparsifier(model, NMSparsityConfig(target_modules=["fc"], **cfg), total_steps=8)
    seen = []
    for step in range(8):
        sp.update(step)
        w_eff = sp.layers["fc"].effective(model.fc.weight).detach()
        seen.append(int((w_eff != 0).sum(dim=1).max()))
    assert seen == [7, 7, 4, 4, 2, 2, 1, 1]


def test_frozen_finetune_keeps_pruned_weights_exactly_zero_through_adamw(batch):
    x, y = batch
    model = tiny_vit()
    cfg = NMSparsityConfig(n_keep=1, m=4, finetune_fraction=0.5, finetune_mask="frozen")
    sp = NMSparsifier(model, cfg, total_steps=8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    fc1 = model.vit.layers[0].mlp.fc1
    frozen = None
    for step in range(8):
        sp.update(step)
        if step >= 4:
            if frozen is None:
                frozen = fc1.weight != 0
                assert (frozen.reshape(-1, 4).sum(-1) == 1).all()
            # pruned weights are exactly zero at every fine-tune step, the mask never moves
            assert torch.equal(fc1.weight != 0, frozen)
        model(pixel_values=x, labels=y).loss.backward()
        if step >= 4:
            assert (fc1.weight.grad[~frozen] == 0).all()
        opt.step()
        opt.zero_grad()
    sp.update(8)
    assert torch.equal(fc1.weight != 0, frozen)
    sp.finalize()


def test_recompute_finetune_mask_follows_weights(batch):
    """Without freezing, the fine-tune mask is recomputed from |W| every step (docs/METHOD.md §4, cadence)."""
    x, y = batch
    model = tiny_vit()
    sp = NMSparsifier(model, NMSparsityConfig(finetune_fraction=0.9), total_steps=10)
    opt = torch.optim.SGD(model.parameters(), lr=5.0)
    fc1 = model.vit.layers[0].mlp.fc1
    masks = []
    for step in range(4):
        sp.update(step)
        masks.append(sp.layers["vit.layers.0.mlp.fc1"].mask(fc1.weight))
        model(pixel_values=x, labels=y).loss.backward()
        opt.step()
        opt.zero_grad()
    assert any(not torch.equal(masks[0], m) for m in masks[1:])
    assert (fc1.weight != 0).all()  # the optimizer's weights stay dense


def test_attach_changes_no_key_and_no_parameter(vit, batch):
    keys = list(vit.state_dict())
    params = {n: p for n, p in vit.named_parameters()}
    before = vit(pixel_values=batch[0]).logits
    sp = NMSparsifier(vit, NMSparsityConfig(locations="FF,QKV,O", dense_fraction=0.5), 10)
    assert list(vit.state_dict()) == keys
    assert all(p is params[n] for n, p in vit.named_parameters())
    # dense phase: bitwise the same logits
    assert torch.equal(vit(pixel_values=batch[0]).logits, before)
    sp.detach()
    assert not any(hasattr(m, "_nm_sparse") or "forward" in vars(m) for m in vit.modules())
    assert list(vit.state_dict()) == keys


def _train(model, cfg, steps, batch, lr=1e-3):
    x, y = batch
    sp = NMSparsifier(model, cfg, total_steps=steps)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(steps):
        sp.update(step)
        model(pixel_values=x, labels=y).loss.backward()
        opt.step()
        opt.zero_grad()
    return sp


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_each_recipe_trains_finalizes_and_reloads_plainly(recipe, batch, tmp_path):
    from transformers import ViTForImageClassification

    model = tiny_vit()
    cfg = NMSparsityConfig(
        n_keep=1,
        m=4,
        locations="FF,Q,K",
        dense_fraction=0.1,
        finetune_fraction=0.2,
        **RECIPES[recipe],
    )
    sp = _train(model, cfg, 12, batch)
    report = sp.finalize()
    assert report.ok and len(report.layers) == 8
    for check in report.layers:
        assert check.sparsity == 0.75 and check.violations == 0
    model.eval()
    logits = model(pixel_values=batch[0]).logits
    model.save_pretrained(tmp_path)
    plain = ViTForImageClassification.from_pretrained(tmp_path).eval()
    assert not any(hasattr(m, "_nm_sparse") for m in plain.modules())
    torch.testing.assert_close(plain(pixel_values=batch[0]).logits, logits, rtol=0, atol=0)
    assert verify_nm(plain, layers=sp.metadata()["layers"]).ok


def test_reload_without_nmsparse_hf_installed(batch, tmp_path):
    model = tiny_vit()
    sp = _train(model, NMSparsityConfig(locations="FF"), 4, batch)
    sp.finalize()
    model.eval().save_pretrained(tmp_path)
    torch.save(batch[0], tmp_path / "x.pt")
    expected = model(pixel_values=batch[0]).logits
    script = f"""
import sys, torch
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'nmsparse_hf':
            raise ImportError('nmsparse_hf is blocked in this process')
sys.meta_path.insert(0, Block())
from transformers import AutoModelForImageClassification
m = AutoModelForImageClassification.from_pretrained({str(tmp_path)!r}).eval()
torch.save(m(pixel_values=torch.load({str(tmp_path / "x.pt")!r})).logits, {str(tmp_path / "y.pt")!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, rtol=0, atol=0)


@pytest.mark.parametrize("factory", [tiny_swin, tiny_swinv2, tiny_timm_vit])
def test_other_families_train_and_finalize(factory):
    model = factory()
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 10, (2,), generator=g))
    sp = _train(
        model, NMSparsityConfig(locations="FF,QKV", decay_type="exp", decay_coef=0.2), 4, batch
    )
    report = sp.finalize()
    assert report.ok and len(report.layers) >= 4


def test_verify_catches_a_violation(vit):
    sp = NMSparsifier(vit, NMSparsityConfig(), total_steps=4)
    with pytest.raises(NMVerificationError, match="not 2:4"):
        sp.verify()  # not finalized yet: dense
    sp.finalize()
    with torch.no_grad():
        w = vit.vit.layers[1].mlp.fc2.weight
        w[3, w[3, :4].eq(0).nonzero()[0, 0]] = 1.0
    report = sp.verify(strict=False)
    assert not report.ok
    bad = [c.name for c in report.layers if not c.ok]
    assert bad == ["vit.layers.1.mlp.fc2"]
    assert "FAIL" in str(report)


def test_gradient_checkpointing_gives_the_same_gradients(batch):
    x, y = batch
    cfg = NMSparsityConfig(decay_type="exp", decay_coef=0.1, locations="FF,QKV")
    grads = []
    for ckpt in (False, True):
        model = tiny_vit()
        if ckpt:
            enable = getattr(model, "activation_checkpointing_enable", None)
            (enable or model.gradient_checkpointing_enable)()
        model.train()
        sp = NMSparsifier(model, cfg, total_steps=10)
        sp.update(3)
        calls: list[int] = []
        model.vit.layers[0].mlp.fc1.register_forward_hook(lambda *a, c=calls: c.append(1))
        model(pixel_values=x, labels=y).loss.backward()
        assert len(calls) == (2 if ckpt else 1)  # checkpointing really re-ran the forward
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], msg=n)


@pytest.mark.parametrize(
    "recipe, steps",
    [
        ({"decay_type": "exp", "decay_coef": 0.1}, (2, 3)),  # alpha changes between steps
        ({"sparsity_type": "srste"}, (2, 3)),
        ({"finetune_fraction": 0.3, "finetune_mask": "frozen"}, (8, 9)),
    ],
    ids=["MDGF-exp", "SR-STE", "frozen-fine-tune"],
)
def test_torch_compile_matches_eager(batch, recipe, steps):
    """The traced forward (the step masks as graph inputs, as bytes) gives the eager loss and the
    eager gradient of every sparse weight: MDGF's α, SR-STE's decay, the frozen mask's zeros."""
    x, y = batch
    cfg = NMSparsityConfig(locations="FF", **recipe)
    results = []
    for compiled in (False, True):
        model = tiny_vit()
        sp = NMSparsifier(model, cfg, total_steps=10)
        run = torch.compile(model, backend="aot_eager") if compiled else model
        out = []
        for step in steps:
            sp.update(step)
            loss = run(pixel_values=x, labels=y).loss
            loss.backward()
            grads = [t.module.weight.grad.clone() for t in sp.targets]
            out.append((loss.detach(), grads))
            model.zero_grad()
        results.append(out)
    torch._dynamo.reset()
    for (l0, g0), (l1, g1) in zip(*results, strict=True):
        torch.testing.assert_close(l1, l0)
        for eager, traced in zip(g0, g1, strict=True):
            torch.testing.assert_close(traced, eager)
            if recipe.get("finetune_mask") == "frozen":
                assert torch.equal(traced == 0, eager == 0)  # pruned entries: exactly zero


def test_stats_report_sparsity_and_flip_rate(batch):
    model = tiny_vit()
    sp = NMSparsifier(model, NMSparsityConfig(n_keep=1, m=4), total_steps=10)
    sp.update(0)
    first = sp.stats()
    assert first["sparsity/FF"] == 0.75 and "mask_flip_rate/FF" not in first
    with torch.no_grad():
        model.vit.layers[0].mlp.fc1.weight.neg_().mul_(
            torch.rand_like(model.vit.layers[0].mlp.fc1.weight)
        )
    second = sp.stats()
    assert 0 < second["mask_flip_rate/FF"] < 1
    assert sp.stats()["mask_flip_rate/FF"] == 0.0


def test_plain_linear_model_by_pattern_matches_functional():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
    sp = NMSparsifier(model, NMSparsityConfig(target_modules=["0", "2"]), total_steps=4)
    sp.update(1)
    x = torch.randn(3, 16)
    w0, w2 = model[0].weight, model[2].weight
    expected = F.linear(
        F.gelu(F.linear(x, w0 * nm_mask(w0, 2, 4), model[0].bias)),
        w2 * nm_mask(w2, 2, 4),
        model[2].bias,
    )
    torch.testing.assert_close(model(x), expected)


def test_no_graph_break_comes_from_nmsparse_hf():
    """Under torch.compile the mask, the schedule state and the fused linear trace into the graph:
    no data-dependent branch of ours breaks it."""
    model = tiny_vit()
    sp = NMSparsifier(
        model, NMSparsityConfig(locations="FF,QKV", decay_type="exp", decay_coef=0.1), 10
    )
    sp.update(3)
    explained = torch._dynamo.explain(model)(pixel_values=torch.randn(2, 3, 32, 32))
    ours = [
        (r.reason, f.filename, f.lineno)
        for r in explained.break_reasons
        for f in r.user_stack
        if "nmsparse_hf" in f.filename
    ]
    assert ours == []
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "recipe",
    [
        {"decay_type": "exp", "decay_coef": 0.1},
        {"structure_decay": True, "structure_decay_type": "sparsify"},
        {"sparsity_type": "srste"},
    ],
    ids=["MDGF-exp", "SDGF", "SR-STE"],
)
def test_torch_compile_recompiles_per_distinct_plan_not_per_step(batch, recipe):
    """A compiled model is re-traced when the phase or a pattern changes, never because alpha
    moved: MDGF's alpha changes every step and must not cost a compile per step."""
    from torch._dynamo.utils import counters

    x, y = batch
    torch._dynamo.reset()
    counters.clear()
    model = tiny_vit()
    config = NMSparsityConfig(n_keep=1, m=8, dense_fraction=0.2, finetune_fraction=0.2, **recipe)
    sp = NMSparsifier(model, config, total_steps=20)
    run = torch.compile(model, backend="eager")
    plans = set()
    alphas = set()
    for step in range(20):
        plan = sp.update(step)
        plans.add((plan.phase, tuple(sorted(plan.patterns.items()))))
        alphas.add(plan.alpha)
        run(pixel_values=x, labels=y).loss.backward()
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert len(plans) >= 3  # dense, sparse (SDGF: several stages), finetune
    if "decay_type" in recipe:
        assert len(alphas) > 10  # alpha really moved every sparse step
    # one graph per distinct plan; MDGF's first sparse step also turns alpha from 0.0 to a tensor
    assert graphs <= len(plans) + 1, (graphs, plans)


@pytest.mark.skipif(
    not (shutil.which("g++") or shutil.which("clang++") or os.environ.get("CXX")),
    reason="inductor on CPU needs a C++ compiler; none found on PATH",
)
def test_compile_masks_computes_the_eager_step_masks_with_inductor(monkeypatch):
    """``compile_masks``: `update` computes each step's masks with `compiled_nm_masks`, one call
    and one inductor graph per weight shape and pattern (M <= 8) for all the layers that share
    them, bit for bit the eager masks, ties included; the Trainer's callback turns it on for
    ``torch_compile`` with inductor only."""
    from types import SimpleNamespace

    from torch._dynamo.utils import counters

    from nmsparse_hf import NMSparsityCallback
    from nmsparse_hf import sparsifier as sparsifier_module
    from nmsparse_hf.masks import compiled_nm_mask

    calls: list[tuple[int, tuple[int, int]]] = []

    def counted(weights, n, m, dim="row"):
        calls.append((len(weights), (n, m)))
        return sparsifier_module.compiled_nm_masks.__wrapped__(weights, n, m, dim)

    counted.__wrapped__ = sparsifier_module.compiled_nm_masks
    monkeypatch.setattr(sparsifier_module, "compiled_nm_masks", counted)

    config = NMSparsityConfig(n_keep=1, m=8, locations="FF,QKV", n_keep_qkv=2, m_qkv=4)
    model, ref = tiny_vit(), tiny_vit()
    with torch.no_grad():  # ties at every keep/prune boundary of the first FF layer
        model.vit.layers[0].mlp.fc1.weight.copy_(
            torch.randint(-1, 2, model.vit.layers[0].mlp.fc1.weight.shape)
        )
    ref.load_state_dict(model.state_dict())
    sp = NMSparsifier(model, config, 10, compile_masks=True)
    ref_sp = NMSparsifier(ref, config, 10)
    torch._dynamo.reset()
    counters.clear()
    calls.clear()  # the constructor's own update
    for step in (3, 4):
        sp.update(step), ref_sp.update(step)
        for name, state in sp.layers.items():
            assert state.kernel is compiled_nm_mask
            assert torch.equal(state.step_mask, ref_sp.layers[name].step_mask), (step, name)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(-1.5)
            ref.load_state_dict(model.state_dict())
    # fc1, fc2 and the q/k/v shape at 1:8 / 2:4: compiled once each, reused at the next step
    assert counters["stats"]["unique_graphs"] == 3, counters["stats"]
    # per step: both fc1, both fc2, the six q/k/v weights of the two blocks, one call each
    assert sorted(calls) == sorted([(2, (1, 8)), (2, (1, 8)), (6, (2, 4))] * 2), calls
    torch._dynamo.reset()
    callback = NMSparsityCallback(NMSparsifier(tiny_vit(), config, None))
    for backend, expected in ((None, True), ("inductor", True), ("aot_eager", False)):
        callback.sparsifier.compile_masks = False
        args = SimpleNamespace(torch_compile=True, torch_compile_backend=backend)
        callback.on_train_begin(args, SimpleNamespace(max_steps=10, global_step=0), None)
        assert callback.sparsifier.compile_masks is expected, backend


def test_compiled_forward_takes_the_step_masks_as_inputs(batch):
    """Under torch.compile the masks `update(step)` computed enter the graph as inputs, as their
    0/1 bytes: one graph (no break), no mask computed inside it, reused at the next step (new
    masks, same graph), and the compiled loss equals the eager one at both steps."""
    graphs: list[list[torch.Tensor]] = []

    def backend(gm, example_inputs):
        graphs.append(example_inputs)
        return gm.forward

    x, y = batch
    config = NMSparsityConfig(n_keep=1, m=8, locations="FF,QKV", decay_type="exp", decay_coef=0.1)
    model, ref = tiny_vit(), tiny_vit()
    for m in (model, ref):  # set by the first loss otherwise: a guard of transformers' own
        m.config.problem_type = "single_label_classification"
    sp, ref_sp = NMSparsifier(model, config, 10), NMSparsifier(ref, config, 10)
    torch._dynamo.reset()
    run = torch.compile(model, backend=backend, fullgraph=True)
    for step in (3, 4):
        with torch.no_grad():  # new weights, so new masks, as after an optimizer step
            for p, q in zip(model.parameters(), ref.parameters(), strict=True):
                p.mul_(-1.5 if step == 4 else 1.0), q.copy_(p)
        sp.update(step)
        ref_sp.update(step)
        torch.testing.assert_close(
            run(pixel_values=x, labels=y).loss, ref(pixel_values=x, labels=y).loss
        )
    torch._dynamo.reset()
    assert len(graphs) == 1  # one graph for both steps
    # the masks enter as their 0/1 bytes (`LayerSparsity.step_bytes`), one per layer, no bools
    dtypes = [t.dtype for t in graphs[0] if isinstance(t, torch.Tensor)]
    assert dtypes.count(torch.uint8) == sum(len(t.blocks) for t in sp.targets) == 10
    assert torch.bool not in dtypes
