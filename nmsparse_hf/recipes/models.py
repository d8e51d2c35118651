"""Which model a recipe trains: `ModelArguments`, the architectures it builds from scratch,
`build_model`, and `processor_for_eval_transform` (the image processor written beside a model
built from scratch, so that ``pipeline()`` preprocesses as the recipe evaluates)."""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..errors import NMSparsityConfigError

_SWIN_DIGITS = dict(
    image_size=16,
    patch_size=2,
    embed_dim=32,
    depths=[2, 2],
    num_heads=[2, 4],
    window_size=4,
    drop_path_rate=0.0,
)
# Architectures to build from scratch: family -> preset name -> config kwargs.
SCRATCH_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "vit": {
        "vit-digits": dict(
            image_size=16,
            patch_size=4,
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=256,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        ),
        "vit-s16": dict(
            image_size=224,
            patch_size=16,
            hidden_size=384,
            num_hidden_layers=12,
            num_attention_heads=6,
            intermediate_size=1536,
        ),
        "vit-b16": dict(
            image_size=224,
            patch_size=16,
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
        ),
    },
    "swin": {
        "swin-digits": _SWIN_DIGITS,
        "swin-t": dict(
            image_size=224,
            patch_size=4,
            embed_dim=96,
            depths=[2, 2, 6, 2],
            num_heads=[3, 6, 12, 24],
            window_size=7,
            drop_path_rate=0.2,
        ),
    },
    "swinv2": {
        "swinv2-digits": _SWIN_DIGITS,
        "swinv2-b": dict(
            image_size=256,
            patch_size=4,
            embed_dim=128,
            depths=[2, 2, 18, 2],
            num_heads=[4, 8, 16, 32],
            window_size=8,
            drop_path_rate=0.5,
        ),
    },
}


@dataclass
class ModelArguments:
    """Which model to train, where it comes from, and how it is evaluated.

    Args:
        model_name_or_path: Hub id or local path of a pretrained image classifier; ``None`` builds
            ``model_config`` from scratch.
        model_config: architecture to build from scratch (`SCRATCH_PRESETS` or
            ``timm:<architecture>``).
        config_overrides: ``key=value`` pairs applied to the model config; unknown keys are refused
            with the nearest valid name.
        model_revision / cache_dir / token / trust_remote_code: as in the transformers example
            scripts, passed to every ``from_pretrained``. ``trust_remote_code`` also allows
            ``metrics`` outside the shipped ones (they run code).
        ignore_mismatched_sizes: allow re-initialising a pretrained classifier head whose number
            of classes differs from the dataset's (refused otherwise).
        bce_loss: binary cross-entropy on (soft) one-hot labels; implied by mixup.
        metrics: comma-separated metric names (``accuracy``, ``top5`` ship with the package).
        license: the model card's license (default: the base model's, else ``other``).
    """

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or local path of a pretrained image classifier; None builds "
            "the model from --model_config to train from scratch."
        },
    )
    model_config: str = field(
        default="vit-digits",
        metadata={
            "help": "Architecture to build from scratch: vit-digits, vit-s16, vit-b16, "
            "swin-digits, swin-t, swinv2-digits, swinv2-b, or timm:<architecture> "
            "(e.g. timm:vit_base_patch16_224, through TimmWrapper)."
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated key=value pairs applied to the model config, e.g. "
            "'drop_path_rate=0.1,num_hidden_layers=6' (timm: passed as model_args)."
        },
    )
    model_revision: str = field(
        default="main",
        metadata={"help": "Branch, tag or commit of the pretrained model."},
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where downloaded models are cached."}
    )
    token: str | None = field(
        default=None,
        metadata={"help": "Hub token for private models (default: the one of `hf auth login`)."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Run code from the Hub or local files: custom model code, evaluate metrics "
            "other than the shipped accuracy/top5. Only for sources you trust."
        },
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={
            "help": "Re-initialise a pretrained classifier head whose number of classes differs "
            "from the dataset's (refused otherwise)."
        },
    )
    bce_loss: bool = field(
        default=False,
        metadata={
            "help": "Train with binary cross-entropy on (soft) one-hot labels, as the "
            "paper does; implied by mixup."
        },
    )
    metrics: str = field(
        default="accuracy,top5",
        metadata={
            "help": "Comma-separated metrics: accuracy, top5 (shipped); other evaluate names or "
            "scripts need --trust_remote_code."
        },
    )
    license: str | None = field(
        default=None,
        metadata={"help": "License of the model card (default: the base model's, else 'other')."},
    )

    def __post_init__(self) -> None:
        check_metrics(self.metric_names, self.trust_remote_code)
        parse_overrides(self.config_overrides)  # syntax errors now, unknown keys at build time

    @property
    def metric_names(self) -> list[str]:
        """The names in ``metrics``, stripped, in order."""
        return [m.strip() for m in self.metrics.split(",") if m.strip()]

    def hub_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of every ``from_pretrained`` call: revision, cache, token, trust."""
        return dict(
            revision=self.model_revision,
            cache_dir=self.cache_dir,
            token=self.token,
            trust_remote_code=self.trust_remote_code,
        )


def check_metrics(names: list[str], trust_remote_code: bool) -> None:
    """Refuse metrics that would run code unless ``trust_remote_code``: `evaluate.load` imports a
    local script, or downloads and imports a Hub module. The shipped names always pass."""
    from ..data.metrics import SHIPPED_METRICS

    if not names:
        raise NMSparsityConfigError("metrics is empty; use e.g. 'accuracy,top5'.")
    for name in names:
        if name in SHIPPED_METRICS or trust_remote_code:
            continue
        kind = "a local script" if name.endswith(".py") or "/" in name else "an evaluate module"
        raise NMSparsityConfigError(
            f"metrics: {name!r} is {kind}, which runs code when loaded. Use the shipped "
            f"{', '.join(sorted(SHIPPED_METRICS))}, or pass --trust_remote_code true if you "
            f"trust it."
        )


def _value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_overrides(text: str | None) -> dict[str, Any]:
    """``"a=1,b=0.1,c=[2,2]"`` -> ``{"a": 1, "b": 0.1, "c": [2, 2]}`` (values read as YAML)."""
    out: dict[str, Any] = {}
    if not text:
        return out
    depth, start = 0, 0
    parts = []
    for i, ch in enumerate(text):
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    for part in filter(None, (p.strip() for p in parts)):
        if "=" not in part:
            raise NMSparsityConfigError(
                f"config_overrides: {part!r} is not key=value (e.g. 'drop_path_rate=0.1')."
            )
        key, value = part.split("=", 1)
        out[key.strip()] = _value(value.strip())
    return out


def check_overrides(config, overrides: dict[str, Any], what: str) -> None:
    """Refuse ``config_overrides`` keys that ``config`` (a `PretrainedConfig`) does not have,
    naming the nearest valid key: a typo would otherwise be written into config.json unused."""
    valid = set(config.to_dict()) | set(getattr(config, "attribute_map", {}))
    valid |= set(inspect.signature(type(config).__init__).parameters) - {"self", "kwargs"}
    for key in overrides:
        if key not in valid:
            close = difflib.get_close_matches(key, sorted(valid), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise NMSparsityConfigError(
                f"config_overrides: {what} has no setting {key!r}; {hint}"
                f"valid keys are those of its config.json."
            )


def check_timm_architecture(name: str) -> None:
    """Refuse a timm architecture that timm does not know, naming close ones."""
    import timm

    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    prefix = name.split("_")[0]
    close = close or timm.list_models(f"{prefix}_*")[:3]
    hint = f" Close names: {', '.join(close)}." if close else ""
    raise NMSparsityConfigError(
        f"model_config='timm:{name}': timm {timm.__version__} has no architecture {name!r}.{hint}"
    )


@dataclass
class BuiltModel:
    """What `build_model` returns: the model, the processor that came with it (``None`` for a
    model built from scratch), what knows its normalisation (processor or config), and notes
    for the run's start."""

    model: Any
    processor: Any
    normalization_source: Any
    notes: list[str]


def build_model(
    model_args: ModelArguments, family: str, label_names: list[str] | None, num_labels: int
) -> BuiltModel:
    """The model to train, built from a pretrained checkpoint, a timm architecture or a preset.

    Every check (config_overrides keys, timm architecture, classifier head size) runs before any
    weight is created.
    """
    id2label = {i: name for i, name in enumerate(label_names)} if label_names else None
    labels = (
        dict(id2label=id2label, label2id={v: k for k, v in id2label.items()}) if id2label else {}
    )
    overrides = parse_overrides(model_args.config_overrides)
    if model_args.model_name_or_path:
        return _pretrained(model_args, overrides, num_labels, labels)
    name = model_args.model_config
    if name.startswith("timm:"):
        return _timm(name[5:], overrides, num_labels, labels)
    return _scratch(name, overrides, num_labels, labels)


def _pretrained(model_args: ModelArguments, overrides, num_labels: int, labels) -> BuiltModel:
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

    path, hub = model_args.model_name_or_path, model_args.hub_kwargs()
    config = AutoConfig.from_pretrained(path, **hub)
    check_overrides(config, overrides, f"model_name_or_path={path!r}")
    notes = []
    if config.num_labels != num_labels:
        if not model_args.ignore_mismatched_sizes:
            raise NMSparsityConfigError(
                f"model_name_or_path={path!r} has a {config.num_labels}-class head and the "
                f"dataset has {num_labels} classes: pass --ignore_mismatched_sizes true to "
                f"re-initialise the classifier head (its weights are then trained from scratch)."
            )
        notes.append(
            f"classifier head re-initialised: {path} has {config.num_labels} classes, the dataset "
            f"{num_labels} (--ignore_mismatched_sizes)"
        )
    for key, value in {**overrides, **labels, "num_labels": num_labels}.items():
        setattr(config, key, value)
    model = AutoModelForImageClassification.from_pretrained(
        path, config=config, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes, **hub
    )
    try:
        processor = AutoImageProcessor.from_pretrained(path, **hub)
    except (OSError, ValueError):
        processor = None
        notes.append(f"{path} ships no image processor: one matching the eval transform is saved")
    return BuiltModel(model, processor, processor or model.config, notes)


def _timm(arch: str, overrides, num_labels: int, labels) -> BuiltModel:
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    check_timm_architecture(arch)
    config = TimmWrapperConfig(
        architecture=arch, num_labels=num_labels, model_args=overrides or None
    )
    for key, value in labels.items():
        setattr(config, key, value)
    try:
        model = TimmWrapperForImageClassification(config)
    except TypeError as exc:
        raise NMSparsityConfigError(
            f"config_overrides: timm architecture {arch!r} refused {sorted(overrides)}: {exc}. "
            f"Use the keyword arguments of its timm model class."
        ) from None
    return BuiltModel(model, None, model.config, [])


def _scratch(name: str, overrides, num_labels: int, labels) -> BuiltModel:
    from transformers import AutoConfig, AutoModelForImageClassification

    model_type = _check_preset(name, overrides)
    preset = SCRATCH_PRESETS[model_type][name]
    config = AutoConfig.for_model(model_type, **{**preset, **overrides}, num_labels=num_labels)
    for key, value in labels.items():
        setattr(config, key, value)
    model = AutoModelForImageClassification.from_config(config)
    return BuiltModel(model, None, config, [])


def _check_preset(name: str, overrides: dict[str, Any]) -> str:
    """The model type of preset ``name``; refuses unknown presets and override keys."""
    from transformers import AutoConfig

    model_type = next((fam for fam, p in SCRATCH_PRESETS.items() if name in p), None)
    if model_type is None:
        presets = sorted(k for fam in SCRATCH_PRESETS.values() for k in fam)
        raise NMSparsityConfigError(
            f"model_config={name!r} is not a known architecture. Use one of {presets}, "
            f"timm:<architecture>, or --model_name_or_path for a pretrained model."
        )
    check_overrides(AutoConfig.for_model(model_type), overrides, f"model_config={name!r}")
    return model_type


def check_model_args(model_args: ModelArguments) -> None:
    """The checks of `build_model` that need no data (preset or timm architecture known,
    ``config_overrides`` keys valid; a pretrained model's config is read for that), run before
    any data is read."""
    overrides = parse_overrides(model_args.config_overrides)
    name = model_args.model_config
    if model_args.model_name_or_path:
        from transformers import AutoConfig

        path = model_args.model_name_or_path
        config = AutoConfig.from_pretrained(path, **model_args.hub_kwargs())
        check_overrides(config, overrides, f"model_name_or_path={path!r}")
    elif name.startswith("timm:"):
        check_timm_architecture(name[5:])
    else:
        _check_preset(name, overrides)


def processor_for_eval_transform(eval_transform, fallback_source: Any = None):
    """An image processor that preprocesses as ``eval_transform`` does, for
    ``pipeline("image-classification")`` on the saved model.

    Reads the steps of a torchvision ``Compose`` (``Resize`` of the short side, ``CenterCrop``,
    ``Normalize``) into a `BitImageProcessor` (resize the shortest edge, center crop, rescale
    1/255, normalize, convert to RGB). When the transform has another shape, the processor is
    built from ``fallback_source`` (mean, std and size of a processor or config; resize to
    size / 0.875, center crop).
    """
    from transformers import BitImageProcessor

    read = _read_eval_transform(eval_transform)
    if read is None:
        from ..data.arguments import DEFAULT_IMAGE_SIZE, EVAL_CROP_RATIO
        from ..data.transforms import normalization_from

        mean, std, size = normalization_from(fallback_source)
        size = size or DEFAULT_IMAGE_SIZE
        read = int(size / EVAL_CROP_RATIO), (size, size), mean, std, 2
    short, (height, width), mean, std, resample = read
    return BitImageProcessor(
        size={"shortest_edge": int(short)},
        crop_size={"height": int(height), "width": int(width)},
        resample=resample,
        image_mean=[float(v) for v in mean],
        image_std=[float(v) for v in std],
        do_convert_rgb=True,
    )


def _read_eval_transform(eval_transform):
    """``(short side, (crop h, crop w), mean, std, PIL resample)`` of a Resize -> CenterCrop ->
    ... -> Normalize ``Compose``, or ``None`` when it has another shape."""
    from PIL import Image
    from torchvision import transforms as T

    steps = list(getattr(eval_transform, "transforms", None) or [])
    resize = next((s for s in steps if isinstance(s, T.Resize)), None)
    crop = next((s for s in steps if isinstance(s, T.CenterCrop)), None)
    norm = next((s for s in steps if isinstance(s, T.Normalize)), None)
    if resize is None or crop is None or norm is None:
        return None
    size = [resize.size] if isinstance(resize.size, int) else list(resize.size)
    if len(size) != 1:  # a fixed (h, w) resize distorts; no shortest-edge processor does that
        return None
    crop_hw = tuple(crop.size) if len(crop.size) == 2 else (crop.size[0], crop.size[0])
    name = getattr(resize.interpolation, "value", str(resize.interpolation)).upper()
    resample = int(getattr(Image.Resampling, name, Image.Resampling.BILINEAR))
    return size[0], crop_hw, norm.mean, norm.std, resample
