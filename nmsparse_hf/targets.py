"""Which layers of a model are sparse, and at which location (FF, Q, K, V, O, C).

Two ways to choose:

* **model-family presets** for HF ViT, Swin and Swinv2 image classifiers (under the module names of
  transformers 5.x *and* the older names that checkpoints on disk still carry) and for timm ViT /
  Swin models, bare or through transformers' ``TimmWrapper`` (timm's fused ``qkv`` is split into
  its Q, K and V row blocks);
* **explicit patterns**, PEFT-style, for any model: ``target_modules`` / ``exclude_modules``.

Never sparse in a preset: patch embeddings, classifier heads, norms, Swin patch merging and
Swinv2's continuous-position-bias MLP. Every Linear/Conv2d layer that is not targeted is listed as
skipped, with the reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from .config import NMSparsityConfig
from .errors import NMTargetError

# Location rules on the end of a module name, first match wins. Covers transformers 5.x names
# (q_proj, mlp.fc1), the older/on-disk names (attention.attention.query, intermediate.dense),
# Swinv2 (attention.self.query) and timm (attn.qkv, attn.proj, mlp.fc1).
_LOCATION_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"(^|\.)attn\.qkv$"), "QKV"),
    (re.compile(r"(^|\.)(q_proj|query)$"), "Q"),
    (re.compile(r"(^|\.)(k_proj|key)$"), "K"),
    (re.compile(r"(^|\.)(v_proj|value)$"), "V"),
    (re.compile(r"(^|\.)(o_proj|attention\.output\.dense|attn\.proj)$"), "O"),
    (re.compile(r"(^|\.)(mlp\.fc1|mlp\.fc2|intermediate\.dense|\d+\.output\.dense)$"), "FF"),
]

# Layers a preset always keeps dense, with the reason shown in the report.
_ALWAYS_DENSE: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"(^|\.)(patch_embeddings|patch_embed)(\.|$)"), "patch embedding (always dense)"),
    (
        re.compile(r"(^|\.)(continuous_position_bias_mlp|cpb_mlp)(\.|$)"),
        "Swinv2 position-bias MLP (always dense)",
    ),
    (re.compile(r"(^|\.)downsample(\.|$)"), "patch merging (not a preset location)"),
    (re.compile(r"(^|\.)(classifier|head|fc_norm|pooler)(\.|$)"), "classifier head (always dense)"),
]

_HF_FAMILIES = {"vit", "deit", "swin", "swinv2"}
_TIMM_PREFIXES = ("vit_", "deit", "swin", "swinv2", "eva", "beit")
_TIMM_CLASSES = {"VisionTransformer", "SwinTransformer", "SwinTransformerV2", "Eva", "Beit"}


@dataclass(frozen=True)
class SparseBlock:
    """A part of a layer's weight that follows one location's pattern.

    ``rows`` is ``None`` for the whole weight, or ``(start, stop)`` output rows (timm's fused qkv).
    """

    location: str
    rows: tuple[int, int] | None = None


@dataclass
class TargetLayer:
    """A targeted layer: its name, the module, ``linear`` or ``conv``, and its sparse blocks."""

    name: str
    module: nn.Module
    kind: str
    blocks: list[SparseBlock] = field(default_factory=list)

    @property
    def locations(self) -> list[str]:
        return [b.location for b in self.blocks]


@dataclass
class SkippedLayer:
    """A Linear/Conv2d layer left dense, and why."""

    name: str
    kind: str
    shape: tuple[int, ...]
    reason: str


def location_of(name: str, module: nn.Module) -> str:
    """The location a module's name implies: Q/K/V/O/FF (``QKV`` for a fused qkv), C for any
    other Conv2d, FF for any other Linear (SPEC §1, explicit targets)."""
    for pattern, loc in _LOCATION_RULES:
        if pattern.search(name):
            return loc
    return "C" if isinstance(module, nn.Conv2d) else "FF"


def _preset_location(name: str) -> str | None:
    for pattern, loc in _LOCATION_RULES:
        if pattern.search(name):
            return loc
    return None


def model_family(model: nn.Module) -> str | None:
    """``vit``, ``swin``, ``swinv2``, ``timm`` (incl. TimmWrapper), or None when no preset fits."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in _HF_FAMILIES:
        return "swinv2" if model_type == "swinv2" else ("swin" if model_type == "swin" else "vit")
    if model_type == "timm_wrapper":
        arch = str(getattr(config, "architecture", "")).lower()
        return "timm" if arch.startswith(_TIMM_PREFIXES) else None
    if type(model).__name__ in _TIMM_CLASSES and type(model).__module__.startswith("timm."):
        return "timm"
    return None


def matches(name: str, patterns: str | list[str] | None) -> bool:
    """PEFT's rule: a string is a regex that must match the whole name; a list matches exact names
    or name suffixes at a dot boundary."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv"
    return None


def _blocks(name: str, module: nn.Module, location: str, wanted: tuple[str, ...] | None):
    """Split a fused qkv into Q, K, V row blocks; keep only ``wanted`` locations (None: all)."""
    if location == "QKV":
        out_features = module.weight.shape[0]
        if out_features % 3:
            raise NMTargetError(
                f"{name}: a fused qkv layer needs out_features divisible by 3, got "
                f"{out_features}. Exclude it (exclude_modules) or target it by name."
            )
        d = out_features // 3
        parts = [SparseBlock(loc, (i * d, (i + 1) * d)) for i, loc in enumerate("QKV")]
    else:
        parts = [SparseBlock(location)]
    return [p for p in parts if wanted is None or p.location in wanted]


def find_targets(
    model: nn.Module, config: NMSparsityConfig
) -> tuple[list[TargetLayer], list[SkippedLayer]]:
    """Resolve the sparse layers of ``model`` under ``config``.

    With ``config.target_modules`` set, every matching Linear/Conv2d is targeted whatever its
    location (the location still picks its pattern: Q/K/V use the qkv pattern); otherwise the
    model-family preset targets the layers of ``config.locations``. ``exclude_modules`` applies
    last in both cases.

    Raises:
        NMTargetError: no preset and no patterns; a pattern or a configured location that matches
            no layer; a matched module that is neither Linear nor Conv2d.
    """
    explicit = config.target_modules is not None
    family = model_family(model)
    if not explicit and family is None:
        raise NMTargetError(
            f"model {type(model).__name__} "
            f"(model_type={getattr(getattr(model, 'config', None), 'model_type', None)!r}) has no "
            f"nmsparse_hf preset (presets: HF ViT, Swin, Swinv2, timm ViT/Swin incl. "
            f"TimmWrapper). Pass target_modules, e.g. target_modules=['fc1', 'fc2'] or a regex "
            f"such as r'.*\\.mlp\\.fc[12]'."
        )
    targets: list[TargetLayer] = []
    skipped: list[SkippedLayer] = []
    matched_non_layer: list[str] = []
    for name, module in model.named_modules():
        kind = _kind(module)
        if kind is None:
            # a matched module with weights of its own (LayerNorm, Embedding, ...) cannot be
            # made N:M; containers and activations without parameters are passed over
            has_own_params = any(True for _ in module.parameters(recurse=False))
            if explicit and has_own_params and matches(name, config.target_modules):
                matched_non_layer.append(f"{name} ({type(module).__name__})")
            continue
        shape = tuple(module.weight.shape)
        if matches(name, config.exclude_modules):
            skipped.append(SkippedLayer(name, kind, shape, "excluded by exclude_modules"))
            continue
        if explicit:
            if not matches(name, config.target_modules):
                skipped.append(SkippedLayer(name, kind, shape, "not matched by target_modules"))
                continue
            blocks = _blocks(name, module, location_of(name, module), None)
            targets.append(TargetLayer(name, module, kind, blocks))
            continue
        reason = next((r for p, r in _ALWAYS_DENSE if p.search(name)), None)
        if reason is not None:
            skipped.append(SkippedLayer(name, kind, shape, reason))
            continue
        location = _preset_location(name) if kind == "linear" else "C"
        if location is None:
            skipped.append(SkippedLayer(name, kind, shape, "no preset location for this layer"))
            continue
        blocks = _blocks(name, module, location, config.locations)
        if not blocks:
            loc = "Q/K/V" if location == "QKV" else location
            skipped.append(
                SkippedLayer(
                    name, kind, shape, f"location {loc} not in locations {config.locations}"
                )
            )
            continue
        targets.append(TargetLayer(name, module, kind, blocks))

    if matched_non_layer:
        raise NMTargetError(
            f"target_modules={config.target_modules!r} matches modules that are neither "
            f"nn.Linear nor nn.Conv2d: {', '.join(matched_non_layer[:5])}. Point the patterns at "
            f"the Linear/Conv2d layers inside them."
        )
    if explicit and not targets:
        raise NMTargetError(
            f"target_modules={config.target_modules!r} matches no nn.Linear/nn.Conv2d layer of "
            f"{type(model).__name__}. Layer names look like {_examples(skipped)}; a string is a "
            f"regex matched against the whole name, a list matches name suffixes."
        )
    if not explicit:
        found = {b.location for t in targets for b in t.blocks}
        missing = [loc for loc in config.locations if loc not in found]
        if missing:
            raise NMTargetError(
                f"locations {missing} match no layer of {type(model).__name__} (family "
                f"{family!r}; after exclude_modules). Drop them from locations, or name the layers "
                f"with target_modules."
            )
    return targets, skipped


def _examples(skipped: list[SkippedLayer]) -> str:
    names = [s.name for s in skipped[:3]]
    return ", ".join(repr(n) for n in names) if names else "(the model has no Linear layers)"
