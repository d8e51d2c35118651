"""Text and LLM families: presets train through NMSparseTrainer with ``locations`` only, every
targeted layer ends exactly N:M along its input dimension (checked here without the library's
own N:M code), attention and FF get their own patterns, and the export reloads with plain
``from_pretrained`` to identical logits and verifies. GPT-2's Conv1D behaves exactly like a
Linear holding the transposed weight."""

from __future__ import annotations

import json
import re

import pytest
import torch
from _tiny_text import FAMILIES, RandomTokens, example_inputs, tiny_text_model
from torch import nn

from nmsparse_hf import NMSparsifier, NMSparsityConfig, NMTargetError, find_targets

# Independent of the preset table: per family, the layers of block 0 that must be targeted with
# their location (every block is checked by index substitution). ``QKV`` is a fused projection.
_LLAMA = {
    "model.layers.{i}.self_attn.q_proj": "Q",
    "model.layers.{i}.self_attn.k_proj": "K",
    "model.layers.{i}.self_attn.v_proj": "V",
    "model.layers.{i}.self_attn.o_proj": "O",
    "model.layers.{i}.mlp.gate_proj": "FF",
    "model.layers.{i}.mlp.up_proj": "FF",
    "model.layers.{i}.mlp.down_proj": "FF",
}


def _bert(prefix: str, query: str = "query") -> dict[str, str]:
    p = prefix + ".encoder.layer.{i}."
    suffix = "_proj" if query == "query_proj" else ""
    return {
        p + f"attention.self.query{suffix}": "Q",
        p + f"attention.self.key{suffix}": "K",
        p + f"attention.self.value{suffix}": "V",
        p + "attention.output.dense": "O",
        p + "intermediate.dense": "FF",
        p + "output.dense": "FF",
    }


def _t5(gated: bool) -> dict[str, str]:
    out = {}
    for stack, attns in (("encoder", ["SelfAttention"]), ("decoder", ["SelfAttention", "EncDec"])):
        for k, attn in enumerate(attns):
            attn = "EncDecAttention" if attn == "EncDec" else attn
            for proj, loc in zip("qkvo", "QKVO", strict=True):
                out[f"{stack}.block.{{i}}.layer.{k}.{attn}.{proj}"] = loc
        ff = len(attns)
        for w in ("wi_0", "wi_1", "wo") if gated else ("wi", "wo"):
            out[f"{stack}.block.{{i}}.layer.{ff}.DenseReluDense.{w}"] = "FF"
    return out


EXPECTED: dict[str, dict[str, str]] = {
    "bert": _bert("bert"),
    "roberta": _bert("roberta"),
    "deberta-v2": _bert("deberta", "query_proj"),
    "distilbert": {
        "distilbert.transformer.layer.{i}.attention.q_lin": "Q",
        "distilbert.transformer.layer.{i}.attention.k_lin": "K",
        "distilbert.transformer.layer.{i}.attention.v_lin": "V",
        "distilbert.transformer.layer.{i}.attention.out_lin": "O",
        "distilbert.transformer.layer.{i}.ffn.lin1": "FF",
        "distilbert.transformer.layer.{i}.ffn.lin2": "FF",
    },
    "t5": _t5(gated=False),
    "mt5": _t5(gated=True),
    **{f: _LLAMA for f in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")},
    "phi3": {
        "model.layers.{i}.self_attn.qkv_proj": "QKV",
        "model.layers.{i}.self_attn.o_proj": "O",
        "model.layers.{i}.mlp.gate_up_proj": "FF",
        "model.layers.{i}.mlp.down_proj": "FF",
    },
    "gpt2": {
        "transformer.h.{i}.attn.c_attn": "QKV",
        "transformer.h.{i}.attn.c_proj": "O",
        "transformer.h.{i}.mlp.c_fc": "FF",
        "transformer.h.{i}.mlp.c_proj": "FF",
    },
}

# FF and O keep 1 of 4, Q/K/V keep 2 of 4: each layer must show its own pattern
PATTERNS = {"FF": (1, 4), "O": (1, 4), "Q": (2, 4), "K": (2, 4), "V": (2, 4)}
CONFIG = dict(
    n_keep=1, m=4, n_keep_qkv=2, m_qkv=4, locations="FF,QKV,O", decay_type="exp", decay_coef=0.5
)


def _expected_layers(family: str) -> dict[str, str]:
    return {name.format(i=i): loc for name, loc in EXPECTED[family].items() for i in range(2)}


def _as_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out, in]``: nn.Linear's own layout, a Conv1D's ``[in, out]`` transposed."""
    weight = module.weight.detach()
    return weight if isinstance(module, nn.Linear) else weight.t()


def _row_blocks(module: nn.Module, location: str, config) -> list[tuple[str, torch.Tensor]]:
    """(location, rows) of a layer, splitting fused Q/K/V by the attention shape."""
    weight = _as_out_in(module)
    if location != "QKV":
        return [(location, weight)]
    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads
    kv = getattr(config, "num_key_value_heads", heads) * head_dim
    q = heads * head_dim
    return [("Q", weight[:q]), ("K", weight[q : q + kv]), ("V", weight[q + kv :])]


def _assert_nm(name: str, weight: torch.Tensor, n: int, m: int) -> None:
    """At most n non-zeros in every group of m consecutive entries of each row (input dim), and
    the layer holds exactly n/m of its entries (nothing else pruned)."""
    out_f, in_f = weight.shape
    assert in_f % m == 0, name
    groups = (weight.reshape(out_f, in_f // m, m) != 0).sum(-1)
    assert int(groups.max()) <= n, f"{name}: a group keeps {int(groups.max())} > {n}"
    assert int((weight != 0).sum()) == out_f * in_f * n // m, name


def _train(family: str, tmp_path, steps: int = 3):
    from nmsparse_hf import NMSparseTrainer, SparseTrainingArguments

    model = tiny_text_model(family)
    zeros = {n: int((p == 0).sum()) for n, p in model.named_parameters()}
    task = FAMILIES[family][2]
    args = SparseTrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        **CONFIG,
    )
    trainer = NMSparseTrainer(model=model, args=args, train_dataset=RandomTokens(task))
    trainer.train()
    return trainer, model, task, zeros


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_trains_with_locations_only_and_exports(family, tmp_path):
    """Preset targets, exact N:M per location after training, identical logits after a plain
    ``from_pretrained``, and a verifying checkpoint."""
    import transformers

    from nmsparse_hf import verify_checkpoint
    from nmsparse_hf.cli import main

    trainer, model, task, zeros = _train(family, tmp_path)
    expected = _expected_layers(family)
    assert set(trainer.sparsifier.layers) == set(expected)
    modules = dict(model.named_modules())
    for name, location in expected.items():
        for loc, weight in _row_blocks(modules[name], location, model.config):
            _assert_nm(f"{name}[{loc}]", weight, *PATTERNS[loc])
    # nothing else was pruned: embeddings, heads, norms have no more zeros than at the start
    targeted = {f"{name}.weight" for name in expected}
    for name, param in model.named_parameters():
        if name not in targeted:
            assert int((param == 0).sum()) <= zeros[name], f"{name} must stay dense"

    out = tmp_path / "final"
    trainer.save_model(str(out))
    model.eval()
    batch = example_inputs(task)
    with torch.no_grad():
        before = model(**batch).logits
        reloaded = getattr(transformers, FAMILIES[family][1]).from_pretrained(out).eval()
        after = reloaded(**batch).logits
    assert torch.equal(before, after)
    report = verify_checkpoint(out)
    assert report.ok, str(report)
    assert main(["verify", str(out)]) == 0


def test_attention_and_ff_patterns_apply_in_t5():
    """T5's q/k/v are attention (qkv pattern), not FF."""
    model = tiny_text_model("t5")
    targets, _ = find_targets(model, NMSparsityConfig(locations="QKV"))
    names = {t.name: t.locations for t in targets}
    assert names["encoder.block.0.layer.0.SelfAttention.q"] == ["Q"]
    assert names["decoder.block.1.layer.1.EncDecAttention.v"] == ["V"]
    assert not any("DenseReluDense" in n or n.endswith(".o") for n in names)


def test_explicit_patterns_keep_the_family_locations():
    """target_modules names T5 layers; their location still comes from the T5 preset."""
    model = tiny_text_model("t5")
    targets, _ = find_targets(model, NMSparsityConfig(target_modules=["q", "wi"]))
    locs = {t.name: t.locations for t in targets}
    assert locs["encoder.block.0.layer.0.SelfAttention.q"] == ["Q"]
    assert locs["encoder.block.0.layer.1.DenseReluDense.wi"] == ["FF"]


def test_phi3_fused_qkv_is_split_by_grouped_query_heads():
    model = tiny_text_model("phi3")  # 2 query heads, 1 key/value head, head_dim 16
    targets, _ = find_targets(model, NMSparsityConfig(locations="QKV"))
    qkv = {t.name: t for t in targets}["model.layers.0.self_attn.qkv_proj"]
    assert [(b.location, b.rows) for b in qkv.blocks] == [
        ("Q", (0, 32)),
        ("K", (32, 48)),
        ("V", (48, 64)),
    ]


def test_heads_embeddings_norms_never_targeted_by_presets():
    for family in ("bert", "roberta", "distilbert", "deberta-v2", "gpt2", "llama", "t5"):
        model = tiny_text_model(family)
        targets, skipped = find_targets(model, NMSparsityConfig(locations="FF,QKV,O"))
        names = {t.name for t in targets}
        assert not any(
            re.search(r"(classifier|pooler|lm_head|embed|wte|wpe|norm|ln_)", n) for n in names
        ), (family, names)
        assert all(isinstance(t.module, nn.Linear) or family == "gpt2" for t in targets)


# ---------------------------------------------------------------------------------- all-linear
@pytest.mark.parametrize(
    "family, head",
    [("llama", "lm_head"), ("gpt2", "lm_head"), ("bert", "classifier"), ("t5", "lm_head")],
)
def test_all_linear_is_every_linear_but_the_output_head(family, head):
    model = tiny_text_model(family)
    targets, skipped = find_targets(model, NMSparsityConfig(target_modules="all-linear"))
    names = {t.name for t in targets}
    layers = {
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"
    }
    assert head in layers and head not in names
    assert names == layers - {head, "bert.pooler.dense"}
    # the same as a one-element list (how --target_modules all-linear arrives)
    targets2, _ = find_targets(model, NMSparsityConfig(target_modules=["all-linear"]))
    assert {t.name for t in targets2} == names
    # and locations come from the family: attention is not FF
    locs = {b.location for t in targets for b in t.blocks}
    assert {"Q", "K", "V", "FF"} <= locs


# ---------------------------------------------------------------------------------- tied weights
def test_tied_lm_head_is_refused_naming_both_modules():
    model = tiny_text_model("llama", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before = model.model.embed_tokens.weight.detach().clone()
    with pytest.raises(NMTargetError) as err:
        NMSparsifier(model, NMSparsityConfig(target_modules=["q_proj", "lm_head"]), 10)
    msg = str(err.value)
    assert "lm_head.weight" in msg and "model.embed_tokens.weight" in msg
    assert "exclude_modules" in msg and "tie_word_embeddings=False" in msg
    assert torch.equal(model.model.embed_tokens.weight, before)
    assert not hasattr(model.model.layers[0].self_attn.q_proj, "_nm_sparse")
    # untied, the same request is fine
    untied = tiny_text_model("llama", tie_word_embeddings=False)
    NMSparsifier(untied, NMSparsityConfig(target_modules=["q_proj", "lm_head"]), 10)


# ---------------------------------------------------------------------------------- patterns
def test_target_entry_matching_nothing_names_the_nearest_layer():
    model = tiny_text_model("llama")
    with pytest.raises(NMTargetError, match=r"'v_projj' matches no.*'v_proj'"):
        find_targets(model, NMSparsityConfig(target_modules=["q_proj", "v_projj"]))


def test_exclude_entry_matching_nothing_is_an_error():
    model = tiny_text_model("llama")
    with pytest.raises(NMTargetError, match=r"exclude_modules=\['down_projj'\].*'down_proj'"):
        find_targets(model, NMSparsityConfig(locations="FF", exclude_modules=["down_projj"]))
    with pytest.raises(NMTargetError, match="exclude_modules"):
        find_targets(model, NMSparsityConfig(locations="FF", exclude_modules=r"nothing\..*"))


def test_on_disk_names_work_in_patterns():
    """The names that checkpoint files, verify and the model card show select the same layers."""
    from conftest import tiny_vit

    model = tiny_vit()
    assert "vit.layers.0.mlp.fc1" in dict(model.named_modules())
    targets, skipped = find_targets(
        model,
        NMSparsityConfig(
            locations="FF", exclude_modules=["vit.encoder.layer.0.intermediate.dense"]
        ),
    )
    assert {s.name: s.reason for s in skipped}[
        "vit.layers.0.mlp.fc1"
    ] == "excluded by exclude_modules"
    targets, _ = find_targets(
        model, NMSparsityConfig(target_modules=[r"encoder.layer.1.output.dense"])
    )
    assert [t.name for t in targets] == ["vit.layers.1.mlp.fc2"]


# ---------------------------------------------------------------------------------- Conv1D
def _conv1d_and_linear(seed: int = 0):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(seed)
    conv = Conv1D(24, 16)  # in 16, out 24; weight [16, 24]
    nn.init.normal_(conv.bias)
    linear = nn.Linear(16, 24)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    return nn.Sequential(conv), nn.Sequential(linear)


@pytest.mark.parametrize(
    "cfg",
    [
        dict(decay_type="exp", decay_coef=0.3),
        dict(sparsity_type="srste"),
        dict(finetune_fraction=0.5, finetune_mask="frozen"),
        dict(n_keep=1, m=8, structure_decay=True, structure_decay_type="sparsify"),
    ],
)
def test_conv1d_is_a_linear_with_the_transposed_weight(cfg):
    """Forward, gradient, finalize and metadata of a Conv1D equal those of a Linear holding W^T."""
    conv, linear = _conv1d_and_linear()
    total = 8
    sp_c = NMSparsifier(conv, NMSparsityConfig(target_modules=["0"], **cfg), total_steps=total)
    sp_l = NMSparsifier(linear, NMSparsityConfig(target_modules=["0"], **cfg), total_steps=total)
    opt_c = torch.optim.SGD(conv.parameters(), lr=0.1)
    opt_l = torch.optim.SGD(linear.parameters(), lr=0.1)
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))
    for step in range(total):
        sp_c.update(step)
        sp_l.update(step)
        y_c, y_l = conv(x), linear(x)
        torch.testing.assert_close(y_c, y_l, rtol=1e-5, atol=1e-6)
        y_c.square().sum().backward()
        y_l.square().sum().backward()
        torch.testing.assert_close(conv[0].weight.grad, linear[0].weight.grad.t())
        opt_c.step()
        opt_l.step()
        opt_c.zero_grad()
        opt_l.zero_grad()
    sp_c.finalize()
    sp_l.finalize()
    torch.testing.assert_close(conv[0].weight.t(), linear[0].weight)
    n, m = sp_c.config.target_pattern("FF")
    _assert_nm("conv", conv[0].weight.detach().t(), n, m)
    assert sp_c.metadata()["layers"]["0"][0]["fan_in_fan_out"] is True
    assert "fan_in_fan_out" not in sp_l.metadata()["layers"]["0"][0]


def test_conv1d_verify_checks_the_input_dimension():
    """A Conv1D that is N:M along its stored dim 1 (the output) but not along the input fails."""
    conv, _ = _conv1d_and_linear()
    sp = NMSparsifier(conv, NMSparsityConfig(target_modules=["0"]), total_steps=4)
    sp.finalize()
    assert sp.verify().ok
    with torch.no_grad():
        w = conv[0].weight  # [in 16, out 24]: make it 2:4 along out instead of along in
        w.copy_(torch.randn_like(w))
        w.view(16, 6, 4)[..., :2] = 0
    assert not sp.verify(strict=False).ok


def test_conv1d_fused_qkv_blocks_are_columns_of_the_stored_weight():
    model = tiny_text_model("gpt2")
    sp = NMSparsifier(model, NMSparsityConfig(n_keep=1, m=4, locations="FF,Q"), total_steps=4)
    sp.finalize()
    w = model.transformer.h[0].attn.c_attn.weight.detach()  # [in 32, out 96] = [in, Q|K|V]
    _assert_nm("q", w[:, :32].t(), 1, 4)
    assert (w[:, 32:] != 0).all(), "K and V are not configured and must stay dense"


# ---------------------------------------------------------------------------------- TRL
def test_sft_trainer_with_the_callback_on_a_tiny_llama(tmp_path):
    """Causal-LM fine-tuning with TRL's SFTTrainer and NMSparsityCallback (the README's way):
    exact N:M after training, a verifying export with the tokenizer, identical logits reloaded,
    and a text-generation pipeline on the checkpoint."""
    pytest.importorskip("trl")
    from _tiny_text import word_tokenizer
    from datasets import Dataset
    from transformers import LlamaForCausalLM, pipeline
    from trl import SFTConfig, SFTTrainer

    from nmsparse_hf import NMSparsityCallback, save_sparse_pretrained, verify_checkpoint

    tokenizer = word_tokenizer()
    model = tiny_text_model("llama")
    train = Dataset.from_dict(
        {"text": [" ".join(f"w{(i * 7 + j) % 80}" for j in range(8)) for i in range(16)]}
    )
    args = SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=3,
        per_device_train_batch_size=4,
        bf16=False,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    callback = NMSparsityCallback.add_to(trainer, NMSparsityConfig(**CONFIG))
    trainer.train()
    assert callback.sparsifier.finalized
    modules = dict(model.named_modules())
    for name, location in _expected_layers("llama").items():
        _assert_nm(name, _as_out_in(modules[name]), *PATTERNS[location])

    out = tmp_path / "final"
    save_sparse_pretrained(model, callback.sparsifier, out, processing_class=tokenizer)
    assert verify_checkpoint(out).ok
    batch = example_inputs("lm")
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
        after = LlamaForCausalLM.from_pretrained(out).eval()(**batch).logits
    assert torch.equal(before, after)
    generate = pipeline("text-generation", model=str(out), device="cpu")
    assert generate("w1 w2", max_new_tokens=2)[0]["generated_text"].startswith("w1 w2")


def test_conv1d_checkpoint_records_and_checks_the_input_axis(tmp_path):
    """GPT-2's export marks its Conv1D blocks fan_in_fan_out, and verify checks the input axis:
    one extra non-zero in a group along the input dimension of the stored [in, out] weight fails."""
    from safetensors.torch import load_file, save_file

    from nmsparse_hf import save_sparse_pretrained, verify_checkpoint
    from nmsparse_hf.cli import main

    model = tiny_text_model("gpt2")
    sp = NMSparsifier(model, NMSparsityConfig(**CONFIG), total_steps=4)
    sp.finalize()
    out = tmp_path / "gpt2"
    save_sparse_pretrained(model, sp, out)
    meta = json.loads((out / "config.json").read_text())["nm_sparsity"]
    blocks = meta["layers"]["transformer.h.0.attn.c_attn"]
    assert [(b["location"], b["rows"], b.get("fan_in_fan_out")) for b in blocks] == [
        ("Q", [0, 32], True),
        ("K", [32, 64], True),
        ("V", [64, 96], True),
    ]
    assert meta["layers"]["transformer.h.0.mlp.c_fc"][0]["fan_in_fan_out"] is True
    assert verify_checkpoint(out).ok and main(["verify", str(out)]) == 0

    tensors = load_file(out / "model.safetensors")
    key = "transformer.h.0.mlp.c_fc.weight"  # stored [in 32, out 128], FF keeps 1 of 4 inputs
    weight = tensors[key].clone()
    column = weight[:4, 0]
    column[column == 0] = 1.0  # the first input group of output 0 now keeps 4, not 1
    weight[:4, 0] = column
    tensors[key] = weight
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    report = verify_checkpoint(out)
    assert not report.ok
    assert any("transformer.h.0.mlp.c_fc" in c.name and not c.ok for c in report.layers)


def test_all_linear_from_the_command_line():
    """``--target_modules all-linear`` arrives as a one-element list and means all-linear."""
    from transformers import HfArgumentParser

    from nmsparse_hf import SparseTrainingArguments

    (args,) = HfArgumentParser(SparseTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", "x", "--target_modules", "all-linear", "--use_cpu", "true"]
    )
    targets, _ = find_targets(tiny_text_model("gpt2"), args.sparsity_config())
    assert len(targets) == 8 and all(t.kind == "conv1d" for t in targets)


def test_conv1d_refuses_a_sharded_weight():
    """Under FSDP2 a weight is a dim-0 shard between steps; a Conv1D's dim 0 is its input, along
    which the groups run, so finalize refuses (a stand-in for a DTensor: anything with
    ``to_local``)."""
    conv, _ = _conv1d_and_linear()
    sp = NMSparsifier(conv, NMSparsityConfig(target_modules=["0"]), total_steps=4)
    weight = conv[0].weight
    weight.to_local = lambda: weight.data[:8]
    with pytest.raises(NMTargetError, match=r"Conv1D.*FSDP2 shard"):
        sp.finalize()
