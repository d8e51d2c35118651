"""One-shot N:M pruning (`one_shot`): magnitude, Wanda and SparseGPT against direct computations on
tiny models built from configs, block by block, padding left out, +0.0 zeros, errors, the CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from _tiny_text import VOCAB, tiny_text_model, word_tokenizer

from nmsparse_hf import NMSparsityConfig, NMSparsityConfigError, nm_mask, one_shot, verify_nm
from nmsparse_hf.cli import main
from nmsparse_hf.errors import NMTargetError
from nmsparse_hf.masks import nm_group_nonzeros
from nmsparse_hf.one_shot import finalized_sparsifier
from nmsparse_hf.targets import find_targets

ALL = "FF,QKV,O"


def calibration(n: int = 4, batch: int = 2, seq: int = 16, seed: int = 0) -> list[dict]:
    """``n`` batches of random tokens without padding."""
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(3, VOCAB, (batch, seq), generator=g),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        }
        for _ in range(n)
    ]


def laid_out(module: torch.nn.Module) -> torch.Tensor:
    """A layer's weight as ``[out, in]`` (transformers' Conv1D stores it ``[in, out]``)."""
    weight = module.weight.detach()
    return weight.t() if type(module).__name__ == "Conv1D" else weight


def layer_inputs(model, names: list[str], batches: list[dict]) -> dict[str, torch.Tensor]:
    """``{name: [tokens, in]}``: what each named layer sees over the batches in a plain forward
    of ``model``, padded tokens left out (float64)."""
    modules = dict(model.named_modules())
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    mask: list[torch.Tensor] = []

    def hook(name):
        return lambda module, args, out: seen[name].append(args[0].detach()[mask[0]])

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    model.eval()  # no dropout, as in one_shot
    with torch.no_grad():
        for batch in batches:
            mask[:] = [batch["attention_mask"].bool()]
            model(**batch, use_cache=False)
    for handle in handles:
        handle.remove()
    return {n: torch.cat(xs).double() for n, xs in seen.items()}


def wanda_masks(model, names: list[str], batches: list[dict], config) -> dict[str, torch.Tensor]:
    """The Wanda keep-masks computed directly: top N of |W_ij|·‖X_j‖₂ per group of M."""
    modules = dict(model.named_modules())
    xs = layer_inputs(model, names, batches)
    targets = {t.name: t for t in find_targets(model, config)[0]}
    out = {}
    for name in names:
        weight = laid_out(modules[name]).double()
        score = weight.abs() * xs[name].norm(dim=0)
        keep = torch.ones_like(weight, dtype=torch.bool)
        for block in targets[name].blocks:
            rows = block.rows or (0, weight.shape[0])
            n, m = config.target_pattern(block.location)
            keep[rows[0] : rows[1]] = nm_mask(score[rows[0] : rows[1]], n, m)
        out[name] = keep
    return out


def block_names(model, config, index: int) -> list[str]:
    return [t.name for t in find_targets(model, config)[0] if f".{index}." in t.name]


def apply_masks(model, masks: dict[str, torch.Tensor]) -> None:
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, keep in masks.items():
            weight = laid_out(modules[name])
            weight.copy_(torch.where(keep, weight, 0))


def kept(model, names: list[str]) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    return {n: laid_out(modules[n]) != 0 for n in names}


def negative_zeros(model) -> int:
    return sum(int((torch.signbit(p) & (p == 0)).sum()) for p in model.parameters())


# ---------------------------------------------------------------------------------- magnitude
def test_magnitude_is_the_training_mask_and_saves_unchanged():
    model = tiny_text_model("llama")
    config = NMSparsityConfig(n_keep=1, m=4, n_keep_qkv=2, m_qkv=4, locations=ALL)
    before = copy.deepcopy(model)
    report = one_shot(model, config, "magnitude")
    targets = {t.name for t in find_targets(model, config)[0]}
    old = dict(before.named_parameters())
    for name, param in model.named_parameters():
        module = name.rsplit(".", 1)[0]
        if module in targets and name.endswith("weight"):
            loc = next(b.location for b in report.blocks if b.name == module)
            expected = torch.where(nm_mask(old[name], *config.target_pattern(loc)), old[name], 0)
            assert torch.equal(param, expected), name
        else:  # biases, norms, embeddings and the head are untouched
            assert torch.equal(param, old[name]), name
    assert {b.name for b in report.blocks} == targets
    assert all(b.error is None for b in report.blocks)
    assert verify_nm(model, layers=report.layers, sparse_dim="row").ok
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    sparsifier = finalized_sparsifier(model, config)  # what save_sparse_pretrained takes
    assert sparsifier.finalized
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    sparsifier.detach()
    assert "one-shot magnitude" in str(report) and "model.layers.0.mlp.up_proj" in str(report)


def test_magnitude_groups_columns_with_sparse_dim_col():
    model = tiny_text_model("llama")
    config = NMSparsityConfig(n_keep=2, m=4, locations="FF", sparse_dim="col")
    one_shot(model, config, "magnitude")
    down = model.model.layers[0].mlp.down_proj.weight
    assert int(nm_group_nonzeros(down, 4, "col").max()) == 2
    assert int(nm_group_nonzeros(down, 4, "row").max()) > 2


# ---------------------------------------------------------------------------------- Wanda
LLAMA_WITH_HEAD = r".*\.(q_proj|k_proj|v_proj|o_proj|mlp\.\w+)|lm_head"


@pytest.mark.parametrize(
    "family, overrides, targets",
    [
        ("llama", {}, {"target_modules": LLAMA_WITH_HEAD}),
        # block 0 attends in a sliding window of 4, block 1 to everything: each block must be
        # run with its own attention mask
        ("gemma2", {"sliding_window": 4}, {"locations": ALL}),
    ],
)
def test_wanda_block_by_block_equals_the_direct_score(family, overrides, targets):
    """Block 0's masks come from the unpruned model's inputs; block 1's from the model with block
    0 already pruned (not from the unpruned one); lm_head, outside the blocks, from the fully
    pruned model."""
    config = NMSparsityConfig(n_keep=2, m=4, **targets)
    model = tiny_text_model(family, seed=1, **overrides)
    reference = copy.deepcopy(model)
    batches = calibration()
    report = one_shot(model, config, "wanda", calibration=batches, progress=False)
    assert report.samples == 8 and report.tokens == 8 * 16

    first = block_names(model, config, 0)
    masks0 = wanda_masks(reference, first, batches, config)
    assert all(torch.equal(kept(model, first)[n], masks0[n]) for n in first)

    second = block_names(model, config, 1)
    from_unpruned = wanda_masks(reference, second, batches, config)
    apply_masks(reference, masks0)
    masks1 = wanda_masks(reference, second, batches, config)
    assert all(torch.equal(kept(model, second)[n], masks1[n]) for n in second)
    # the statistics of block 1 depend on whether block 0 was pruned: the test can tell
    assert any(not torch.equal(masks1[n], from_unpruned[n]) for n in second)
    if "target_modules" not in targets:
        return
    apply_masks(reference, masks1)
    head = wanda_masks(reference, ["lm_head"], batches, config)["lm_head"]
    assert torch.equal(kept(model, ["lm_head"])["lm_head"], head)
    # kept weights keep their values
    modules = dict(reference.named_modules())
    assert torch.equal(model.lm_head.weight, torch.where(head, modules["lm_head"].weight, 0))


def test_wanda_leaves_padded_tokens_out():
    config = NMSparsityConfig(n_keep=2, m=4, locations=ALL)
    g = torch.Generator().manual_seed(3)
    lengths = [5, 9, 16, 12]
    samples = [torch.randint(3, VOCAB, (1, n), generator=g) for n in lengths]
    plain = [{"input_ids": s, "attention_mask": torch.ones_like(s)} for s in samples]
    padded = []
    for pair in (samples[:2], samples[2:]):
        ids = torch.randint(3, VOCAB, (2, 20), generator=g)  # garbage after each sample
        mask = torch.zeros(2, 20, dtype=torch.long)
        for row, sample in enumerate(pair):
            ids[row, : sample.shape[1]] = sample[0]
            mask[row, : sample.shape[1]] = 1
        padded.append({"input_ids": ids, "attention_mask": mask})
    a, b = tiny_text_model("llama", seed=2), tiny_text_model("llama", seed=2)
    report = one_shot(a, config, "wanda", calibration=plain, progress=False)
    one_shot(b, config, "wanda", calibration=padded, progress=False)
    assert report.tokens == sum(lengths)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa != 0, pb != 0), name


# ---------------------------------------------------------------------------------- SparseGPT
def reconstruction(weight: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    return float(((weight.double() - pruned.double()) @ x.t()).pow(2).sum())


def test_sparsegpt_beats_magnitude_on_every_layer_and_is_exactly_nm():
    config = NMSparsityConfig(n_keep=2, m=4, locations=ALL)
    model = tiny_text_model("llama", seed=4)
    original = copy.deepcopy(model)
    batches = calibration(n=8, seq=24, seed=5)
    report = one_shot(model, config, "sparsegpt", calibration=batches, progress=False)
    errors = {(b.name, b.location): b for b in report.blocks}
    for index in (0, 1):
        names = block_names(model, config, index)
        # X of block `index`: the original block, fed by the already pruned blocks before it
        probe = copy.deepcopy(model)
        probe.model.layers[index].load_state_dict(original.model.layers[index].state_dict())
        xs = layer_inputs(probe, names, batches)
        modules, before = dict(model.named_modules()), dict(original.named_modules())
        for name in names:
            w, pruned = laid_out(before[name]), laid_out(modules[name])
            magnitude = torch.where(nm_mask(w, 2, 4), w, 0)
            ours = reconstruction(w, pruned, xs[name])
            assert ours < reconstruction(w, magnitude, xs[name]), name
            row = errors[(name, next(loc for (n, loc) in errors if n == name))]
            assert row.error == pytest.approx(ours, rel=1e-3)
            counts = nm_group_nonzeros(pruned, 4)
            assert int(counts.max()) == 2 and int(counts.min()) == 2, name
    assert verify_nm(model, layers=report.layers).ok
    assert negative_zeros(model) == 0


def test_sparsegpt_in_bfloat16_writes_exact_nm_and_positive_zeros():
    model = tiny_text_model("llama", seed=6).to(torch.bfloat16)
    config = NMSparsityConfig(n_keep=1, m=4, n_keep_qkv=2, m_qkv=4, locations=ALL)
    report = one_shot(model, config, "sparsegpt", calibration=calibration(), progress=False)
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert verify_nm(model, layers=report.layers).ok
    assert negative_zeros(model) == 0
    ff = [b for b in report.blocks if b.location == "FF"]
    assert all(b.kept_fraction <= 0.25 for b in ff) and all(b.relative_error < 1 for b in ff)


# ---------------------------------------------------------------------------------- GPT-2, T5
def test_conv1d_and_fused_qkv_blocks_with_their_own_patterns():
    """GPT-2: Conv1D weights stored [in, out], c_attn split into Q/K/V row blocks (1:4) while the
    MLP is 2:4; Wanda's masks equal the direct score on the first block."""
    config = NMSparsityConfig(n_keep=2, m=4, n_keep_qkv=1, m_qkv=4, locations=ALL)
    model = tiny_text_model("gpt2", seed=7)
    reference = copy.deepcopy(model)
    with torch.no_grad():  # some negative zeros to start from
        model.transformer.h[0].mlp.c_fc.weight[:4, :4] = -0.0
    reference.load_state_dict(model.state_dict())
    batches = calibration(seed=8)
    report = one_shot(model, config, "wanda", calibration=batches, progress=False)
    first = block_names(model, config, 0)
    assert "transformer.h.0.attn.c_attn" in first
    direct = wanda_masks(reference, first, batches, config)
    ours = kept(model, first)
    for name in first:
        # a weight that was zero stays zero (the direct mask may keep it)
        assert torch.equal(
            ours[name], direct[name] & (laid_out(dict(reference.named_modules())[name]) != 0)
        ), name
    c_attn = laid_out(model.transformer.h[0].attn.c_attn)
    assert int(nm_group_nonzeros(c_attn, 4).max()) == 1
    assert int(nm_group_nonzeros(laid_out(model.transformer.h[0].mlp.c_fc), 4).min()) <= 2
    assert [b.location for b in report.blocks if b.name.endswith("h.0.attn.c_attn")] == list("QKV")
    assert negative_zeros(model) == 0


def test_sparsegpt_on_an_encoder_decoder():
    """T5: the encoder's blocks, then the decoder's (fed by the pruned encoder), each block with
    its own position bias arguments."""
    model = tiny_text_model("t5", seed=9)
    config = NMSparsityConfig(n_keep=2, m=4, locations=ALL)
    batches = calibration(n=3, seq=12, seed=10)
    for batch in batches:
        batch["decoder_input_ids"] = batch["input_ids"][:, :7]
    report = one_shot(model, config, "sparsegpt", calibration=batches, progress=False)
    assert verify_nm(model, layers=report.layers).ok
    names = {b.name for b in report.blocks}
    assert "decoder.block.1.layer.1.EncDecAttention.k" in names
    assert all(b.relative_error is not None and b.relative_error < 1 for b in report.blocks)


def test_vision_model_with_a_conv_target():
    """pixel_values calibration through vit.layers; a Conv2d target (the patch projection, named
    explicitly) is pruned by magnitude without an error figure, and refused by Wanda."""
    from conftest import tiny_vit

    config = NMSparsityConfig(n_keep=2, m=4, target_modules=["projection", "fc1", "fc2"])
    batches = [{"pixel_values": torch.randn(2, 4, 32, 32)} for _ in range(2)]
    model = tiny_vit(channels=4)  # M = 4 divides the projection's input channels
    report = one_shot(model, config, "magnitude", calibration=batches, progress=False)
    rows = {b.name: b for b in report.blocks}
    assert rows["vit.embeddings.patch_embeddings.projection"].error is None
    assert rows["vit.layers.1.mlp.fc2"].relative_error > 0
    assert report.tokens == 2 * 2 * 17 and verify_nm(model, layers=report.layers).ok
    with pytest.raises(NMTargetError, match="projection: a Conv2d layer"):
        one_shot(tiny_vit(channels=4), config, "wanda", calibration=batches)


# ---------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_calibration_is_required(method):
    model = tiny_text_model("llama")
    with pytest.raises(NMSparsityConfigError, match="needs calibration data"):
        one_shot(model, NMSparsityConfig(), method)
    with pytest.raises(NMSparsityConfigError, match="sparse_dim = 'col'"):
        one_shot(model, NMSparsityConfig(sparse_dim="col"), method, calibration=calibration(1))
    with pytest.raises(NMSparsityConfigError, match="calibration is empty"):
        one_shot(model, NMSparsityConfig(), method, calibration=[])
    with pytest.raises(NMSparsityConfigError, match="single dict"):
        one_shot(model, NMSparsityConfig(), method, calibration=calibration(1)[0])
    assert (
        negative_zeros(model) == 0
        and int(model.model.layers[0].mlp.up_proj.weight.eq(0).sum()) == 0
    )


def test_bad_method_and_bad_shapes():
    model = tiny_text_model("llama")
    with pytest.raises(NMSparsityConfigError, match="'obs' is not a one-shot method"):
        one_shot(model, NMSparsityConfig(), "obs")
    with pytest.raises(NMTargetError, match="M=24"):
        one_shot(model, NMSparsityConfig(n_keep=2, m=24), "magnitude")


# ---------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("pretrained") / "llama"
    tiny_text_model("llama", seed=11).save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def test_cli_prune_writes_a_verified_checkpoint(saved_llama, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    data = tmp_path / "calib.jsonl"
    g = torch.Generator().manual_seed(12)
    data.write_text(
        "\n".join(
            json.dumps(
                {"text": " ".join(f"w{int(i)}" for i in torch.randint(0, 90, (14,), generator=g))}
            )
            for _ in range(6)
        )
    )
    out = tmp_path / "out"
    argv = ["prune", str(saved_llama), str(out), "--method", "sparsegpt", "--calibration_file"]
    argv += [str(data), "--n_keep", "2", "--m", "4", "--sparsity_loc", ALL]
    argv += ["--calibration-samples", "4", "--max_length", "12", "--batch-size", "2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "one-shot sparsegpt, 4 samples" in printed and "saved a verified" in printed
    assert main(["verify", str(out)]) == 0
    assert "OK:" in capsys.readouterr().out
    loaded = AutoModelForCausalLM.from_pretrained(out)
    config = NMSparsityConfig(n_keep=2, m=4, locations=ALL)
    assert verify_nm(loaded).ok and negative_zeros(loaded) == 0
    assert {t.name for t in find_targets(loaded, config)[0]} == set(
        loaded.config.nm_sparsity["layers"]
    )
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()
    # the checkpoint says how its weights were made: pruned one-shot, not trained after
    record = {"method": "sparsegpt", "samples": 4, "tokens": loaded.config.nm_one_shot["tokens"]}
    assert loaded.config.nm_sparsity["one_shot"] == {**record, "trained": False}
    assert record["tokens"] > 0
    card = (out / "README.md").read_text()
    assert "pruned one-shot by nmsparse_hf (sparsegpt, 4 calibration samples" in card
    assert "not trained after" in card and "trained with nmsparse_hf" not in card
    tags = card.split("---")[1]
    assert "- one-shot-sparsegpt" in tags and "- ste" not in tags


def test_cli_prune_bad_input_exits_2(saved_llama, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prune", str(saved_llama), str(out), "--method", "wanda"]) == 2
    assert "needs calibration data" in capsys.readouterr().err
    missing = tmp_path / "missing.txt"
    argv = ["prune", str(saved_llama), str(out), "--method", "wanda", "--calibration-file"]
    assert main([*argv, str(missing)]) == 2
    err = capsys.readouterr().err
    assert "missing.txt" in err and len(err.strip().splitlines()) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "w1 w2"}\n{"txt": "w3"}\n')
    assert main([*argv, str(bad)]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert main(["prune", str(tmp_path / "nothing"), str(out)]) == 2
    assert not out.exists()


def test_cli_prune_magnitude_from_a_seed_style_config(saved_llama, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    seed = "sparsity:\n  n_sparsity: 1\n  m_sparsity: 8\n  sparsity_loc: FF,O\n"
    recipe.write_text(seed)
    out = tmp_path / "out"
    argv = ["prune", str(saved_llama), str(out), "--config", str(recipe), "--m-qkv", "4"]
    assert main(argv) == 2  # read as the recipes read it: no sparsity_type is a dense run
    assert "sparsity_type = 'dense'" in capsys.readouterr().err and not out.exists()
    recipe.write_text(seed + "  sparsity_type: STRUCTURED_NM\n")
    assert main(argv) == 0
    meta = json.loads((out / "config.json").read_text())["nm_sparsity"]
    assert (meta["n_keep"], meta["m"], sorted(meta["locations"])) == (1, 8, ["FF", "O"])
    assert meta["m_qkv"] == 4 and meta["achieved_sparsity"] == pytest.approx(7 / 8)
    assert main(["verify", str(out)]) == 0
    assert main(argv) == 0  # a previous save into OUT is replaced
    capsys.readouterr()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["prune", str(saved_llama), str(other), "--config", str(recipe)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "mine" and len(list(other.iterdir())) == 1


def test_one_shot_record_reads_back_and_a_malformed_one_is_refused():
    """The metadata's ``one_shot`` record survives to_dict/from_dict; a malformed one is one
    `NMCheckpointError` naming the field (older checkpoints, without it, read as None)."""
    from nmsparse_hf.errors import NMCheckpointError
    from nmsparse_hf.export.metadata import SparseCheckpointMetadata

    base = {
        "format": "nmsparse_hf/1",
        "n_keep": 2,
        "m": 4,
        "sparse_dim": "row",
        "locations": {"FF": [2, 4]},
        "recipe": "STE",
        "layers": {"fc": [{"location": "FF", "rows": None, "n_keep": 2, "m": 4}]},
        "nonzeros": 8,
        "numel": 16,
        "achieved_sparsity": 0.5,
    }
    assert SparseCheckpointMetadata.from_dict(base).one_shot is None
    record = {"method": "wanda", "samples": 8, "tokens": 512, "trained": True}
    meta = SparseCheckpointMetadata.from_dict({**base, "one_shot": record})
    assert SparseCheckpointMetadata.from_dict(meta.to_dict()).one_shot == record
    with pytest.raises(NMCheckpointError, match="one_shot trained = 'yes'"):
        SparseCheckpointMetadata.from_dict({**base, "one_shot": {**record, "trained": "yes"}})
