"""Which layers of a model are sparse, and at which location (FF, Q, K, V, O, C).

Three ways to choose:

* **model-family presets**, one table keyed by ``config.model_type`` (`NM_TARGET_PRESETS`, in the
  manner of PEFT's ``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``): HF ViT, DeiT, Swin,
  Swinv2 (under the module names of transformers 5.x *and* the older names that checkpoints on disk
  still carry), timm ViT / Swin models bare or through transformers' ``TimmWrapper``, BERT,
  RoBERTa, DistilBERT, DeBERTa-v2, T5 / mT5, Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2, Phi-3
  and GPT-2. Each preset maps the layers of one family to Q, K, V, O and FF, so ``locations``
  and the Q/K/V pattern mean the same thing in every family. A fused projection (timm's
  ``attn.qkv``, Phi-3's ``qkv_proj``, GPT-2's ``c_attn``) is split into its Q, K and V row blocks
  (output features), each with its location's pattern;
* **explicit patterns**, PEFT-style, for any model: ``target_modules`` / ``exclude_modules``,
  matched against the current module names and against the names the checkpoint files use;
* ``target_modules="all-linear"``: every Linear / Conv1D except the output head, as in PEFT.

**PEFT models** (a ``PeftModel``, a PEFT tuner such as ``LoraModel``, or a transformers model
with adapters added in place): presets and patterns resolve against the names the layers had
before PEFT wrapped them (``model.layers.0.self_attn.q_proj``, not
``base_model.model.model.layers.0.self_attn.q_proj.base_layer``), the targeted module is the
wrapped base layer, and a target records its LoRA layer (`TargetLayer.adapter`) so that the
sparsifier can mask the adapter's delta too. LoRA matrices, dropout and ``modules_to_save``
copies are never targets (``all-linear`` included). PEFT is recognised by class names, never
imported here.

Never sparse in a preset: embeddings (patch and token), heads (classifier, pooler, ``lm_head``,
``score``), norms, position tables, Swin patch merging and Swinv2's continuous-position-bias MLP.
Every Linear/Conv1D/Conv2d layer that is not targeted is listed as skipped, with the reason.

GPT-2's ``transformers.pytorch_utils.Conv1D`` stores its weight ``[in, out]`` (the transpose of a
Linear; PEFT calls it ``fan_in_fan_out``). It is recognised by duck typing, so this module never
imports transformers; its groups run along the input dimension exactly as a Linear's do, and its
row blocks are columns of the stored weight.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import NMSparsityConfig
from .errors import NMTargetError
from .names import checkpoint_names

ALL_LINEAR = "all-linear"

# ---------------------------------------------------------------------------------- presets
# Location -> regular expression for the end of a module name (it must match whole dot-separated
# components). A fused location ("QKV", "KV") is split into row blocks, one per letter.
_VISION = {
    "QKV": r"attn\.qkv",
    "Q": r"q_proj|query",
    "K": r"k_proj|key",
    "V": r"v_proj|value",
    "O": r"o_proj|attention\.output\.dense|attn\.proj",
    "FF": r"mlp\.fc1|mlp\.fc2|intermediate\.dense|\d+\.output\.dense",
}
_BERT = {
    "Q": r"(attention|crossattention)\.self\.query",
    "K": r"(attention|crossattention)\.self\.key",
    "V": r"(attention|crossattention)\.self\.value",
    "O": r"(attention|crossattention)\.output\.dense",
    "FF": r"intermediate\.dense|\d+\.output\.dense",
}
_DEBERTA_V2 = {
    "Q": r"attention\.self\.query_proj",
    "K": r"attention\.self\.key_proj",
    "V": r"attention\.self\.value_proj",
    "O": r"attention\.output\.dense",
    "FF": r"intermediate\.dense|\d+\.output\.dense",
}
_DISTILBERT = {
    "Q": r"attention\.q_lin",
    "K": r"attention\.k_lin",
    "V": r"attention\.v_lin",
    "O": r"attention\.out_lin",
    "FF": r"ffn\.lin1|ffn\.lin2",
}
_T5 = {
    "Q": r"(SelfAttention|EncDecAttention)\.q",
    "K": r"(SelfAttention|EncDecAttention)\.k",
    "V": r"(SelfAttention|EncDecAttention)\.v",
    "O": r"(SelfAttention|EncDecAttention)\.o",
    "FF": r"DenseReluDense\.(wi|wo|wi_0|wi_1)",
}
_LLAMA = {
    "Q": r"self_attn\.q_proj",
    "K": r"self_attn\.k_proj",
    "V": r"self_attn\.v_proj",
    "O": r"self_attn\.o_proj",
    "FF": r"mlp\.(gate_proj|up_proj|down_proj)",
}
_PHI3 = {
    "QKV": r"self_attn\.qkv_proj",
    "O": r"self_attn\.o_proj",
    "FF": r"mlp\.(gate_up_proj|down_proj)",
}
_GPT2 = {  # Conv1D layers; cross-attention (add_cross_attention) fuses only K and V
    "QKV": r"attn\.c_attn",
    "KV": r"crossattention\.c_attn",
    "Q": r"crossattention\.q_attn",
    "O": r"(attn|crossattention)\.c_proj",
    "FF": r"mlp\.(c_fc|c_proj)",
}

NM_TARGET_PRESETS: dict[str, dict[str, str]] = {
    # vision (``timm``: timm models, bare or through TimmWrapper)
    "vit": _VISION,
    "deit": _VISION,
    "swin": _VISION,
    "swinv2": _VISION,
    "timm": _VISION,
    # encoders
    "bert": _BERT,
    "roberta": _BERT,
    "deberta-v2": _DEBERTA_V2,
    "distilbert": _DISTILBERT,
    # encoder-decoders
    "t5": _T5,
    "mt5": _T5,
    # decoders
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "phi3": _PHI3,
    "gpt2": _GPT2,
}
"""Layers a ``locations`` preset targets, by ``config.model_type``: location -> a regular
expression for the end of the module name (whole dot-separated components). Fused locations
(``QKV``, ``KV``) are split into one row block per letter."""

_LOCATION_ORDER = ("QKV", "KV", "Q", "K", "V", "O", "FF")
_Rules = list[tuple[re.Pattern[str], str]]


def _compile(preset: dict[str, str]) -> _Rules:
    return [
        (re.compile(rf"(^|\.)(?:{preset[loc]})$"), loc) for loc in _LOCATION_ORDER if loc in preset
    ]


_RULES: dict[str, _Rules] = {key: _compile(preset) for key, preset in NM_TARGET_PRESETS.items()}
# explicit patterns on a model without a preset: the vision rules (q_proj, query, mlp.fc1, ...)
_GENERIC_RULES = _RULES["vit"]

# Layers never sparse (presets and all-linear), with the reason shown in the report. The last
# one only in a preset: ``all-linear`` includes Swin's patch merging, as PEFT's does.
_NEVER_SPARSE: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"(^|\.)(patch_embeddings|patch_embed)(\.|$)"), "patch embedding (always dense)"),
    (
        re.compile(r"(^|\.)(continuous_position_bias_mlp|cpb_mlp)(\.|$)"),
        "Swinv2 position-bias MLP (always dense)",
    ),
    (
        re.compile(
            r"(^|\.)(classifier|head|fc_norm|pooler|lm_head|score|qa_outputs|pre_classifier|cls|"
            r"vocab_transform|vocab_projector)(\.|$)"
        ),
        "classifier head (always dense)",
    ),
]
_PRESET_ONLY_DENSE = (
    re.compile(r"(^|\.)downsample(\.|$)"),
    "patch merging (not a preset location)",
)

_TIMM_PREFIXES = ("vit_", "deit", "swin", "swinv2", "eva", "beit")
_TIMM_CLASSES = {"VisionTransformer", "SwinTransformer", "SwinTransformerV2", "Eva", "Beit"}


# ---------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class SparseBlock:
    """A part of a layer's weight that follows one location's pattern.

    ``rows`` is ``None`` for the whole weight, or ``(start, stop)`` output rows of a fused layer
    (for a Conv1D, whose weight is stored ``[in, out]``, those are columns of the stored weight).
    """

    location: str
    rows: tuple[int, int] | None = None

    def part(self, weight: torch.Tensor) -> torch.Tensor:
        """This block of ``weight`` laid out ``[out, in, ...]``: the weight itself, or a view of
        its rows."""
        return weight if self.rows is None else weight[self.rows[0] : self.rows[1]]


@dataclass
class TargetLayer:
    """A targeted layer: its name, the module, its kind and its sparse blocks.

    ``kind`` is ``linear``, ``conv1d`` (transformers' Conv1D, weight stored ``[in, out]``:
    ``fan_in_fan_out``) or ``conv``. On a PEFT model, ``name`` is the layer's name without PEFT's
    wrapping, ``module`` the wrapped base layer and ``adapter`` the PEFT layer around it (None
    elsewhere).
    """

    name: str
    module: nn.Module
    kind: str
    blocks: list[SparseBlock] = field(default_factory=list)
    adapter: nn.Module | None = None

    @property
    def locations(self) -> list[str]:
        return [b.location for b in self.blocks]

    @property
    def fan_in_fan_out(self) -> bool:
        """True when the stored weight is ``[in, out]`` (Conv1D): groups run along its dim 0."""
        return self.kind == "conv1d"

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight's shape as a Linear/Conv2d lays it out (``[out, in, ...]``)."""
        shape = tuple(self.module.weight.shape)
        return shape[::-1] if self.fan_in_fan_out else shape


@dataclass
class SkippedLayer:
    """A Linear/Conv1D/Conv2d layer left dense, and why."""

    name: str
    kind: str
    shape: tuple[int, ...]
    reason: str


# ---------------------------------------------------------------------------------- layers
def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (GPT-2 style: ``y = x @ W + b``, W stored ``[in, out]``),
    recognised by class name and shape so that transformers need not be imported."""
    weight = getattr(module, "weight", None)
    return (
        any(cls.__name__ == "Conv1D" for cls in type(module).__mro__)
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and getattr(module, "nf", None) == weight.shape[1]
    )


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv"
    if is_conv1d(module):
        return "conv1d"
    return None


# ---------------------------------------------------------------------------------- PEFT
# PEFT's wrappers, by class name: a tuner layer keeps the original under ``base_layer`` (LoRA
# adds lora_A / lora_B / lora_dropout ... beside it); a modules_to_save wrapper keeps it under
# ``original_module`` and trains a copy under ``modules_to_save``.
_TUNER_LAYER = "BaseTunerLayer"
_SAVE_WRAPPERS = ("ModulesToSaveWrapper", "AuxiliaryTrainingWrapper")
_WRAPPED = {_TUNER_LAYER: "base_layer", **{cls: "original_module" for cls in _SAVE_WRAPPERS}}


def _class_names(module: nn.Module) -> set[str]:
    return {cls.__name__ for cls in type(module).__mro__}


def _wrapped_child(module: nn.Module) -> str | None:
    """The child holding the original layer if ``module`` is a PEFT wrapper, else None."""
    return next((child for cls, child in _WRAPPED.items() if cls in _class_names(module)), None)


def peft_base_model(model: nn.Module) -> nn.Module:
    """The model inside PEFT's ``PeftModel`` and tuner (``LoraModel``) wrappers; ``model`` itself
    when it is not one (a transformers model with adapters added in place is its own base)."""
    while True:
        classes = _class_names(model)
        if {"PeftModel", "PeftMixedModel"} & classes and callable(
            getattr(model, "get_base_model", None)
        ):
            model = model.get_base_model()
        elif "BaseTuner" in classes and isinstance(getattr(model, "model", None), nn.Module):
            model = model.model
        else:
            return model


@dataclass
class _Walk:
    """The modules of a model under the names they had before PEFT wrapped them: ``modules``
    (original name, module), without adapter internals and ``modules_to_save`` copies;
    ``wrappers``: original name -> the PEFT wrapper around that layer."""

    modules: list[tuple[str, nn.Module]] = field(default_factory=list)
    wrappers: dict[str, nn.Module] = field(default_factory=dict)

    @classmethod
    def of(cls, model: nn.Module) -> _Walk:
        walk = cls()
        # a wrapper's module name -> (the child holding the original, the wrapper, its own name
        # as listed); named_modules lists a wrapper before everything inside it
        wrapped: dict[str, tuple[str, nn.Module, str]] = {}
        for raw, module in model.named_modules():
            name = raw
            parts = raw.split(".")
            owner = next(
                (p for i in range(len(parts) - 1, 0, -1) if (p := ".".join(parts[:i])) in wrapped),
                None,
            )
            if owner is not None:
                child, wrapper, owner_name = wrapped[owner]
                rest = parts[owner.count(".") + 1 :]
                if rest[0] != child:
                    continue  # adapter matrices, dropout, a modules_to_save copy
                name = ".".join([owner_name, *rest[1:]])
                if len(rest) == 1:
                    walk.wrappers[name] = wrapper
            child = _wrapped_child(module)
            if child is not None and raw:
                wrapped[raw] = (child, module, name)
                continue  # listed under its name as the original layer inside it
            walk.modules.append((name, module))
        return walk

    def layers(self) -> list[tuple[str, nn.Module, str]]:
        """(name, module, kind) of every Linear / Conv1D / Conv2d."""
        return [(n, m, k) for n, m in self.modules if (k := _kind(m)) is not None]


def model_family(model: nn.Module) -> str | None:
    """The `NM_TARGET_PRESETS` key of ``model``: its ``config.model_type``, ``timm`` for timm
    models (bare or through TimmWrapper), or None when no preset fits."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in NM_TARGET_PRESETS:
        return model_type
    if model_type == "timm_wrapper":
        arch = str(getattr(config, "architecture", "")).lower()
        return "timm" if arch.startswith(_TIMM_PREFIXES) else None
    if type(model).__name__ in _TIMM_CLASSES and type(model).__module__.startswith("timm."):
        return "timm"
    return None


def _rule_location(name: str, rules: _Rules) -> str | None:
    for pattern, loc in rules:
        if pattern.search(name):
            return loc
    return None


def location_of(name: str, module: nn.Module, family: str | None = None) -> str:
    """The location a module's name implies under ``family``'s preset (the generic vision names
    without one): Q/K/V/O/FF, a fused ``QKV``/``KV``, C for any other Conv2d, FF for any other
    Linear or Conv1D (docs/METHOD.md §1, targets)."""
    loc = _rule_location(name, _RULES.get(family, _GENERIC_RULES))
    if loc is not None:
        return loc
    return "C" if isinstance(module, nn.Conv2d) else "FF"


# ---------------------------------------------------------------------------------- names
def matches(name: str, patterns: str | list[str] | None) -> bool:
    """PEFT's rule: a string is a regex that must match the whole name; a list matches exact names
    or name suffixes at a dot boundary."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


class _Names:
    """Each layer's names: current, and on disk where they differ (patterns match either)."""

    def __init__(self, model: nn.Module, layer_names: list[str], config: NMSparsityConfig):
        wanted = config.target_modules is not None or config.exclude_modules is not None
        self.disk = checkpoint_names(model, layer_names) if wanted else {}

    def of(self, name: str) -> tuple[str, ...]:
        disk = self.disk.get(name)
        return (name,) if disk is None else (name, disk)

    def match(self, name: str, patterns: str | list[str] | None) -> bool:
        return any(matches(n, patterns) for n in self.of(name))


def _nearest(entry: str, names: Iterable[str]) -> list[str]:
    """Layer names (or their dotted suffixes) closest to ``entry``."""
    candidates: set[str] = set()
    for name in names:
        parts = name.split(".")
        candidates.update(".".join(parts[i:]) for i in range(len(parts)))
    return difflib.get_close_matches(entry, sorted(candidates), n=3, cutoff=0.5)


def _check_patterns_match(
    model: nn.Module,
    config: NMSparsityConfig,
    walk: _Walk,
    names: _Names,
) -> None:
    """Every ``target_modules`` / ``exclude_modules`` entry (a regex string counts as one) must
    match at least one layer, by its current or its on-disk name; a target pattern must not
    match a module with weights that is not a layer."""
    if _is_all_linear(config.target_modules):
        patterns = {"exclude_modules": config.exclude_modules}
    else:
        patterns = {
            "target_modules": config.target_modules,
            "exclude_modules": config.exclude_modules,
        }
        _check_non_layers(walk, config.target_modules)
    all_names = [n for name, _, _ in walk.layers() for n in names.of(name)]
    for field_name, value in patterns.items():
        if value is None:
            continue
        entries = [value] if isinstance(value, str) else value
        for entry in entries:
            probe = entry if isinstance(value, str) else [entry]
            if any(matches(n, probe) for n in all_names):
                continue
            near = _nearest(entry, all_names)
            hint = (
                f"nearest layer names: {', '.join(map(repr, near))}"
                if near
                else f"layer names look like {', '.join(map(repr, all_names[:3]))}"
            )
            raise NMTargetError(
                f"{field_name}={value!r}: {entry!r} matches no nn.Linear/Conv1D/nn.Conv2d layer "
                f"of {type(model).__name__} ({hint}). A string is a regex matched against the "
                f"whole name, a list matches names or name suffixes; current module names and "
                f"the names in the checkpoint files both work."
            )


def _check_non_layers(walk: _Walk, patterns: str | list[str] | None) -> None:
    """A target pattern that names a module with weights of its own (LayerNorm, Embedding, ...)
    cannot be made N:M; containers and activations without parameters are passed over."""
    if patterns is None:
        return
    bad = [
        f"{name} ({type(module).__name__})"
        for name, module in walk.modules
        if _kind(module) is None
        and any(True for _ in module.parameters(recurse=False))
        and matches(name, patterns)
    ]
    if bad:
        raise NMTargetError(
            f"target_modules={patterns!r} matches modules that are neither nn.Linear nor "
            f"nn.Conv2d (nor transformers' Conv1D): {', '.join(bad[:5])}. Point the patterns at "
            f"the Linear/Conv2d layers inside them."
        )


def _is_all_linear(patterns: str | list[str] | None) -> bool:
    return patterns == ALL_LINEAR or patterns == [ALL_LINEAR]


# ---------------------------------------------------------------------------------- blocks
def _fused_sizes(location: str, out_features: int, model_config) -> list[int] | None:
    """Row counts of a fused projection's parts: from the attention shape in ``model_config``
    (grouped-query QKV, e.g. Phi-3) when it adds up, else equal parts, else None."""
    heads = getattr(model_config, "num_attention_heads", None)
    kv_heads = getattr(model_config, "num_key_value_heads", None)
    if location == "QKV" and heads and kv_heads:
        head_dim = getattr(model_config, "head_dim", None) or (
            getattr(model_config, "hidden_size", 0) // heads
        )
        q, kv = heads * head_dim, kv_heads * head_dim
        if q + 2 * kv == out_features:
            return [q, kv, kv]
    if out_features % len(location):
        return None
    return [out_features // len(location)] * len(location)


def _blocks(
    target: TargetLayer, location: str, wanted: tuple[str, ...] | None, model_config=None
) -> list[SparseBlock]:
    """The blocks of ``target`` at ``location``: a fused location split into one row block per
    letter (output features). Only ``wanted`` locations are kept (None: all)."""
    if location in ("QKV", "KV"):
        out_features = target.shape[0]
        sizes = _fused_sizes(location, out_features, model_config)
        if sizes is None:
            raise NMTargetError(
                f"{target.name}: a fused {location.lower()} layer needs out_features divisible "
                f"by {len(location)}, got {out_features}. Exclude it (exclude_modules) or target "
                f"it by name."
            )
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        parts = [
            SparseBlock(loc, (start, start + size))
            for loc, start, size in zip(location, starts, sizes, strict=True)
        ]
    else:
        parts = [SparseBlock(location)]
    return [p for p in parts if wanted is None or p.location in wanted]


# ---------------------------------------------------------------------------------- resolution
def _output_heads(model: nn.Module) -> set[int]:
    """ids of the output embedding (``get_output_embeddings``) — the head ``all-linear`` skips."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return set()
    base = getattr(head, "base_layer", None)  # a head PEFT wrapped
    return {id(head)} | ({id(base)} if isinstance(base, nn.Module) else set())


def _never_sparse(name: str, preset: bool) -> str | None:
    rules = _NEVER_SPARSE + [_PRESET_ONLY_DENSE] if preset else _NEVER_SPARSE
    return next((reason for pattern, reason in rules if pattern.search(name)), None)


class _Resolver:
    """Decides, layer by layer, whether it is targeted (and its blocks) or skipped (and why)."""

    def __init__(self, model: nn.Module, config: NMSparsityConfig, names: _Names):
        self.config = config
        self.names = names
        self.family = model_family(model)
        self.model_config = getattr(model, "config", None)
        self.all_linear = _is_all_linear(config.target_modules)
        self.explicit = config.target_modules is not None and not self.all_linear
        self.heads = _output_heads(model) if self.all_linear else set()

    def resolve(self, name: str, module: nn.Module, kind: str) -> TargetLayer | SkippedLayer:
        shape = tuple(module.weight.shape)
        target = TargetLayer(name, module, kind)
        reason = self._skip_reason(name, module, kind)
        if reason is not None:
            return SkippedLayer(name, kind, shape, reason)
        if self.explicit or self.all_linear:
            target.blocks = _blocks(
                target, location_of(name, module, self.family), None, self.model_config
            )
            return target
        location = "C" if kind == "conv" else _rule_location(name, _RULES[self.family])
        if location is None:
            return SkippedLayer(name, kind, shape, "no preset location for this layer")
        target.blocks = _blocks(target, location, self.config.locations, self.model_config)
        if not target.blocks:
            loc = "/".join(location) if location in ("QKV", "KV") else location
            return SkippedLayer(
                name, kind, shape, f"location {loc} not in locations {self.config.locations}"
            )
        return target

    def _skip_reason(self, name: str, module: nn.Module, kind: str) -> str | None:
        if self.names.match(name, self.config.exclude_modules):
            return "excluded by exclude_modules"
        if self.explicit:
            matched = self.names.match(name, self.config.target_modules)
            return None if matched else "not matched by target_modules"
        if self.all_linear:
            if kind == "conv":
                return "not a Linear/Conv1D (all-linear)"
            if id(module) in self.heads:
                return "output head (always dense)"
            return _never_sparse(name, preset=False)
        return _never_sparse(name, preset=True)


def _check_found(
    model: nn.Module, config: NMSparsityConfig, family: str | None, targets: list[TargetLayer]
) -> None:
    if config.target_modules is not None:
        if not targets:
            raise NMTargetError(
                f"target_modules={config.target_modules!r} leaves no layer of "
                f"{type(model).__name__} to sparsify after exclude_modules="
                f"{config.exclude_modules!r}. Narrow exclude_modules."
            )
        return
    found = {b.location for t in targets for b in t.blocks}
    missing = [loc for loc in config.locations if loc not in found]
    if missing:
        raise NMTargetError(
            f"locations {missing} match no layer of {type(model).__name__} (family "
            f"{family!r}; after exclude_modules). Drop them from locations, or name the layers "
            f"with target_modules."
        )


def _check_tied(model: nn.Module, targets: list[TargetLayer]) -> None:
    """Refuse a targeted weight that another module shares (tied ``lm_head`` / embeddings):
    masking it would silently mask the other module too."""
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append((f"{name}.{pname}" if name else pname, module))
    for target in targets:
        own = f"{target.name}.weight"
        others = [n for n, m in owners.get(id(target.module.weight), []) if m is not target.module]
        if others:
            raise NMTargetError(
                f"{own} is tied to {', '.join(others)} (the same tensor, e.g. "
                f"tie_word_embeddings=True): making {target.name} N:M would also zero entries "
                f"of {others[0].rsplit('.', 1)[0]}. Leave {target.name!r} out of target_modules "
                f"(or add it to exclude_modules), or untie the weights (e.g. "
                f"config.tie_word_embeddings=False before building the model)."
            )


def _attach_adapters(targets: list[TargetLayer], wrappers: dict[str, nn.Module]) -> None:
    """Record the PEFT layer around each targeted layer; refuse a target that PEFT trains as a
    ``modules_to_save`` copy (the copy, not the layer, is what trains and merges) or wraps in a
    tuner other than LoRA (whose delta the sparsifier cannot keep N:M)."""
    for target in targets:
        wrapper = wrappers.get(target.name)
        if wrapper is None:
            continue
        kind = type(wrapper).__name__
        if _TUNER_LAYER not in _class_names(wrapper):
            raise NMTargetError(
                f"{target.name} is in PEFT's modules_to_save ({kind}): PEFT trains and saves a "
                f"dense copy of it, so it cannot be N:M. Remove it from modules_to_save, or leave "
                f"it dense (exclude_modules={[target.name]!r})."
            )
        if not all(hasattr(wrapper, a) for a in ("lora_A", "lora_B", "scaling")):
            raise NMTargetError(
                f"{target.name} is wrapped by the PEFT tuner layer {type(wrapper).__module__}."
                f"{kind}, not LoRA: its weight update cannot be kept N:M. Use LoRA (LoraConfig), "
                f"or leave the layer dense (exclude_modules={[target.name]!r})."
            )
        target.adapter = wrapper


def _no_preset_error(model: nn.Module) -> NMTargetError:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return NMTargetError(
        f"model {type(model).__name__} (model_type={model_type!r}) has no nmsparse_hf preset "
        f"(presets: {', '.join(sorted(NM_TARGET_PRESETS))}, incl. TimmWrapper). Pass "
        f"target_modules, e.g. target_modules=['fc1', 'fc2'], a regex such as "
        f"r'.*\\.mlp\\.fc[12]', or 'all-linear'."
    )


def find_targets(
    model: nn.Module, config: NMSparsityConfig
) -> tuple[list[TargetLayer], list[SkippedLayer]]:
    """Resolve the sparse layers of ``model`` under ``config``.

    With ``config.target_modules`` set, every matching Linear/Conv1D/Conv2d is targeted whatever
    its location (the location, from the family's preset or the layer's name, still picks its
    pattern: Q/K/V use the qkv pattern); ``"all-linear"`` targets every Linear/Conv1D except the
    output head and the never-sparse layers. Otherwise the model-family preset targets the layers
    of ``config.locations``. ``exclude_modules`` applies last in every case. Patterns match the
    current module names and the on-disk names of a ``PreTrainedModel``. On a PEFT model they
    match the names the layers had before PEFT wrapped them, and the targets are the wrapped base
    layers (with their LoRA layer as `TargetLayer.adapter`).

    Raises:
        NMTargetError: no preset and no patterns; a pattern entry or a configured location that
            matches no layer (with the nearest names); a target pattern that matches a module
            with weights that is not a layer; a targeted weight tied to another module; a target
            that PEFT trains as a ``modules_to_save`` copy or wraps in a tuner other than LoRA.
    """
    model = peft_base_model(model)
    family = model_family(model)
    if config.target_modules is None and family is None:
        raise _no_preset_error(model)
    walk = _Walk.of(model)
    layers = walk.layers()
    names = _Names(model, [name for name, _, _ in layers], config)
    _check_patterns_match(model, config, walk, names)
    resolver = _Resolver(model, config, names)
    targets: list[TargetLayer] = []
    skipped: list[SkippedLayer] = []
    for name, module, kind in layers:
        result = resolver.resolve(name, module, kind)
        (targets if isinstance(result, TargetLayer) else skipped).append(result)
    _check_found(model, config, family, targets)
    _check_tied(model, targets)
    _attach_adapters(targets, walk.wrappers)
    return targets, skipped
