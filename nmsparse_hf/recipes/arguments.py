"""The recipes' one command line: ``[CONFIG | --config CONFIG] [--flag value ...]``, as in TRL.

Every recipe script (image classification, text classification, causal LM) parses here. A config
file (ours, or the seed research code's timm YAML) sets the parser's defaults and flags override
it, so ``--help`` shows the defaults a run really uses. A recipe with an embedded default config
(`RecipeSpec.default_config`) runs it when no file is given, unless a flag chooses a model or a
dataset (`RecipeSpec.source_flags`): then the argument classes' own defaults are the base, and
the run says so in one line.

Every mistake in a file or a flag is a `RecipeConfigError` raised before any data or model is
loaded: one line naming the file (and line where the parser gives it), the field, the value and
the fix. `common.recipe_cli` prints it and exits with code 2; the parser prints a bad flag the
same way (`_one_line_error`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import importlib.util
import os
import sys
import textwrap
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

from ..config import read_config_file
from ..errors import NMSparsityConfigError
from .seed import recipe_settings

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
MAX_RUN_NAME = 256
# settings naming files: a relative path is read relative to the config file when it is there
PATH_KEYS = ("train_file", "validation_file")
TRUE, FALSE = {"true", "yes", "1", "on"}, {"false", "no", "0", "off", "none", ""}

USAGE = "accelerate launch recipes/train_{name}.py [CONFIG | --config CONFIG] [--flag value ...]"
DESCRIPTION = """\
Train {what} with the Hugging Face Trainer.

{start}
  CONFIG, --config    a YAML/JSON file (ours or the seed's timm YAML), or the name of a shipped
                      one; flags after it override it. Shipped configs:
                      {shipped}
  --resume_from_checkpoint true   continue from the last checkpoint in output_dir
  --overwrite_output_dir true     replace a finished model in output_dir (refused otherwise)
  --trust_remote_code true        allow settings that run code (custom models, metric scripts)

One run at a time per output_dir (a lock file names the run holding it).
The defaults below are this run's: those of {base}.
"""


class RecipeConfigError(NMSparsityConfigError):
    """A setting in a config file or on the command line is invalid: one line naming where,
    the field, the value and the fix."""


@dataclass
class ScriptArguments:
    """Settings of the recipe run itself (not of the model, data or Trainer).

    Args:
        config: the YAML/JSON config file (also accepted as the first positional argument).
        overwrite_output_dir: allow a run to replace a finished sparse model in ``output_dir``
            (refused otherwise; transformers 5.x has no such flag).
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


@dataclass(frozen=True)
class RecipeSpec:
    """What distinguishes one recipe's command line from another's.

    Args:
        name: the script is ``recipes/train_<name>.py``.
        what: what it trains, for ``--help`` ("an N:M-sparse image classifier").
        arguments: returns the argument classes ``(model, data, training, script)``.
        start: the ``--help`` lines saying what runs without a config file.
        default_config: the shipped config run when no file is given (``None``: the argument
            classes' defaults are the base).
        default_model: ``model_config`` when the config names none (``None``: the field's).
        source_flags: flags that choose the model or data; given without a file, they make the
            argument classes' defaults the base instead of ``default_config``.
        aliases: other names of fields (transformers example scripts' spellings) -> ours.
        config_prefix: shipped configs of this recipe start with one of these.
    """

    name: str
    what: str
    arguments: Callable[[], tuple[type, ...]]
    start: str
    default_config: str | None = None
    default_model: str | None = None
    source_flags: frozenset[str] = frozenset()
    aliases: dict[str, str] = field(default_factory=dict)
    config_prefix: tuple[str, ...] = ()


# recipe name -> the module defining its `recipe_spec(name)`
_RECIPE_MODULES = {
    "vit": "image_classification",
    "swin": "image_classification",
    "swinv2": "image_classification",
    "text_classification": "text_classification",
    "causal_lm": "causal_lm",
}


def recipe_spec(recipe: str | RecipeSpec) -> RecipeSpec:
    """The `RecipeSpec` of a recipe name (``vit``, ``swin``, ``text_classification``,
    ``causal_lm``); a spec is returned as is."""
    if isinstance(recipe, RecipeSpec):
        return recipe
    if recipe not in _RECIPE_MODULES:
        raise RecipeConfigError(f"unknown recipe {recipe!r}; one of {', '.join(_RECIPE_MODULES)}.")
    module = importlib.import_module(f"{__package__}.{_RECIPE_MODULES[recipe]}")
    return module.recipe_spec(recipe)


def recipe_keys() -> set[str]:
    """Every setting a recipe config may hold, over all recipes (what ``nmsparse`` passes over
    in a recipe config)."""
    keys: set[str] = set()
    for name in _RECIPE_MODULES:
        spec = recipe_spec(name)
        try:
            keys |= set(_fields(spec.arguments())) | set(spec.aliases)
        except RecipeConfigError:  # a recipe whose optional dependency is not installed
            continue
    return keys


def config_file_settings(path: str | Path) -> tuple[dict[str, Any], list[str], bool]:
    """A recipe config's settings in our names, for tools that read one outside a run
    (``nmsparse report``): `load_config_file`, then `seed.recipe_settings` over every recipe's
    settings. Returns ``(settings, notes, seed)``."""
    data, _ = load_config_file(path)
    return recipe_settings(data, recipe_keys())


class RecipeArgs(NamedTuple):
    """The parsed arguments of a recipe run."""

    model: Any
    data: Any
    training: Any  # a SparseTrainingArguments
    script: Any  # a ScriptArguments
    notes: list[str]


def shipped_config(name: str) -> Path:
    """The path of a config shipped with the package (``nmsparse_hf/recipes/configs/<name>``)."""
    return Path(str(resources.files("nmsparse_hf.recipes").joinpath("configs", name)))


def shipped_configs(prefix: tuple[str, ...] = ()) -> list[str]:
    """Names of the configs shipped with the package (those starting with ``prefix``)."""
    folder = resources.files("nmsparse_hf.recipes").joinpath("configs")
    names = (p.name for p in folder.iterdir() if p.name.endswith(CONFIG_SUFFIXES))
    return sorted(n for n in names if not prefix or n.startswith(prefix))


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each flag; the description printed as written."""


def make_parser(recipe: str | RecipeSpec):
    """The recipe's `HfArgumentParser` over its argument classes (abbreviations off, so
    ``--config`` is never mistaken for ``--config_overrides``), with its aliases."""
    from transformers import HfArgumentParser

    spec = recipe_spec(recipe)
    parser = HfArgumentParser(
        spec.arguments(),
        prog=f"train_{spec.name}.py",
        usage=USAGE.format(name=spec.name),
        allow_abbrev=False,
        formatter_class=_HelpFormatter,
    )
    parser.error = types.MethodType(_one_line_error, parser)
    for alias, name in spec.aliases.items():
        parser.add_argument(f"--{alias}", dest=name, help=f"Same as --{name}.")
    return parser


def _one_line_error(parser: argparse.ArgumentParser, message: str) -> typing.NoReturn:
    """argparse's ``error`` for a bad flag (unknown, or a value of the wrong type): printed as
    every other setting error (`exit_setting_error`), where argparse prints its usage first."""
    exit_setting_error(f"{message}; --help lists every flag with its type and default")


def exit_setting_error(message: str) -> typing.NoReturn:
    """Print a setting error as the recipes print every one, ``error: <message>`` on one line of
    stderr (whitespace runs folded), and exit with code 2, as argparse does."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    raise SystemExit(2) from None


def parse_args(argv: list[str] | None, recipe: str | RecipeSpec) -> RecipeArgs:
    """Parse a recipe's arguments (see the module docstring); raises `RecipeConfigError`."""
    spec = recipe_spec(recipe)
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser(spec)
    config, argv = _pop_config(argv, spec)
    flags = explicit_flags(argv, spec)
    config, notes = _base_config(config, argv, flags, spec)
    values = {} if config is None else read_config(config, parser, notes, spec)
    if not has_accelerator() and "use_cpu" not in flags:
        values.setdefault("use_cpu", True)
    if spec.default_model:
        values.setdefault("model_config", spec.default_model)  # a config naming no model
    parser.description = DESCRIPTION.format(
        what=spec.what,
        start=spec.start,
        shipped=_wrap(", ".join(shipped_configs(spec.config_prefix)) or "none"),
        base=Path(config).name if config else "the argument classes",
    )
    parser.set_defaults(**values, config=config)
    namespace = vars(parser.parse_args(argv))  # argparse: --help, unknown flags (exit 2)
    origin = f"{config} (or the command line)" if config else "command line"
    check_run_settings(namespace, origin)
    parsed = _build(parser, namespace, origin)
    _resolve(parsed, set(values) | flags, notes)
    return RecipeArgs(*parsed, notes)


def _base_config(config, argv, flags, spec: RecipeSpec) -> tuple[str | None, list[str]]:
    """The config file the run starts from, and a note saying so when it is not the user's."""
    notes: list[str] = []
    if config is not None or spec.default_config is None:
        return config, notes
    default = shipped_config(spec.default_config)
    if not spec.source_flags & flags:
        what = "no config file: flags applied on top of" if argv else "no arguments: running"
        notes.append(f"{what} the embedded default {default.name}")
        return str(default), notes
    chosen = ", ".join(f"--{f}" for f in sorted(spec.source_flags & flags))
    notes.append(
        f"{chosen} chooses the model or data: settings not given take the argument classes' "
        f"defaults (e.g. learning_rate 5e-05, num_train_epochs 3), not those of {default.name}"
    )
    return None, notes


def _wrap(text: str) -> str:
    return textwrap.fill(text, 96, initial_indent=" " * 22, subsequent_indent=" " * 22).lstrip()


def _pop_config(argv: list[str], spec: RecipeSpec) -> tuple[str | None, list[str]]:
    """Take the config file out of ``argv``: ``--config FILE``, ``--config=FILE`` or a first
    positional argument ending in .yaml/.yml/.json; a bare name is a shipped config."""
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
            f"config: {', '.join(shipped_configs(spec.config_prefix)) or 'none'}."
        )
    return config, rest


def explicit_flags(argv: list[str], spec: RecipeSpec | None = None) -> set[str]:
    """The field names given as ``--flag`` in ``argv`` (aliases mapped to our names)."""
    aliases = spec.aliases if spec is not None else {}
    names = {a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
    return {aliases.get(n, n) for n in names}


# ------------------------------------------------------------------ config files
def read_config(path: str, parser, notes: list[str], spec: RecipeSpec) -> dict[str, Any]:
    """The settings of a config file, checked and typed for ``parser``.

    Reads YAML or JSON (by suffix, `load_config_file`); the file must be a non-empty mapping. A
    seed-style timm YAML is translated (`seed.recipe_settings`, the one place that knows that
    dialect); our files may spell sparsity keys the seed's way. Keys must be fields of the
    parser's dataclasses (or the recipe's aliases); numbers written as strings (PyYAML reads
    ``1e-3`` as one) become numbers; relative `PATH_KEYS` are read next to the file.
    """
    data, lines = load_config_file(path)
    fields = _fields(parser.dataclass_types)
    data = {spec.aliases.get(k, k): v for k, v in data.items()}
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        data, seed_notes, seed = recipe_settings(data, set(fields), world_size)
    except RecipeConfigError:
        raise
    except NMSparsityConfigError as exc:  # the seed translation's refusals, named by file
        raise RecipeConfigError(f"{Path(path).name}: {exc}") from None
    if seed:
        notes.append(f"{Path(path).name}: seed (timm) keys translated")
    notes += seed_notes
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=1)
            hint = f"did you mean {close[0]!r}?" if close else "see --help for the settings."
            raise RecipeConfigError(f"{_where(path, lines, key)}: unknown setting {key!r}; {hint}")
    for key in PATH_KEYS:
        value = data.get(key)
        if isinstance(value, str) and not Path(value).exists():
            beside = Path(path).parent / value
            data[key] = str(beside) if beside.exists() else value
    return {k: _typed(v, fields[k], _where(path, lines, k), k) for k, v in data.items()}


def load_config_file(path: str | Path) -> tuple[dict[str, Any], dict[str, int]]:
    """``(mapping, line of each top-level key)`` of a YAML/JSON config file: `read_config_file`
    (the one reader of config files), its refusals raised as `RecipeConfigError`."""
    return read_config_file(path, error=RecipeConfigError)


def _fields(dataclass_types) -> dict[str, Any]:
    """Field name -> type, over the dataclasses (type hints resolved)."""
    out: dict[str, Any] = {}
    for dtype in dataclass_types:
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
def check_run_settings(values: dict[str, Any], origin: str) -> None:
    """Settings the Trainer would accept silently or fail on with a traceback: a ``run_name``
    longer than `MAX_RUN_NAME`, an ``accelerator_config`` file that does not exist, ``deepspeed``
    without DeepSpeed installed."""
    run_name = values.get("run_name")
    if isinstance(run_name, str) and len(run_name) > MAX_RUN_NAME:
        raise RecipeConfigError(
            f"{origin}: run_name is {len(run_name)} characters ({run_name[:24]!r}...); at most "
            f"{MAX_RUN_NAME}. Pass a short name."
        )
    accelerator = values.get("accelerator_config")
    if isinstance(accelerator, str) and not os.path.isfile(accelerator):
        raise RecipeConfigError(
            f"{origin}: accelerator_config={accelerator!r} is not a file; pass the path of a "
            f"JSON file of accelerate's AcceleratorConfig, or leave it out."
        )
    if values.get("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        raise RecipeConfigError(
            f"{origin}: deepspeed={values['deepspeed']!r} but DeepSpeed is not installed; "
            f"pip install deepspeed, or leave deepspeed out (FSDP: accelerate_configs/fsdp.yaml)."
        )


def _build(parser, namespace: dict[str, Any], origin: str):
    """The dataclasses from the parsed namespace; a failed check becomes one line."""
    out = []
    for dtype in parser.dataclass_types:
        names = {f.name for f in dataclasses.fields(dtype) if f.init}
        try:
            out.append(dtype(**{k: v for k, v in namespace.items() if k in names}))
        except (ValueError, TypeError, ImportError, OSError) as exc:
            message = " ".join(str(exc).split())
            raise RecipeConfigError(f"{origin}: {message}") from None
    return out


def _resolve(parsed, given: set[str], notes: list[str]) -> None:
    """Settings that depend on others: data from ``train_dir`` (image recipes),
    ``do_train``/``do_eval``, the output directory (named after the pattern actually used) and
    ``resume_from_checkpoint``."""
    model_args, data_args, args, script = parsed
    if hasattr(script, "train_dir"):
        _data_dirs(script, data_args)
    if "do_train" not in given:  # as in the example scripts, --do_eval alone only evaluates
        args.do_train = "do_eval" not in given
    if "do_eval" not in given and "do_train" not in given:
        args.do_eval = True
    if not (args.do_train or args.do_eval):
        raise RecipeConfigError("do_train and do_eval are both false: nothing to do.")
    args.output_dir = _output_dir(args, model_args, given)
    args.resume_from_checkpoint = _resume(args.resume_from_checkpoint, args.output_dir, notes)


def _data_dirs(script, data_args) -> None:
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


def _output_dir(args, model_args, given: set[str]) -> str:
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
    """``true`` -> the newest readable checkpoint in ``output_dir`` (damaged newer ones are
    skipped with a warning naming them; none: start, with a note), ``false`` -> none, a path ->
    that checkpoint (it must exist)."""
    if value is None or str(value).strip().lower() in FALSE:
        return None
    if str(value).strip().lower() in TRUE:
        from ..integrations.resume import last_readable_checkpoint

        last = last_readable_checkpoint(output_dir) if os.path.isdir(output_dir) else None
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
