"""`NMSparsityConfig`: every parameter of the method (SPEC §2), validated in one place.

The config reads three spellings of the same recipe:

* our own field names (``n_keep``, ``m``, ``mask_decay`` ...), from Python, a dict or YAML;
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

SPARSITY_TYPES = ("dense", "structure_nm", "srste")
DECAY_TYPES = ("step", "linear", "exp")
STRUCTURE_DECAY_TYPES = ("sparsify", "fine")
LOCATIONS = ("FF", "Q", "K", "V", "O", "C")
SPARSE_DIMS = ("row", "col")
FINETUNE_MASKS = ("recompute", "frozen")

# Seed spellings of enum values -> ours. Matching is case-insensitive.
_ENUM_ALIASES: dict[str, dict[str, str]] = {
    "sparsity_type": {
        "dense": "dense",
        "structure_nm": "structure_nm",
        "structured_nm": "structure_nm",
        "structure-nm": "structure_nm",
        "nm": "structure_nm",
        "srste": "srste",
        "sr-ste": "srste",
        "sr_ste": "srste",
    },
    "decay_type": {
        "step": "step",
        "linear": "linear",
        "lin": "linear",
        "exp": "exp",
        "exponential": "exp",
    },
    "structure_decay_type": {
        "sparsify": "sparsify",
        "stepwise": "sparsify",
        "fine": "fine",
        "geometric": "fine",
    },
    "sparse_dim": {"row": "row", "col": "col", "column": "col"},
    "finetune_mask": {"recompute": "recompute", "frozen": "frozen"},
}

# Seed YAML keys (and a few natural variants) -> our field names.
SEED_KEY_ALIASES: dict[str, str] = {
    "n_sparsity": "n_keep",
    "m_sparsity": "m",
    "n_sparsity_qkv": "n_keep_qkv",
    "m_sparsity_qkv": "m_qkv",
    "n": "n_keep",
    "sparsity_loc": "locations",
    "decay_coef": "decay_coef",
    "dense_steps": "dense_fraction",
    "dense_epochs": "dense_fraction",
    "fine_tune_steps": "finetune_fraction",
    "fine_tune_epochs": "finetune_fraction",
    "finetune_steps": "finetune_fraction",
    "structure_decay_flag": "structure_decay",
    "sparse_dim": "sparse_dim",
}


def _norm_key(key: str) -> str:
    return key.strip().lower().replace("-", "_")


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [part for part in (p.strip() for p in value.split(",")) if part]
    return [str(v).strip() for v in value]


def parse_locations(value: Any) -> tuple[str, ...]:
    """Parse ``"FF,Q,K"``, ``"FF,QKV"`` or ``["ff", "q"]`` into a sorted tuple of locations.

    ``QKV`` expands to ``Q, K, V``. Raises `NMSparsityConfigError` naming an unknown location.
    """
    out: list[str] = []
    for raw in _as_list(value):
        token = raw.upper()
        parts = ["Q", "K", "V"] if token == "QKV" else [token]
        for part in parts:
            if part not in LOCATIONS:
                raise NMSparsityConfigError(
                    f"locations: unknown location {raw!r}. Use a comma-separated subset of "
                    f"{', '.join(LOCATIONS)} (QKV is shorthand for Q,K,V), e.g. 'FF,Q,K'."
                )
            if part not in out:
                out.append(part)
    return tuple(loc for loc in LOCATIONS if loc in out)


def _enum(field_name: str, value: Any) -> str:
    aliases = _ENUM_ALIASES[field_name]
    key = str(value).strip().lower()
    if key not in aliases:
        allowed = sorted(set(aliases.values()))
        raise NMSparsityConfigError(
            f"{field_name}: unknown value {value!r}. Use one of {allowed}"
            + (
                f" (seed spellings such as {sorted(k.upper() for k in aliases)} are accepted too)."
                if field_name != "finetune_mask"
                else "."
            )
        )
    return aliases[key]


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


@dataclass
class NMSparsityConfig:
    """How a model is made N:M sparse during training (SPEC §2-§4).

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

    Targets
        target_modules: overrides the model-family preset, PEFT-style: a string is a regular
            expression that must match the whole module name; a list matches exact names or name
            suffixes at a dot boundary (``"fc1"`` matches ``...mlp.fc1``).
        exclude_modules: the same forms; matching modules stay dense.
    """

    n_keep: int = 2
    m: int = 4
    n_keep_qkv: int | None = None
    m_qkv: int | None = None
    sparse_dim: str = "row"
    locations: tuple[str, ...] | list[str] | str = ("FF",)

    sparsity_type: str = "structure_nm"
    decay_type: str = "step"
    decay_coef: float = 1e-4
    structure_decay: bool = False
    structure_decay_type: str = "sparsify"
    structure_decay_start_k: int = 8
    structure_decay_fallback: bool = False
    srste_lambda: float = 2e-4

    dense_fraction: float = 0.0
    finetune_fraction: float = 0.0
    finetune_mask: str = "recompute"

    target_modules: str | list[str] | None = None
    exclude_modules: str | list[str] | None = None

    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.sparsity_type = _enum("sparsity_type", self.sparsity_type)
        self.decay_type = _enum("decay_type", self.decay_type)
        self.structure_decay_type = _enum("structure_decay_type", self.structure_decay_type)
        self.sparse_dim = _enum("sparse_dim", self.sparse_dim)
        self.finetune_mask = _enum("finetune_mask", self.finetune_mask)
        self.structure_decay = _to_bool("structure_decay", self.structure_decay)
        self.structure_decay_fallback = _to_bool(
            "structure_decay_fallback", self.structure_decay_fallback
        )
        self.locations = parse_locations(self.locations)
        if self.sparsity_type != "dense" and not self.locations:
            raise NMSparsityConfigError(
                "locations: empty. Name at least one of FF, Q, K, V, O, C, or set "
                "sparsity_type='dense' for a dense run."
            )
        if self.n_keep_qkv is None:
            self.n_keep_qkv = self.n_keep
        if self.m_qkv is None:
            self.m_qkv = self.m
        for n_name, m_name in (("n_keep", "m"), ("n_keep_qkv", "m_qkv")):
            n_val, m_val = getattr(self, n_name), getattr(self, m_name)
            for name, val in ((n_name, n_val), (m_name, m_val)):
                if isinstance(val, bool) or not isinstance(val, int):
                    if isinstance(val, float) and val.is_integer():
                        setattr(self, name, int(val))
                        continue
                    raise NMSparsityConfigError(f"{name}: expected an integer, got {val!r}.")
            n_val, m_val = getattr(self, n_name), getattr(self, m_name)
            if not 0 < n_val < m_val:
                raise NMSparsityConfigError(
                    f"{n_name}:{m_name} = {n_val}:{m_val} is not a sparse pattern: N counts the "
                    f"weights kept in each group of M and needs 0 < N < M (e.g. 2:4, 1:8)."
                )
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
        for name in ("decay_coef", "srste_lambda"):
            val = _to_float(name, getattr(self, name))
            if val < 0 or math.isnan(val) or math.isinf(val):
                raise NMSparsityConfigError(
                    f"{name} = {getattr(self, name)!r} must be a finite number >= 0."
                )
            setattr(self, name, val)
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
        for name in ("target_modules", "exclude_modules"):
            val = getattr(self, name)
            if val is None or isinstance(val, str):
                continue
            if isinstance(val, Iterable):
                setattr(self, name, [str(v) for v in val])
            else:
                raise NMSparsityConfigError(
                    f"{name}: expected a regex string or a list of names, got {val!r}."
                )

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
        for section in ("sparsity", "nm_sparsity"):
            if isinstance(data.get(section), Mapping):
                data = data[section]
                break
        known, rest = cls.split_known_keys(data)
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
        """Read a YAML file (ours or a seed-style one) with `yaml.safe_load`; see `from_dict`."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise NMSparsityConfigError(f"config file {str(path)!r} does not exist.")
        with path.open() as fh:
            data = yaml.safe_load(fh) or {}
        try:
            return cls.from_dict(data, ignore_unknown=ignore_unknown)
        except NMSparsityConfigError as exc:
            raise NMSparsityConfigError(f"{path}: {exc}") from None

    def to_yaml(self, path: str | Path) -> None:
        """Write `to_dict` as YAML."""
        import yaml

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
