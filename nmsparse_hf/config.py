"""`NMSparsityConfig`: every parameter of the method (docs/METHOD.md §2), validated in one place.

The config reads three spellings of the same recipe:

* our own field names (``n_keep``, ``m``, ``decay_type`` ...), from Python, a dict or YAML;
* the seed research code's YAML keys and enum spellings (``n_sparsity``, ``sparsity_type:
  STRUCTURED_NM``, ``decay_type: EXP``, ``dense_steps``, ``sparse_dim: ROW`` ...), which map to the
  same meaning;
* a full seed training YAML, where the sparsity keys sit beside timm's training keys: use
  ``from_yaml(path, ignore_unknown=True)`` or ``split_known_keys`` to take only the sparsity part.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import NMSparsityConfigError

LOCATIONS = ("FF", "Q", "K", "V", "O", "C")
SPARSE_DIMS = ("row", "col")

# The values each enum field takes.
_ENUM_VALUES: dict[str, tuple[str, ...]] = {
    "sparsity_type": ("dense", "structure_nm", "srste"),
    "decay_type": ("step", "linear", "exp"),
    "structure_decay_type": ("sparsify", "fine"),
    "sparse_dim": SPARSE_DIMS,
    "finetune_mask": ("recompute", "frozen"),
    "mask_source": ("magnitude", "weights"),
}

# Other spellings of enum values (the seed's and a few natural variants) -> ours. Matching is
# case-insensitive.
_ENUM_ALIASES: dict[str, dict[str, str]] = {
    "sparsity_type": {
        "structured_nm": "structure_nm",
        "structure-nm": "structure_nm",
        "nm": "structure_nm",
        "sr-ste": "srste",
        "sr_ste": "srste",
    },
    "decay_type": {"lin": "linear", "exponential": "exp"},
    "structure_decay_type": {"stepwise": "sparsify", "geometric": "fine"},
    "sparse_dim": {"column": "col"},
    "finetune_mask": {},
    "mask_source": {},
}

# Seed YAML keys (and a few natural variants) -> our field names.
SEED_KEY_ALIASES: dict[str, str] = {
    "n_sparsity": "n_keep",
    "m_sparsity": "m",
    "n_sparsity_qkv": "n_keep_qkv",
    "m_sparsity_qkv": "m_qkv",
    "n": "n_keep",
    "sparsity_loc": "locations",
    "dense_steps": "dense_fraction",
    "dense_epochs": "dense_fraction",
    "fine_tune_steps": "finetune_fraction",
    "fine_tune_epochs": "finetune_fraction",
    "finetune_steps": "finetune_fraction",
    "structure_decay_flag": "structure_decay",
}


SPARSITY_SECTIONS = ("sparsity", "nm_sparsity")


def sparsity_section(data: Mapping[str, Any]) -> dict[str, Any]:
    """A config mapping with its ``sparsity:`` (or ``nm_sparsity:``) section, if it has one,
    lifted to the top level beside the other keys (a key set both inside and outside the section
    is an error naming it). The one reading of that section, for `NMSparsityConfig.from_dict`
    and the recipes' config files alike."""
    for name in SPARSITY_SECTIONS:
        section = data.get(name)
        if isinstance(section, Mapping):
            rest = {k: v for k, v in data.items() if k != name}
            both = sorted(set(map(str, rest)) & set(map(str, section)))
            if both:
                raise NMSparsityConfigError(
                    f"{', '.join(both)} set both under {name}: and at the top level; keep one."
                )
            return {**rest, **section}
    return dict(data)


def _norm_key(key: str) -> str:
    return key.strip().lower().replace("-", "_")


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [part for part in (p.strip() for p in value.split(",")) if part]
    return [str(v).strip() for v in value]


def parse_locations(value: Any) -> tuple[str, ...]:
    """Parse a location list into a sorted tuple of locations.

    Accepts ``"FF,Q,K"``, ``["ff", "q"]``, and the seed's concatenated spellings (``"KQFF"``,
    ``"QKVFF"``, ``"FF,QKV"``), in any order and case. The seed tests each location by substring
    (``"Q" in sparsity_loc``); here each comma-separated token must split completely into location
    names, so ``KQFF`` means FF, Q, K and a typo such as ``FN`` is refused instead of silently
    meaning nothing. Raises `NMSparsityConfigError` naming an unknown location.
    """
    if isinstance(value, Mapping) or not isinstance(value, str | Iterable | None):
        raise NMSparsityConfigError(
            f"locations: expected a comma-separated string or a list of location names, got "
            f"{value!r}; write e.g. 'FF,Q,K' (or the list [FF, Q, K] in YAML)."
        )
    out: set[str] = set()
    for raw in _as_list(value):
        parts = _split_location_token(raw.upper().replace(" ", ""))
        if parts is None:
            raise NMSparsityConfigError(
                f"locations: unknown location {raw!r}. Use a comma-separated subset of "
                f"{', '.join(LOCATIONS)} (QKV is shorthand for Q,K,V; the seed's concatenated "
                f"spellings such as KQFF or QKVFF work too), e.g. 'FF,Q,K'."
            )
        out.update(parts)
    return tuple(loc for loc in LOCATIONS if loc in out)


def _split_location_token(token: str) -> list[str] | None:
    """Split ``"KQFF"`` into ``["K", "Q", "FF"]``; ``None`` if it is not made of location names."""
    parts: list[str] = []
    while token:
        name = next((loc for loc in LOCATIONS if token.startswith(loc)), None)
        if name is None:
            return None
        parts.append(name)
        token = token[len(name) :]
    return parts or None


def _enum(field_name: str, value: Any) -> str:
    aliases = {v: v for v in _ENUM_VALUES[field_name]} | _ENUM_ALIASES[field_name]
    key = str(value).strip().lower()
    if key not in aliases:
        allowed = sorted(set(aliases.values()))
        raise NMSparsityConfigError(
            f"{field_name}: unknown value {value!r}. Use one of {allowed}"
            + (
                f" (seed spellings such as {sorted(k.upper() for k in aliases)} are accepted too)."
                if field_name not in ("finetune_mask", "mask_source")
                else "."
            )
        )
    return aliases[key]


def _to_int(field_name: str, value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise NMSparsityConfigError(f"{field_name}: expected an integer, got {value!r}.")
    return value


def _to_float(field_name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise NMSparsityConfigError(f"{field_name}: expected a number, got {value!r}.")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise NMSparsityConfigError(f"{field_name}: expected a number, got {value!r}.") from None


def _to_bool(field_name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off"):
        return False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise NMSparsityConfigError(f"{field_name}: expected true or false, got {value!r}.")


def _check_regex(field_name: str, pattern: str) -> None:
    """Refuse a ``target_modules`` / ``exclude_modules`` string that is not a valid regular
    expression (it is matched against whole module names with `re.fullmatch`)."""
    import re

    try:
        re.compile(pattern)
    except re.error as exc:
        raise NMSparsityConfigError(
            f"{field_name}: {pattern!r} is not a valid regular expression ({exc}); fix it, or "
            f"pass a list of module names."
        ) from None


MAX_CONFIG_BYTES = 1 << 20  # a config is a page of settings; anything larger is not one


def read_config_file(
    path: str | Path, error: type[NMSparsityConfigError] = NMSparsityConfigError
) -> tuple[dict[str, Any], dict[str, int]]:
    """``(mapping, line of each top-level key)`` of a YAML or JSON (by suffix) config file: the
    one reader of config files (`NMSparsityConfig.from_yaml`, the recipes, ``nmsparse``).

    Refused, each as one ``error`` line naming the file (and line): a missing file, one over
    `MAX_CONFIG_BYTES`, text that is not UTF-8, a syntax error, duplicate keys (YAML and JSON
    would keep the last silently), YAML anchors and aliases (so an alias bomb fails at its first
    anchor), an empty file, and a file that is not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"config file {str(path)!r} does not exist.")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise error(
            f"{path}: {size} bytes is not a config file (at most {MAX_CONFIG_BYTES} bytes of "
            f"'setting: value' lines); pass the right file."
        )
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(
            f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); save "
            f"the file as UTF-8."
        ) from None
    if not text.strip():
        raise error(
            f"{path}: the config file is empty; write 'setting: value' lines, or leave the file "
            f"out to use the defaults."
        )
    parse = _parse_json if path.suffix == ".json" else _parse_yaml
    data, lines = parse(path, text, error)
    if data is None:
        raise error(f"{path}: the config file holds no settings (only comments).")
    if not isinstance(data, dict):
        raise error(
            f"{path}: a config file is a mapping of 'setting: value' lines, but this one holds a "
            f"{type(data).__name__}; write e.g. 'learning_rate: 1e-3'."
        )
    return {str(k): v for k, v in data.items()}, lines


def _parse_json(path: Path, text: str, error: type[Exception]) -> tuple[Any, dict[str, int]]:
    import json

    def unique(pairs):
        keys = [k for k, _ in pairs]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise error(
                f"{path}: duplicate key {twice[0]!r} (JSON keeps the last silently); keep one."
            )
        return dict(pairs)

    try:
        return json.loads(text, object_pairs_hook=unique), {}
    except json.JSONDecodeError as exc:
        raise error(
            f"{path}:{exc.lineno}: JSON syntax error: {exc.msg} (column {exc.colno})."
        ) from None


def _strict_loader(text: str, path: Path, error: type[Exception]):
    """A `yaml.SafeLoader` over ``text`` that refuses anchors and aliases (a config has no use
    for them, and nested aliases expand exponentially) and duplicate keys (PyYAML keeps the last
    silently), each as one ``error`` naming the line."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise error(
                    f"{path}:{event.start_mark.line + 1}: YAML anchors and aliases (&name, "
                    f"*name) are not accepted in a config; write the values out."
                )
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                scalar = isinstance(key_node, yaml.ScalarNode)
                key = (key_node.tag, key_node.value) if scalar else None
                line = key_node.start_mark.line + 1
                if key is not None and key in seen:
                    raise error(
                        f"{path}:{line}: duplicate key {key_node.value!r} (first on line "
                        f"{seen[key]}); YAML would keep the last silently. Keep one."
                    )
                seen.setdefault(key, line)
            return super().construct_mapping(node, deep)

    return StrictLoader(text)


def _parse_yaml(path: Path, text: str, error: type[Exception]) -> tuple[Any, dict[str, int]]:
    import yaml

    loader = _strict_loader(text, path, error)
    try:
        node = loader.get_single_node()
        lines: dict[str, int] = {}
        if isinstance(node, yaml.MappingNode):
            lines = {str(k.value): k.start_mark.line + 1 for k, _ in node.value}
        return (loader.construct_document(node) if node is not None else None), lines
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise error(f"{where}: YAML syntax error: {problem}.") from None
    finally:
        loader.dispose()


@dataclass
class NMSparsityConfig:
    """How a model is made N:M sparse during training (docs/METHOD.md §2-§5).

    Pattern
        n_keep, m: the target N:M for feed-forward (``FF``), output-projection (``O``) and
            convolution (``C``) layers. N is the number of weights **kept** in each group of M
            (1:8 keeps 12.5%). Seed keys: ``n_sparsity``, ``m_sparsity``.
        n_keep_qkv, m_qkv: the target N:M for the Q, K and V projections, independent of the FF
            pattern. ``None`` uses ``n_keep``/``m``. Seed keys: ``n_sparsity_qkv``, ``m_sparsity_qkv``.
        sparse_dim: ``row`` groups along a Linear weight's input dimension (the hardware N:M
            layout); ``col`` along its output dimension.
        locations: which layers are sparse: a subset of ``FF, Q, K, V, O, C`` (``QKV`` expands to
            Q, K, V), as a list or a comma-separated string. Seed key: ``sparsity_loc``.

    Recipe
        sparsity_type: ``dense`` (no masking), ``structure_nm`` (masks with a straight-through
            gradient; with ``mask_decay`` linear/exp this is MDGF), or ``srste``.
        decay_type: the MDGF shape: ``step`` (binary mask at once: plain STE), ``linear`` or ``exp``.
            Only meaningful with ``sparsity_type="structure_nm"``.
        decay_coef: beta, the MDGF decay rate per optimizer step: linear alpha_j = max(1 - beta*j, 0),
            exp alpha_j = exp(-beta*j), j counted from the start of the sparse phase.
        structure_decay: SDGF on/off (seed: ``structure_decay_flag``).
        structure_decay_type: ``sparsify`` (stepwise: (M-1):M, M/2:M, ..., N:M) or ``fine``
            (geometric: (kN):(kM) for k = structure_decay_start_k, ..., 2, 1).
        structure_decay_start_k: the first k of the geometric schedule (a power of two, default 8).
        structure_decay_fallback: when an SDGF stage's M does not divide a layer's grouped
            dimension: ``False`` (default) fails at setup; ``True`` lets that layer skip the stage
            and use the next stage whose M fits (the target pattern must always fit).
        srste_lambda: the SR-STE decay strength lambda (the reference hard-coded 2e-4).

    Phases (fractions of the total number of optimizer steps)
        dense_fraction: the first fraction of training runs dense (seed: ``dense_steps``).
        finetune_fraction: the last fraction trains with the binary target mask (seed:
            ``fine_tune_steps``).
        finetune_mask: ``recompute`` (the mask follows |W| every step) or ``frozen`` (the mask is
            fixed when fine-tuning starts and pruned weights are held at exactly zero).
        mask_source: ``magnitude`` (default: the schedule above, masks from |W|) or ``weights``
            (the mask is the non-zero pattern of each targeted weight when the sparsifier is
            attached, e.g. of a one-shot pruned model; it must be N:M at the layer's target
            pattern and is held for the whole run, pruned weights at exactly zero, as with
            ``finetune_mask="frozen"`` from step 0). A held pattern has no dense phase, no SDGF
            stages, no MDGF decay and no SR-STE term: ``weights`` refuses ``dense_fraction > 0``,
            ``structure_decay``, ``decay_type`` linear/exp and ``sparsity_type="srste"``.

    Targets
        target_modules: overrides the model-family preset, PEFT-style: a string is a regular
            expression that must match the whole module name; a list matches exact names or name
            suffixes at a dot boundary (``"fc1"`` matches ``...mlp.fc1``).
        exclude_modules: the same forms; matching modules stay dense.
    """

    # Each field's default and help text are declared here once; SparseTrainingArguments copies
    # them for the command line.
    n_keep: int = field(
        default=2, metadata={"help": "N: weights KEPT in every group of M (FF, O, C)."}
    )
    m: int = field(
        default=4, metadata={"help": "M: the group length of the N:M pattern (FF, O, C)."}
    )
    n_keep_qkv: int | None = field(
        default=None, metadata={"help": "N for the Q, K, V projections (default: n_keep)."}
    )
    m_qkv: int | None = field(
        default=None, metadata={"help": "M for the Q, K, V projections (default: m)."}
    )
    sparse_dim: str = field(
        default="row",
        metadata={
            "help": "Group along a Linear weight's input ('row', the hardware layout) or "
            "output ('col')."
        },
    )
    locations: tuple[str, ...] | list[str] | str = field(
        default=("FF",),
        metadata={"help": "Sparse locations, comma-separated: FF, Q, K, V, O, C (QKV = Q,K,V)."},
    )

    sparsity_type: str = field(
        default="structure_nm",
        metadata={"help": "dense | structure_nm (STE; MDGF with decay_type linear/exp) | srste."},
    )
    decay_type: str = field(
        default="step", metadata={"help": "MDGF shape: step (binary at once) | linear | exp."}
    )
    decay_coef: float = field(
        default=1e-4,
        metadata={"help": "MDGF beta per optimizer step: linear 1-beta*j, exp exp(-beta*j)."},
    )
    structure_decay: bool = field(
        default=False, metadata={"help": "SDGF: tighten the pattern in stages."}
    )
    structure_decay_type: str = field(
        default="sparsify",
        metadata={"help": "SDGF: sparsify (stepwise (M-1):M ... N:M) | fine (geometric kN:kM)."},
    )
    structure_decay_start_k: int = field(
        default=8, metadata={"help": "First k of the geometric SDGF schedule (a power of two)."}
    )
    structure_decay_fallback: bool = field(
        default=False,
        metadata={"help": "Let a layer skip SDGF stages whose M does not divide its grouped dim."},
    )
    srste_lambda: float = field(default=2e-4, metadata={"help": "SR-STE decay strength lambda."})

    dense_fraction: float = field(
        default=0.0, metadata={"help": "Fraction of optimizer steps trained dense at the start."}
    )
    finetune_fraction: float = field(
        default=0.0,
        metadata={"help": "Fraction of optimizer steps at the end with the binary target mask."},
    )
    finetune_mask: str = field(
        default="recompute",
        metadata={
            "help": "recompute (mask follows |W|) | frozen (fixed mask, pruned weights kept at 0)."
        },
    )
    mask_source: str = field(
        default="magnitude",
        metadata={
            "help": "magnitude (masks from |W| per the schedule) | weights (hold each weight's "
            "non-zero pattern at attach, e.g. after one-shot pruning)."
        },
    )

    target_modules: str | list[str] | None = field(
        default=None,
        metadata={
            "help": "Override the model preset: module names or name suffixes (e.g. fc1 fc2); a "
            "single value with regex characters is a regex matched against the whole name."
        },
    )
    exclude_modules: str | list[str] | None = field(
        default=None, metadata={"help": "Modules kept dense (same forms as target_modules)."}
    )

    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._normalise_enums()
        self._check_locations()
        self._check_patterns()
        self._check_fractions()
        self._check_rates()
        self._check_recipe()
        self._check_mask_source()
        self._normalise_targets()

    # ------------------------------------------------------------------ validators
    def _normalise_enums(self) -> None:
        self.sparsity_type = _enum("sparsity_type", self.sparsity_type)
        self.decay_type = _enum("decay_type", self.decay_type)
        self.structure_decay_type = _enum("structure_decay_type", self.structure_decay_type)
        self.sparse_dim = _enum("sparse_dim", self.sparse_dim)
        self.finetune_mask = _enum("finetune_mask", self.finetune_mask)
        self.mask_source = _enum("mask_source", self.mask_source)
        self.structure_decay = _to_bool("structure_decay", self.structure_decay)
        self.structure_decay_fallback = _to_bool(
            "structure_decay_fallback", self.structure_decay_fallback
        )

    def _check_locations(self) -> None:
        self.locations = parse_locations(self.locations)
        if self.sparsity_type != "dense" and not self.locations:
            raise NMSparsityConfigError(
                "locations: empty. Name at least one of FF, Q, K, V, O, C, or set "
                "sparsity_type='dense' for a dense run."
            )

    def _check_patterns(self) -> None:
        if self.n_keep_qkv is None:
            self.n_keep_qkv = self.n_keep
        if self.m_qkv is None:
            self.m_qkv = self.m
        for n_name, m_name in (("n_keep", "m"), ("n_keep_qkv", "m_qkv")):
            n_val = _to_int(n_name, getattr(self, n_name))
            setattr(self, n_name, n_val)
            m_val = _to_int(m_name, getattr(self, m_name))
            setattr(self, m_name, m_val)
            if not 0 < n_val < m_val:
                raise NMSparsityConfigError(
                    f"{n_name}:{m_name} = {n_val}:{m_val} is not a sparse pattern: N counts the "
                    f"weights kept in each group of M and needs 0 < N < M (e.g. 2:4, 1:8)."
                )

    def _check_fractions(self) -> None:
        for name in ("dense_fraction", "finetune_fraction"):
            val = _to_float(name, getattr(self, name))
            if not 0.0 <= val <= 1.0 or math.isnan(val):
                raise NMSparsityConfigError(
                    f"{name} = {getattr(self, name)!r} is outside [0, 1]: it is a fraction of the "
                    f"total optimizer steps (e.g. 0.1 for the first/last 10%)."
                )
            setattr(self, name, val)
        if self.sparsity_type != "dense" and self.dense_fraction + self.finetune_fraction >= 1.0:
            raise NMSparsityConfigError(
                f"dense_fraction + finetune_fraction = {self.dense_fraction} + "
                f"{self.finetune_fraction} >= 1 leaves no sparse phase. Lower one of them so "
                f"their sum is below 1."
            )

    def _check_rates(self) -> None:
        for name in ("decay_coef", "srste_lambda"):
            val = _to_float(name, getattr(self, name))
            if val < 0 or math.isnan(val) or math.isinf(val):
                raise NMSparsityConfigError(
                    f"{name} = {getattr(self, name)!r} must be a finite number >= 0."
                )
            setattr(self, name, val)

    def _check_recipe(self) -> None:
        if self.sparsity_type == "srste" and self.decay_type != "step":
            raise NMSparsityConfigError(
                f"decay_type = {self.decay_type!r} with sparsity_type = 'srste': mask decay "
                f"(MDGF) applies to sparsity_type='structure_nm' only. Use decay_type='step' with "
                f"SR-STE, or sparsity_type='structure_nm' for MDGF."
            )
        k = self.structure_decay_start_k
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k & (k - 1):
            raise NMSparsityConfigError(
                f"structure_decay_start_k = {k!r} must be a power of two >= 1 (e.g. 8 gives "
                f"8N:8M, 4N:4M, 2N:2M, N:M)."
            )

    def _check_mask_source(self) -> None:
        if self.mask_source != "weights" or not self.enabled:
            return
        clashes = {
            "dense_fraction": (self.dense_fraction > 0, "0"),
            "structure_decay": (self.structure_decay, "False"),
            "decay_type": (self.mask_decay, "'step'"),
            "sparsity_type": (self.sparsity_type == "srste", "'structure_nm'"),
        }
        for name, (clash, fix) in clashes.items():
            if clash:
                raise NMSparsityConfigError(
                    f"{name} = {getattr(self, name)!r} with mask_source = 'weights': the mask is "
                    f"the weights' non-zero pattern, held for the whole run (no dense phase, no "
                    f"SDGF stages, no MDGF decay, no SR-STE term). Set {name}={fix}, or "
                    f"mask_source='magnitude' to train with the schedule."
                )

    def _normalise_targets(self) -> None:
        for name in ("target_modules", "exclude_modules"):
            val = getattr(self, name)
            if isinstance(val, str):
                _check_regex(name, val)
            if val is None or isinstance(val, str):
                continue
            if isinstance(val, Mapping) or not isinstance(val, Iterable):
                raise NMSparsityConfigError(
                    f"{name}: expected a regex string or a list of names, got {val!r}."
                )
            setattr(self, name, [str(v) for v in val])

    # ------------------------------------------------------------------ derived facts
    @property
    def enabled(self) -> bool:
        """True unless ``sparsity_type`` is ``dense``."""
        return self.sparsity_type != "dense"

    @property
    def mask_decay(self) -> bool:
        """True for MDGF: structure_nm with a linear or exp decay."""
        return self.sparsity_type == "structure_nm" and self.decay_type in ("linear", "exp")

    @property
    def recipe_name(self) -> str:
        """A short human name: dense, STE, SR-STE, MDGF-linear, SDGF-stepwise+MDGF-exp ..."""
        if not self.enabled:
            return "dense"
        parts = []
        if self.structure_decay:
            parts.append(
                "SDGF-stepwise" if self.structure_decay_type == "sparsify" else "SDGF-geometric"
            )
        if self.sparsity_type == "srste":
            parts.append("SR-STE")
        elif self.mask_decay:
            parts.append(f"MDGF-{self.decay_type}")
        elif not parts:
            parts.append("STE")
        return "+".join(parts)

    def target_pattern(self, location: str) -> tuple[int, int]:
        """The final (n_keep, m) for a location: Q/K/V use the qkv pattern, others the FF one."""
        if location in ("Q", "K", "V"):
            return (int(self.n_keep_qkv), int(self.m_qkv))
        return (self.n_keep, self.m)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON/YAML-safe dict of our field names; `from_dict` reads it back unchanged."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            val = getattr(self, f.name)
            out[f.name] = list(val) if isinstance(val, tuple) else val
        out["locations"] = ",".join(self.locations)
        return out

    @classmethod
    def split_known_keys(cls, data: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Split a mapping into (our field values, everything else).

        Accepts our field names and the seed's keys (case-insensitive, ``-`` or ``_``); a key that
        appears under two spellings with different values is an error.
        """
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known: dict[str, Any] = {}
        source: dict[str, str] = {}
        rest: dict[str, Any] = {}
        for raw_key, value in data.items():
            key = _norm_key(str(raw_key))
            target = SEED_KEY_ALIASES.get(key, key if key in names else None)
            if target is None:
                rest[raw_key] = value
                continue
            if target in known and known[target] != value:
                raise NMSparsityConfigError(
                    f"{raw_key} = {value!r} conflicts with {source[target]} = {known[target]!r}: "
                    f"both set {target}. Keep one of them."
                )
            known[target] = value
            source[target] = str(raw_key)
        return known, rest

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], ignore_unknown: bool = False) -> NMSparsityConfig:
        """Build a config from our keys or the seed's keys.

        A nested ``sparsity:`` (or ``nm_sparsity:``) section is read if present. Unknown keys are an
        error naming the closest known key, unless ``ignore_unknown`` (then they are kept in
        ``extra``).
        """
        if not isinstance(data, Mapping):
            raise NMSparsityConfigError(
                f"expected a mapping of sparsity settings, got {type(data).__name__}."
            )
        known, rest = cls.split_known_keys(sparsity_section(data))
        if rest and not ignore_unknown:
            vocab = sorted(
                ({f.name for f in dataclasses.fields(cls)} - {"extra"}) | set(SEED_KEY_ALIASES)
            )
            hints = []
            for key in rest:
                close = difflib.get_close_matches(_norm_key(str(key)), vocab, n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise NMSparsityConfigError(
                f"unknown sparsity keys: {', '.join(hints)}. Fix the spelling, or, for a full "
                f"training YAML, load it with ignore_unknown=True."
            )
        cfg = cls(**known)
        cfg.extra = dict(rest)
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path, ignore_unknown: bool = False) -> NMSparsityConfig:
        """Read a YAML file (ours or a seed-style one) with `read_config_file`; see `from_dict`.
        A file that is missing, not UTF-8 text, not valid YAML, empty, or not a mapping, or that
        repeats a key or uses YAML aliases, raises `NMSparsityConfigError`."""
        path = Path(path)
        data, _ = read_config_file(path)
        try:
            return cls.from_dict(data, ignore_unknown=ignore_unknown)
        except NMSparsityConfigError as exc:
            raise NMSparsityConfigError(f"{path}: {exc}") from None

    def to_yaml(self, path: str | Path) -> None:
        """Write `to_dict` as YAML."""
        import yaml

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
