"""The recipe's command line: ``[CONFIG | --config CONFIG] [--flag value ...]``, as in TRL.

A config file (ours, or the seed research code's timm YAML) sets the parser's defaults and flags
override it, so ``--help`` shows the defaults a run really uses. Without a file, flags apply on
top of the family's embedded default, unless they choose a model or a dataset (`SOURCE_FLAGS`):
then the argument classes' own defaults are the base, and the run says so in one line.

Every mistake in a file or a flag is a `RecipeConfigError` raised before any data or model is
loaded: one line naming the file (and line where the parser gives it), the field, the value and
the fix. `recipe_cli` prints it and exits with code 2, like argparse.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import sys
import textwrap
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from ..config import NMSparsityConfig
from ..errors import NMSparsityConfigError
from .models import ModelArguments
from .seed import is_seed_yaml, seed_yaml_to_args

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
# Flags that choose what to train on: without a config file they start a run from the argument
# classes' defaults instead of layering on the embedded digits default.
SOURCE_FLAGS = {"model_name_or_path", "model_config", "dataset_name", "data_dir", "train_dir"}
# transformers example-script names -> ours (accepted as flags and as config keys)
ALIASES = {
    "image_column_name": "image_column",
    "label_column_name": "label_column",
    "dataset_config_name": "dataset_config",
}
TRUE, FALSE = {"true", "yes", "1", "on"}, {"false", "no", "0", "off", "none", ""}

USAGE = "accelerate launch recipes/train_{family}.py [CONFIG | --config CONFIG] [--flag value ...]"
DESCRIPTION = """\
Train an N:M-sparse image classifier with the Hugging Face Trainer.

  (no arguments)      the embedded default {default}: digits, from scratch, minutes on a CPU
  CONFIG, --config    a YAML/JSON file (ours or the seed's timm YAML), or the name of a shipped
                      one; flags after it override it. Shipped configs:
                      {shipped}
  flags only          tweak the embedded default (--seed 1 --m 4); flags that choose a model or
                      dataset start from the argument classes' own defaults instead:
                      {sources}
  --resume_from_checkpoint true   continue from the last checkpoint in output_dir
  --overwrite_output_dir true     replace a finished model in output_dir (refused otherwise)

The defaults below are this run's: those of {base}.
"""


class RecipeConfigError(NMSparsityConfigError):
    """A setting in a config file or on the command line is invalid: one line naming where,
    the field, the value and the fix."""


@dataclass
class ScriptArguments:
    """Settings of the recipe itself (not of the model, data or Trainer).

    Args:
        config: the YAML/JSON config file (also accepted as the first positional argument).
        overwrite_output_dir: allow a run to replace a finished sparse model in ``output_dir``
            (refused otherwise; transformers 5.x has no such flag).
        train_dir / validation_dir: the transformers example scripts' imagefolder flags; read as
            ``data_dir`` (the two must be ``<root>/train`` and ``<root>/<validation split>``).
    """

    _argument_group_name = "recipe"

    config: str | None = field(
        default=None,
        metadata={"help": "YAML/JSON config file (or a shipped config's name); flags override it."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace a finished sparse model in output_dir (refused otherwise)."},
    )
    train_dir: str | None = field(
        default=None, metadata={"help": "Imagefolder of training images (sets --data_dir)."}
    )
    validation_dir: str | None = field(
        default=None,
        metadata={"help": "Imagefolder of validation images, a sibling of --train_dir."},
    )


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each flag; the description printed as written."""


class RecipeArgs(NamedTuple):
    """The parsed arguments of a recipe run."""

    model: ModelArguments
    data: Any  # data.DataArguments
    training: Any  # integrations.SparseTrainingArguments
    script: ScriptArguments
    notes: list[str]


def shipped_config(name: str) -> Path:
    """The path of a config shipped with the package (``nmsparse_hf/recipes/configs/<name>``)."""
    return Path(str(resources.files("nmsparse_hf.recipes").joinpath("configs", name)))


def shipped_configs() -> list[str]:
    """Names of the configs shipped with the package."""
    folder = resources.files("nmsparse_hf.recipes").joinpath("configs")
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(CONFIG_SUFFIXES))


def make_parser(family: str):
    """The recipe's `HfArgumentParser` (model, data, training and script arguments; abbreviations
    off, so ``--config`` is never mistaken for ``--config_overrides``)."""
    from transformers import HfArgumentParser

    from ..data import DataArguments
    from ..integrations import SparseTrainingArguments

    parser = HfArgumentParser(
        (ModelArguments, DataArguments, SparseTrainingArguments, ScriptArguments),
        prog=f"train_{family}.py",
        usage=USAGE.format(family=family),
        allow_abbrev=False,
        formatter_class=_HelpFormatter,
    )
    for alias, name in ALIASES.items():
        parser.add_argument(f"--{alias}", dest=name, help=f"Same as --{name}.")
    return parser


def parse_args(argv: list[str] | None, family: str) -> RecipeArgs:
    """Parse a recipe's arguments (see the module docstring); raises `RecipeConfigError`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser(family)
    config, argv = _pop_config(argv)
    flags = explicit_flags(argv)
    default = shipped_config(f"{family}_digits.yaml")
    notes: list[str] = []
    if config is None and not SOURCE_FLAGS & flags:
        config = str(default)
        what = "no config file: flags applied on top of" if argv else "no arguments: running"
        notes.append(f"{what} the embedded default {default.name}")
    elif config is None:
        chosen = ", ".join(f"--{f}" for f in sorted(SOURCE_FLAGS & flags))
        notes.append(
            f"{chosen} chooses the model or data: settings not given take the argument classes' "
            f"defaults (e.g. learning_rate 5e-05, num_train_epochs 3), not those of {default.name}"
        )
    values = {} if config is None else read_config(config, parser, notes)
    if not has_accelerator() and "use_cpu" not in flags:
        values.setdefault("use_cpu", True)
    values.setdefault("model_config", f"{family}-digits")  # a config naming no model: the family's
    parser.description = DESCRIPTION.format(
        default=default.name,
        shipped=_wrap(", ".join(shipped_configs())),
        sources=_wrap(", ".join(f"--{f}" for f in sorted(SOURCE_FLAGS))),
        base=Path(config).name if config else "the argument classes",
    )
    parser.set_defaults(**values, config=config)
    namespace = parser.parse_args(argv)  # argparse: --help, unknown flags (exit 2)
    origin = f"{config} (or the command line)" if config else "command line"
    parsed = _build(parser, vars(namespace), origin)
    given = set(values) | flags
    _resolve(parsed, given, notes)
    return RecipeArgs(*parsed, notes)


def _wrap(text: str) -> str:
    return textwrap.fill(text, 96, initial_indent=" " * 22, subsequent_indent=" " * 22).lstrip()


def _pop_config(argv: list[str]) -> tuple[str | None, list[str]]:
    """Take the config file out of ``argv``: ``--config FILE``, ``--config=FILE`` or a first
    positional argument ending in .yaml/.yml/.json."""
    config = None
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" and i + 1 < len(argv):
            config, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        elif i == 0 and not arg.startswith("-") and arg.endswith(CONFIG_SUFFIXES):
            config = arg
        else:
            rest.append(arg)
        i += 1
    if config is not None and not Path(config).is_file():
        shipped = shipped_config(Path(config).name)
        config = str(shipped) if shipped.is_file() else config  # a bare name, or an old path
    if config is not None and not Path(config).is_file():
        raise RecipeConfigError(
            f"config file {config!r} does not exist; pass a path, or the name of a shipped "
            f"config: {', '.join(shipped_configs())}."
        )
    return config, rest


def explicit_flags(argv: list[str]) -> set[str]:
    """The field names given as ``--flag`` in ``argv`` (aliases mapped to our names)."""
    names = {a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
    return {ALIASES.get(n, n) for n in names}


# ------------------------------------------------------------------ config files
def read_config(path: str, parser, notes: list[str]) -> dict[str, Any]:
    """The settings of a config file, checked and typed for ``parser``.

    Reads YAML or JSON (by suffix); the file must be a non-empty mapping. A seed-style timm YAML
    is translated (`seed_yaml_to_args`); our files may spell sparsity keys the seed's way. Keys
    must be fields of the parser's dataclasses (or `ALIASES`); numbers written as strings (PyYAML
    reads ``1e-3`` as one) become numbers.
    """
    data, lines = _load(Path(path))
    name = Path(path).name
    fields = _fields(parser)
    data = {ALIASES.get(k, k): v for k, v in data.items()}
    if is_seed_yaml(data, set(fields)):
        data, seed_notes = seed_yaml_to_args(data, int(os.environ.get("WORLD_SIZE", "1")))
        notes.append(f"{name}: seed (timm) keys translated")
        notes += seed_notes
    else:
        sparsity, rest = NMSparsityConfig.split_known_keys(data)
        data = {**rest, **sparsity}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=1)
            hint = f"did you mean {close[0]!r}?" if close else "see --help for the settings."
            raise RecipeConfigError(f"{_where(path, lines, key)}: unknown setting {key!r}; {hint}")
    return {k: _typed(v, fields[k], _where(path, lines, k), k) for k, v in data.items()}


def _load(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise RecipeConfigError(
            f"{path}: the config file is empty; write 'setting: value' lines (see --help), or "
            f"leave the file out to run the embedded default."
        )
    lines: dict[str, int] = {}
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            if isinstance(node, yaml.MappingNode):
                lines = {k.value: k.start_mark.line + 1 for k, _ in node.value}
    except json.JSONDecodeError as exc:
        raise RecipeConfigError(
            f"{path}:{exc.lineno}: JSON syntax error: {exc.msg} (column {exc.colno})."
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeConfigError(f"{where}: YAML syntax error: {problem}.") from None
    if data is None:
        raise RecipeConfigError(f"{path}: the config file holds no settings (only comments).")
    if not isinstance(data, dict):
        raise RecipeConfigError(
            f"{path}: a config file is a mapping of 'setting: value' lines, but this one holds a "
            f"{type(data).__name__}; write e.g. 'learning_rate: 1e-3'."
        )
    return {str(k): v for k, v in data.items()}, lines


def _fields(parser) -> dict[str, Any]:
    """Field name -> type, over the parser's dataclasses (type hints resolved)."""
    out: dict[str, Any] = {}
    for dtype in parser.dataclass_types:
        hints = typing.get_type_hints(dtype)
        out.update({f.name: hints.get(f.name) for f in dataclasses.fields(dtype) if f.init})
    return out


def _base_type(hint: Any) -> Any:
    """``float`` for ``float``, ``float | None``, ``Optional[float]``; else the hint itself."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def _typed(value: Any, hint: Any, where: str, key: str) -> Any:
    """``value`` converted to the field's type where the file wrote it as a string (PyYAML reads
    ``1e-3`` as a string) or an int where a float is meant; refuse what cannot be one."""
    kind = _base_type(hint)
    if kind not in (int, float, bool) or value is None or isinstance(value, bool) and kind is bool:
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        try:
            if kind is bool:
                if text in TRUE | FALSE:
                    return text in TRUE
                raise ValueError(value)
            number = float(text)
            if kind is int and not number.is_integer():
                raise ValueError(value)
            return int(number) if kind is int else number
        except ValueError:
            pass
    elif isinstance(value, int | float) and not isinstance(value, bool) and kind is not bool:
        if kind is float:
            return float(value)
        if float(value).is_integer():
            return int(value)
    example = {int: "8", float: "1e-3", bool: "true"}[kind]
    raise RecipeConfigError(
        f"{where}: {key} = {value!r} is not {'an' if kind is int else 'a'} {kind.__name__}; "
        f"write e.g. '{key}: {example}'."
    )


def _where(path: str, lines: dict[str, int], key: str) -> str:
    return f"{path}:{lines[key]}" if key in lines else str(path)


# ------------------------------------------------------------------ building and resolving
def _build(parser, namespace: dict[str, Any], origin: str):
    """The four dataclasses from the parsed namespace; a failed check becomes one line."""
    out = []
    for dtype in parser.dataclass_types:
        names = {f.name for f in dataclasses.fields(dtype) if f.init}
        try:
            out.append(dtype(**{k: v for k, v in namespace.items() if k in names}))
        except (ValueError, TypeError) as exc:
            message = " ".join(str(exc).split())
            raise RecipeConfigError(f"{origin}: {message}") from None
    return out


def _resolve(parsed, given: set[str], notes: list[str]) -> None:
    """Settings that depend on others: data from ``train_dir``, ``do_train``/``do_eval``, the
    output directory (named after the pattern actually used) and ``resume_from_checkpoint``."""
    model_args, data_args, args, script = parsed
    _data_dirs(script, data_args)
    if "do_train" not in given:  # as in the example scripts, --do_eval alone only evaluates
        args.do_train = "do_eval" not in given
    if "do_eval" not in given and "do_train" not in given:
        args.do_eval = True
    if not (args.do_train or args.do_eval):
        raise RecipeConfigError("do_train and do_eval are both false: nothing to do.")
    args.output_dir = _output_dir(args, model_args, given)
    args.resume_from_checkpoint = _resume(args.resume_from_checkpoint, args.output_dir, notes)


def _data_dirs(script: ScriptArguments, data_args) -> None:
    if script.train_dir is None:
        if script.validation_dir is not None:
            raise RecipeConfigError("validation_dir is set without train_dir; set both.")
        return
    train = Path(script.train_dir)
    if script.validation_dir is None:
        data_args.data_dir = str(train)
        data_args.dataset_name = data_args.dataset_name or "imagefolder"
        return
    validation = Path(script.validation_dir)
    if train.resolve().parent != validation.resolve().parent or train.name != data_args.train_split:
        raise RecipeConfigError(
            f"train_dir={script.train_dir!r} and validation_dir={script.validation_dir!r} must be "
            f"'<root>/{data_args.train_split}' and '<root>/validation' (or val, test); arrange "
            f"them so, or set --data_dir to a folder holding both."
        )
    data_args.data_dir = str(train.resolve().parent)
    data_args.dataset_name = data_args.dataset_name or "imagefolder"


def _output_dir(args, model_args: ModelArguments, given: set[str]) -> str:
    """``output_dir`` as given, with ``{model}``, ``{recipe}``, ``{n_keep}``, ``{m}`` filled in
    from the settings actually used; when none is given,
    ``outputs/{model}-{recipe}-{n_keep}of{m}``."""
    cfg = args.sparsity_config()
    name = model_args.model_name_or_path or model_args.model_config
    fields = dict(
        model=Path(name.removeprefix("timm:")).name,
        recipe=cfg.recipe_name.lower(),
        n_keep=cfg.n_keep,
        m=cfg.m,
    )
    template = (
        args.output_dir if "output_dir" in given else "outputs/{model}-{recipe}-{n_keep}of{m}"
    )
    try:
        return template.format(**fields)
    except (KeyError, IndexError, ValueError) as exc:
        raise RecipeConfigError(
            f"output_dir={template!r}: cannot fill in {exc}; use only {{model}}, {{recipe}}, "
            f"{{n_keep}}, {{m}}."
        ) from None


def _resume(value: str | None, output_dir: str, notes: list[str]) -> str | None:
    """``true`` -> the last complete checkpoint in ``output_dir`` (none: start, with a note),
    ``false`` -> none, a path -> that checkpoint (it must exist)."""
    if value is None or str(value).strip().lower() in FALSE:
        return None
    if str(value).strip().lower() in TRUE:
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        notes.append(
            f"resuming from {last}"
            if last
            else f"resume_from_checkpoint=true: no checkpoint in {output_dir} yet, starting"
        )
        return last
    if not os.path.isdir(value):
        raise RecipeConfigError(
            f"resume_from_checkpoint={value!r} is not a checkpoint directory; pass one, or true "
            f"for the last checkpoint in output_dir."
        )
    return value


def has_accelerator() -> bool:
    """True with a CUDA/XPU/MPS device. Without one the recipe sets ``use_cpu`` (unless given):
    several CPU processes then really form a gloo process group, and bf16 is allowed on CPU."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return bool(
        torch.cuda.is_available()
        or (xpu is not None and xpu.is_available())
        or (mps is not None and mps.is_available())
    )
