"""Bad inputs a user would hit: each is a clear error before the first optimizer step, naming the
field or layer, the value, and the fix."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_vit

from nmsparse_hf import NMSparsifier, NMSparsityConfig, NMSparsityError
from nmsparse_hf.schedule import SparsitySchedule


def cfg(**kw):
    return lambda: NMSparsityConfig(**kw)


def attach(model_factory=tiny_vit, total=10, **kw):
    return lambda: NMSparsifier(model_factory(), NMSparsityConfig(**kw), total_steps=total)


class NoFamily(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)


def _twice():
    model = tiny_vit()
    NMSparsifier(model, NMSparsityConfig(), 10)
    NMSparsifier(model, NMSparsityConfig(), 10)


def _streaming_without_max_steps():
    from nmsparse_hf.data import require_max_steps

    require_max_steps(True, -1)


def _seed_yaml_unknown_key(tmp_path):
    from nmsparse_hf.recipes.image_classification import parse_args

    path = tmp_path / "seed.yaml"
    path.write_text("model: vit_base_patch16_224\nepochs: 10\nlr_base: 0.001\nm_sparsityy: 8\n")
    parse_args([str(path)], "vit")


def _missing_config_file(tmp_path):
    NMSparsityConfig.from_yaml(tmp_path / "nope.yaml")


def _unknown_our_key():
    NMSparsityConfig.from_dict({"n_keep": 1, "decay_coeff": 0.1})


def _metadata_disagrees(tmp_path):
    from nmsparse_hf.export import save_sparse_pretrained, verify_checkpoint

    model = tiny_vit()
    sp = NMSparsifier(model, NMSparsityConfig(), 4)
    sp.finalize()
    save_sparse_pretrained(model, sp, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["nm_sparsity"]["achieved_sparsity"] = 0.9
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    verify_checkpoint(tmp_path / "ckpt").raise_if_failed()


def _trainer_too_short_for_sdgf(tmp_path):
    from nmsparse_hf.integrations import NMSparseTrainer, SparseTrainingArguments

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {"pixel_values": torch.zeros(3, 32, 32), "labels": torch.tensor(0)}

    args = SparseTrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        n_keep=1,
        m=8,
        structure_decay=True,
        report_to=[],
        use_cpu=True,
        per_device_train_batch_size=2,
    )
    model = tiny_vit()
    before = model.vit.layers[0].mlp.fc1.weight.detach().clone()
    trainer = NMSparseTrainer(model=model, args=args, train_dataset=Data())
    try:
        trainer.train()
    finally:
        # raised before step 1: the weights were never updated
        assert torch.equal(model.vit.layers[0].mlp.fc1.weight, before)
        assert trainer.state.global_step == 0


def _plain_training_arguments(tmp_path):
    from transformers import TrainingArguments

    from nmsparse_hf.integrations import NMSparseTrainer

    NMSparseTrainer(model=tiny_vit(), args=TrainingArguments(output_dir=str(tmp_path)))


def _unknown_model_config():
    from nmsparse_hf.recipes.models import ModelArguments, build_model

    build_model(ModelArguments(model_config="vit-huge"), "vit", None, 10)


def _bad_overrides():
    from nmsparse_hf.recipes.models import parse_overrides

    parse_overrides("drop_path_rate")


def _bad_randaugment():
    from nmsparse_hf.data import DataArguments

    DataArguments(randaugment="strong")


def _bad_eval_fraction():
    from nmsparse_hf.data import DataArguments

    DataArguments(eval_fraction=1.5)


def _num_labels_one():
    from nmsparse_hf.data import DataArguments

    DataArguments(num_labels=1)


def _negative_mixup():
    from nmsparse_hf.data import DataArguments

    DataArguments(mixup_alpha=-0.2)


def training_args(**kw):
    """Building `SparseTrainingArguments` from Python with one bad value."""

    def build():
        from nmsparse_hf.integrations import SparseTrainingArguments

        SparseTrainingArguments(output_dir="unused", report_to=[], use_cpu=True, **kw)

    return build


def _recipe_flag_max_steps(tmp_path):
    from nmsparse_hf.recipes.image_classification import parse_args

    parse_args(["--output_dir", str(tmp_path), "--max_steps", "-5"], "vit")


def _recipe_yaml_locations_mapping(tmp_path):
    from nmsparse_hf.recipes.image_classification import parse_args

    path = tmp_path / "run.yaml"
    path.write_text(f"output_dir: {tmp_path}\nlocations:\n  FF: 1\n")
    parse_args([str(path)], "vit")


def _update_without_total_steps():
    NMSparsifier(tiny_vit(), NMSparsityConfig(), total_steps=None).update(0)


# (id, trigger, words the message must contain: the field or layer, the value, and the fix)
CASES = [
    ("n_keep>=m", cfg(n_keep=4, m=4), ["n_keep:m", "4:4", "0 < N < M"]),
    ("n_keep<=0", cfg(n_keep=0, m=4), ["n_keep:m", "0:4", "0 < N < M"]),
    ("qkv n>=m", cfg(n_keep_qkv=8, m_qkv=4), ["n_keep_qkv:m_qkv", "8:4", "0 < N < M"]),
    ("n not int", cfg(n_keep="two"), ["n_keep", "'two'", "integer"]),
    ("sparsity_type", cfg(sparsity_type="magnitude"), ["sparsity_type", "'magnitude'", "srste"]),
    ("decay_type", cfg(decay_type="cosine"), ["decay_type", "'cosine'", "exp"]),
    (
        "structure type",
        cfg(structure_decay_type="zigzag"),
        ["structure_decay_type", "'zigzag'", "sparsify"],
    ),
    ("location", cfg(locations="FF,MLP"), ["locations", "'MLP'", "FF, Q, K, V, O, C"]),
    ("dim", cfg(sparse_dim="diag"), ["sparse_dim", "'diag'", "col"]),
    ("finetune_mask", cfg(finetune_mask="sticky"), ["finetune_mask", "'sticky'", "frozen"]),
    ("dense>1", cfg(dense_fraction=1.5), ["dense_fraction", "1.5", "[0, 1]"]),
    ("finetune<0", cfg(finetune_fraction=-0.1), ["finetune_fraction", "-0.1", "[0, 1]"]),
    (
        "dense+ft>=1",
        cfg(dense_fraction=0.6, finetune_fraction=0.4),
        ["dense_fraction + finetune_fraction", "0.6", "below 1"],
    ),
    ("negative beta", cfg(decay_coef=-1e-4), ["decay_coef", "-0.0001", ">= 0"]),
    ("negative lambda", cfg(srste_lambda=-1.0), ["srste_lambda", "-1.0", ">= 0"]),
    (
        "srste+linear",
        cfg(sparsity_type="srste", decay_type="linear"),
        ["decay_type", "'linear'", "decay_type='step'"],
    ),
    (
        "start_k",
        cfg(structure_decay=True, structure_decay_start_k=6),
        ["structure_decay_start_k", "6", "power of two"],
    ),
    ("unknown key", _unknown_our_key, ["decay_coeff", "did you mean 'decay_coef'"]),
    (
        "M vs layer",
        attach(lambda: tiny_vit(hidden=48), n_keep=1, m=32),
        ["vit.layers.0.mlp.fc1", "(96, 48)", "M=32", "exclude_modules"],
    ),
    (
        "SDGF stage vs layer",
        attach(
            lambda: tiny_vit(hidden=32),
            n_keep=1,
            m=8,
            structure_decay=True,
            structure_decay_type="fine",
        ),
        ["vit.layers.0.mlp.fc1", "8:64", "structure_decay_fallback=True"],
    ),
    (
        "location matches nothing",
        attach(locations="FF,C"),
        ["['C']", "match no layer", "locations"],
    ),
    (
        "no preset",
        lambda: NMSparsifier(NoFamily(), NMSparsityConfig(), 10),
        ["NoFamily", "no nmsparse_hf preset", "target_modules"],
    ),
    ("pattern matches nothing", attach(target_modules=["fc9"]), ["['fc9']", "matches no", "regex"]),
    (
        "pattern hits LayerNorm",
        attach(target_modules=r".*layernorm_after"),
        ["layernorm_after (LayerNorm)", "Linear/Conv2d"],
    ),
    ("attached twice", _twice, ["already has an NMSparsifier", "detach()"]),
    (
        "total_steps",
        lambda: SparsitySchedule(NMSparsityConfig(), 0),
        ["total_steps = 0", "max_steps"],
    ),
    ("update before length", _update_without_total_steps, ["total_steps", "set_total_steps"]),
    ("streaming w/o max_steps", _streaming_without_max_steps, ["max_steps", "-1", "streaming"]),
    ("model_config", _unknown_model_config, ["model_config='vit-huge'", "vit-b16"]),
    ("config_overrides", _bad_overrides, ["config_overrides", "'drop_path_rate'", "key=value"]),
    ("randaugment", _bad_randaugment, ["randaugment", "'strong'", "m9-n2"]),
    ("eval_fraction", _bad_eval_fraction, ["eval_fraction", "1.5", "0.1"]),
    ("mixup_alpha", _negative_mixup, ["mixup_alpha", "-0.2", "0 to turn mixup off"]),
    ("negative lr", training_args(learning_rate=-1e-3), ["learning_rate=-0.001", ">= 0"]),
    ("NaN lr", training_args(learning_rate=float("nan")), ["learning_rate=nan", "finite"]),
    (
        "batch size 0",
        training_args(per_device_train_batch_size=0),
        ["per_device_train_batch_size=0", "positive integer"],
    ),
    (
        "eval batch size -1",
        training_args(per_device_eval_batch_size=-1),
        ["per_device_eval_batch_size=-1", "positive integer"],
    ),
    (
        "accumulation 0",
        training_args(gradient_accumulation_steps=0),
        ["gradient_accumulation_steps=0", "1 = no accumulation"],
    ),
    (
        "workers -1",
        training_args(dataloader_num_workers=-1),
        ["dataloader_num_workers=-1", ">= 0", "main process"],
    ),
    ("max_steps -5", training_args(max_steps=-5), ["max_steps=-5", "-1 to train for"]),
    ("max_steps 0", training_args(max_steps=0), ["max_steps=0", "positive number"]),
    (
        "label smoothing 2",
        training_args(label_smoothing_factor=2.0),
        ["label_smoothing_factor=2.0", "[0, 1)"],
    ),
    (
        "locations mapping",
        cfg(locations={"FF": 1}),
        ["locations", "{'FF': 1}", "'FF,Q,K'"],
    ),
    (
        "locations mapping (arguments)",
        training_args(locations={"FF": 1}),
        ["locations", "{'FF': 1}", "'FF,Q,K'"],
    ),
    ("locations number", cfg(locations=5), ["locations", "got 5", "'FF,Q,K'"]),
    ("targets mapping", cfg(target_modules={"fc1": 1}), ["target_modules", "{'fc1': 1}"]),
    ("num_labels 1", _num_labels_one, ["num_labels=1", "at least two classes"]),
]

TMP_CASES = [
    ("seed yaml unknown key", _seed_yaml_unknown_key, ["m_sparsityy", "fix their spelling"]),
    ("missing config file", _missing_config_file, ["nope.yaml", "does not exist"]),
    ("metadata vs weights", _metadata_disagrees, ["achieved", "0.9"]),
    (
        "SDGF longer than run",
        _trainer_too_short_for_sdgf,
        ["sparse phase has 3 optimizer step(s)", "needs at least 4", "Train longer"],
    ),
    (
        "plain TrainingArguments",
        _plain_training_arguments,
        ["SparseTrainingArguments", "sparsity_config=NMSparsityConfig"],
    ),
    ("recipe --max_steps -5", _recipe_flag_max_steps, ["max_steps=-5", "-1 to train for"]),
    (
        "recipe YAML locations mapping",
        _recipe_yaml_locations_mapping,
        ["locations", "{'FF': 1}", "'FF,Q,K'"],
    ),
]


def _check(trigger, words):
    with pytest.raises(NMSparsityError) as err:
        trigger()
    message = str(err.value)
    for word in words:
        assert word in message, f"{word!r} not in: {message}"


@pytest.mark.parametrize("trigger, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error(trigger, words):
    _check(trigger, words)


@pytest.mark.parametrize(
    "trigger, words", [c[1:] for c in TMP_CASES], ids=[c[0] for c in TMP_CASES]
)
def test_bad_input_with_files_is_a_clear_error(trigger, words, tmp_path):
    _check(lambda: trigger(tmp_path), words)


def test_training_values_at_their_limits_are_accepted():
    """The checks refuse only what is wrong: -1 (train for num_train_epochs), a zero learning
    rate, no clipping, no workers and smoothing just below 1 are all valid."""
    from nmsparse_hf.integrations import SparseTrainingArguments

    args = SparseTrainingArguments(
        output_dir="unused",
        report_to=[],
        use_cpu=True,
        max_steps=-1,
        learning_rate=0.0,
        max_grad_norm=None,
        dataloader_num_workers=0,
        label_smoothing_factor=0.99,
        eval_accumulation_steps=None,
        locations=["FF", "Q"],
    )
    assert (args.max_steps, args.sparsity_config().locations) == (-1, ("FF", "Q"))


def test_there_are_at_least_25_distinct_bad_inputs():
    assert len({c[0] for c in CASES + TMP_CASES}) >= 25
