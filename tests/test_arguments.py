"""`SparseTrainingArguments` and `NMSparsityConfig` declare the same sparsity fields: same names,
defaults and help texts, field by field (the config is the one declaration; the arguments copy it)."""

from __future__ import annotations

import dataclasses

import pytest
from transformers import HfArgumentParser, TrainingArguments

from nmsparse_hf import NMSparsityConfig
from nmsparse_hf.integrations import SparseTrainingArguments

CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(NMSparsityConfig) if f.name != "extra"}
TRAINING_NAMES = {f.name for f in dataclasses.fields(TrainingArguments)}
ARG_FIELDS = {
    f.name: f for f in dataclasses.fields(SparseTrainingArguments) if f.name not in TRAINING_NAMES
}


def test_same_field_names():
    assert set(ARG_FIELDS) == set(CONFIG_FIELDS)
    assert len(CONFIG_FIELDS) == 20


@pytest.mark.parametrize("name", sorted(CONFIG_FIELDS))
def test_same_default_and_help(name):
    ours, theirs = CONFIG_FIELDS[name], ARG_FIELDS[name]
    help_text = ours.metadata.get("help")
    assert help_text and len(help_text) > 10, f"{name}: NMSparsityConfig field has no help text"
    assert theirs.metadata.get("help") == help_text
    expected = ",".join(ours.default) if isinstance(ours.default, tuple) else ours.default
    assert theirs.default == expected
    # the command-line default means the same as the config's default
    assert NMSparsityConfig(**{name: theirs.default}) == NMSparsityConfig()


def test_parser_shows_the_config_help(tmp_path):
    parser = HfArgumentParser(SparseTrainingArguments)
    actions = {a.dest: a for a in parser._actions}
    for name, f in CONFIG_FIELDS.items():
        assert actions[name].help == f.metadata["help"], name
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--n_keep", "1", "--m", "8", "--locations", "FF,Q"]
    )
    assert args.sparsity_config() == NMSparsityConfig(n_keep=1, m=8, locations=("FF", "Q"))


def test_default_arguments_give_the_default_config(tmp_path):
    args = SparseTrainingArguments(output_dir=str(tmp_path))
    assert args.sparsity_config() == NMSparsityConfig()
