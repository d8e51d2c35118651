"""N:M-preserving LoRA: targets resolve through PEFT's wrapping, the adapter's delta is masked by
the base layer's mask, and after ``finalize()`` PEFT's own ``merge_and_unload()`` gives exactly
N:M layers with the adapter model's logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _tiny_text import RandomTokens, example_inputs, tiny_text_model, word_tokenizer
from conftest import tiny_training_args

from nmsparse_hf import NMSparsifier, NMSparsityConfig, NMTargetError, is_nm, nm_mask
from nmsparse_hf.targets import find_targets

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

ALL = "FF,Q,K,V,O"


def _lora(model, **kwargs):
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", **kwargs}
    return get_peft_model(model, LoraConfig(**kwargs))


def _pruned(family: str, n_keep: int = 2, m: int = 4, **overrides):
    """A tiny model of ``family`` whose preset layers are pruned to n_keep:m (+0.0 zeros)."""
    model = tiny_text_model(family, **overrides)
    targets, _ = find_targets(model, NMSparsityConfig(n_keep=n_keep, m=m, locations=ALL))
    with torch.no_grad():
        for target in targets:
            weight = target.module.weight
            weight.masked_fill_(~nm_mask(weight, n_keep, m), 0)
    return model


def _batch(task: str = "lm", n: int = 4):
    data = RandomTokens(task, n=n)
    return {k: torch.stack([data[i][k] for i in range(n)]) for k in data[0]}


def _train(model, sparsifier, steps: int, task: str = "lm"):
    batch = _batch(task)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(steps):
        sparsifier.update(step)
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    sparsifier.update(steps)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------- targets
@pytest.mark.parametrize("family, task_type", [("llama", None), ("bert", "SEQ_CLS")])
@pytest.mark.parametrize(
    "sparsity",
    [
        dict(locations=ALL),
        dict(target_modules="all-linear"),
        dict(target_modules=r".*\.(up_proj|query)"),
        dict(target_modules=["up_proj", "down_proj", "query", "dense"]),
    ],
    ids=["preset", "all-linear", "regex", "suffixes"],
)
def test_targets_on_a_peft_model_are_the_unwrapped_models(family, task_type, sparsity):
    cfg = NMSparsityConfig(**sparsity)
    try:
        plain, plain_skipped = find_targets(tiny_text_model(family), cfg)
    except NMTargetError:  # a pattern of the other family: refused on both alike
        with pytest.raises(NMTargetError):
            find_targets(_lora(tiny_text_model(family), task_type=task_type), cfg)
        return
    model = _lora(tiny_text_model(family), task_type=task_type)
    wrapped, skipped = find_targets(model, cfg)
    assert [t.name for t in wrapped] == [t.name for t in plain]
    assert [t.blocks for t in wrapped] == [t.blocks for t in plain]
    assert [(s.name, s.reason) for s in skipped] == [(s.name, s.reason) for s in plain_skipped]
    lora_modules = {
        id(m) for n, m in model.named_modules() if ".lora_" in n or ".modules_to_save." in n
    }
    for target in wrapped:
        assert id(target.module) not in lora_modules
        assert target.module is target.adapter.base_layer  # the base layer, its LoRA layer
        assert type(target.module) is torch.nn.Linear


def test_all_linear_never_targets_lora_matrices():
    model = _lora(tiny_text_model("llama"))
    targets, skipped = find_targets(model, NMSparsityConfig(target_modules="all-linear"))
    names = [t.name for t in targets] + [s.name for s in skipped]
    assert not [n for n in names if "lora" in n or "base_layer" in n or "base_model" in n]
    adapters = [
        m for n, m in model.named_modules() if n.endswith(("lora_A.default", "lora_B.default"))
    ]
    assert len(adapters) == 2 * len(targets)  # PEFT's all-linear also leaves lm_head out
    assert not {id(m) for m in adapters} & {id(t.module) for t in targets}


def test_a_layer_in_modules_to_save_is_refused():
    model = _lora(tiny_text_model("llama"), target_modules=["q_proj"], modules_to_save=["up_proj"])
    with pytest.raises(NMTargetError, match=r"model.layers.0.mlp.up_proj is in PEFT's modules_to"):
        NMSparsifier(model, NMSparsityConfig(locations=ALL), total_steps=4)
    # leaving it dense works, and the copy is never a target
    cfg = NMSparsityConfig(locations=ALL, exclude_modules=["up_proj"])
    sparsifier = NMSparsifier(model, cfg, total_steps=4)
    assert not [t for t in sparsifier.targets if "up_proj" in t.name]


def test_dora_is_refused_before_anything_is_attached():
    model = _lora(tiny_text_model("llama"), use_dora=True)
    with pytest.raises(NMTargetError, match="q_proj.*DoRA|q_proj.*Dora"):
        NMSparsifier(model, NMSparsityConfig(locations=ALL), total_steps=4)
    assert not [m for m in model.modules() if hasattr(m, "_nm_sparse")]


# ---------------------------------------------------------------------------------- the delta
def test_masked_delta_forward_and_gradients_match_a_direct_computation():
    """One LoRA layer: output = x (W ⊙ m + (s·B@A) ⊙ m)ᵀ + b, gradients to A and B included."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(16, 8))
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=6, target_modules=["0"]))
    lora = model.base_model.model[0]
    with torch.no_grad():
        lora.lora_B["default"].weight.normal_()
    cfg = NMSparsityConfig(n_keep=1, m=4, target_modules=["0"])
    sparsifier = NMSparsifier(model, cfg, total_steps=2)
    x = torch.randn(5, 16)
    out = model(x)
    out.square().sum().backward()

    W, b = lora.base_layer.weight.detach(), lora.base_layer.bias.detach()
    A = lora.lora_A["default"].weight.detach().clone().requires_grad_()
    B = lora.lora_B["default"].weight.detach().clone().requires_grad_()
    mask = nm_mask(W, 1, 4)
    effective = torch.where(mask, W, 0.0) + torch.where(mask, (B @ A) * 3.0, 0.0)
    expected = F.linear(x, effective, b)
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(lora.lora_A["default"].weight.grad, A.grad)
    torch.testing.assert_close(lora.lora_B["default"].weight.grad, B.grad)
    # the merge adds the same masked delta
    delta = lora.get_delta_weight("default")
    assert torch.equal(delta != 0, mask & (delta != 0)) and is_nm(W * mask + delta, 1, 4)
    sparsifier.detach()
    assert "forward" not in vars(lora) and "get_delta_weight" not in vars(lora)


@pytest.mark.parametrize("mask_source", ["weights", "magnitude"])
def test_merge_and_unload_is_nm_with_the_adapter_models_logits(mask_source):
    model = _lora(_pruned("llama"), lora_dropout=0.1)
    sparsifier = NMSparsifier(
        model, NMSparsityConfig(locations=ALL, mask_source=mask_source), total_steps=6
    )
    held = {t.name: t.module.weight != 0 for t in sparsifier.targets}
    start = model.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight.detach().clone()
    _train(model, sparsifier, 6)
    sparsifier.finalize()
    model.eval()
    inputs = example_inputs("lm")
    with torch.no_grad():
        adapter_logits = model(**inputs).logits
    merged = model.merge_and_unload()
    modules = dict(merged.named_modules())
    with torch.no_grad():
        merged_logits = merged(**inputs).logits
    assert _rel(merged_logits, adapter_logits) < 1e-4
    for target in sparsifier.targets:
        weight = modules[target.name].weight
        assert weight is target.module.weight  # the base layer itself, now merged
        assert is_nm(weight, 2, 4), target.name
        assert torch.equal(weight != 0, held[target.name]), target.name  # the pattern held
        assert int((torch.signbit(weight) & (weight == 0)).sum()) == 0
    # the adapters did train: the merged weights moved off the one-shot weights
    assert not torch.equal(modules["model.layers.0.mlp.up_proj"].weight, start)


def test_the_merged_model_saves_as_a_verified_sparse_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    from nmsparse_hf.export import save_sparse_pretrained, verify_checkpoint

    model = _lora(_pruned("llama"))
    sparsifier = NMSparsifier(model, NMSparsityConfig(locations=ALL, mask_source="weights"), 3)
    _train(model, sparsifier, 3)
    sparsifier.finalize()
    merged = model.merge_and_unload()
    path = save_sparse_pretrained(merged, sparsifier, tmp_path / "merged")
    report = verify_checkpoint(path)
    assert report.ok and report.negative_zeros == 0
    assert len(report.layers) == len(sparsifier.targets)
    reloaded = AutoModelForCausalLM.from_pretrained(path)
    inputs = example_inputs("lm")
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, merged.eval()(**inputs).logits)


def test_default_magnitude_masks_dense_base_and_delta_alike():
    """Without mask_source, the frozen dense base is masked by |W| every step (the mask does not
    move), finalize prunes it, and the delta follows the same mask."""
    model = _lora(tiny_text_model("llama"))
    sparsifier = NMSparsifier(model, NMSparsityConfig(n_keep=1, m=4, locations="FF"), 4)
    first = {t.name: sparsifier.layers[t.name].mask(t.module.weight) for t in sparsifier.targets}
    _train(model, sparsifier, 4)
    for target in sparsifier.targets:
        state = sparsifier.layers[target.name]
        assert torch.equal(state.mask(target.module.weight), first[target.name])
    sparsifier.finalize()
    merged = model.merge_and_unload()
    modules = dict(merged.named_modules())
    for name, mask in first.items():
        assert is_nm(modules[name].weight, 1, 4) and torch.equal(modules[name].weight != 0, mask)


# ---------------------------------------------------------------------------------- trainers
def test_callback_drives_a_peft_model_in_a_stock_trainer(tmp_path):
    from transformers import Trainer

    from nmsparse_hf.integrations import NMSparsityCallback

    model = _lora(_pruned("llama"))
    trainer = Trainer(
        model=model,
        args=tiny_training_args(tmp_path, max_steps=3, learning_rate=1e-2),
        train_dataset=RandomTokens("lm", n=8),
    )
    lora_b = model.base_model.model.model.layers[0].mlp.up_proj.lora_B["default"].weight
    callback = NMSparsityCallback.add_to(
        trainer, NMSparsityConfig(locations=ALL, mask_source="weights")
    )
    held = {t.name: t.module.weight != 0 for t in callback.sparsifier.targets}
    trainer.train()
    assert callback.sparsifier.finalized and lora_b.abs().sum() > 0
    merged = model.merge_and_unload()
    modules = dict(merged.named_modules())
    for name, mask in held.items():
        assert torch.equal(modules[name].weight != 0, mask), name


def test_nmsparse_trainer_saves_a_lora_model_merged_and_verified(tmp_path):
    """`NMSparseTrainer.save_model` on a PEFT model writes the merged model (a plain N:M
    checkpoint with the adapter model's logits); the trainer keeps its adapter model."""
    from transformers import AutoModelForCausalLM

    from nmsparse_hf.export import verify_checkpoint
    from nmsparse_hf.integrations import NMSparseTrainer

    model = _lora(_pruned("llama"))
    args = tiny_training_args(
        tmp_path, max_steps=3, learning_rate=1e-2, locations=ALL, mask_source="weights"
    )
    trainer = NMSparseTrainer(model=model, args=args, train_dataset=RandomTokens("lm", n=8))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert type(trainer.model).__name__ == "PeftModel"  # merged on a copy
    assert verify_checkpoint(tmp_path / "final").ok
    inputs = example_inputs("lm")
    with torch.no_grad():
        adapter = model.eval()(**inputs).logits
        saved = AutoModelForCausalLM.from_pretrained(tmp_path / "final")(**inputs).logits
    assert _rel(saved, adapter) < 1e-4


def test_sft_trainer_with_peft_config_and_the_callback(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from nmsparse_hf.integrations import NMSparsityCallback

    tokenizer = word_tokenizer()
    texts = [" ".join(f"w{(i * 7 + j) % 90}" for j in range(6)) for i in range(8)]
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        max_length=16,
        logging_steps=1,
        disable_tqdm=True,
    )
    model = _pruned("llama", vocab_size=len(tokenizer))
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, target_modules="all-linear"),
    )
    callback = NMSparsityCallback.add_to(
        trainer, NMSparsityConfig(locations=ALL, mask_source="weights")
    )
    assert callback.sparsifier.targets[0].adapter is not None
    held = {t.name: t.module.weight != 0 for t in callback.sparsifier.targets}
    trainer.train()
    merged = trainer.model.merge_and_unload()
    modules = dict(merged.named_modules())
    for name, mask in held.items():
        assert is_nm(modules[name].weight, 2, 4) and torch.equal(modules[name].weight != 0, mask)
