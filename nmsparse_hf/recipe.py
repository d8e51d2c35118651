"""The training recipe behind ``recipes/train_vit.py`` and ``recipes/train_swin.py``.

Three dataclasses parsed by `HfArgumentParser` (`ModelArguments`, `data.DataArguments`,
`trainer.SparseTrainingArguments`) from flags, from our YAML/JSON, or from a seed-style timm YAML
(`seed_yaml_to_args`). The model comes from the Hub or a local path, or is built from a config to
train from scratch as the paper does. Training ends with the masks baked in, a verified sparse
checkpoint and a one-screen summary.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import NMSparsityConfig
from .errors import NMSparsityConfigError

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes" / "configs"

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
    """Which model to train."""

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
    bce_loss: bool = field(
        default=False,
        metadata={
            "help": "Train with binary cross-entropy on (soft) one-hot labels, as the "
            "paper does; implied by mixup."
        },
    )
    metrics: str = field(
        default="accuracy,top5",
        metadata={"help": "Comma-separated metrics: shipped accuracy/top5, or evaluate names."},
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


def build_model(
    model_args: ModelArguments, family: str, label_names: list[str] | None, num_labels: int
):
    """The model to train and the object that knows its normalisation (processor or config)."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

    id2label = {i: name for i, name in enumerate(label_names)} if label_names else None
    label2id = {name: i for i, name in id2label.items()} if id2label else None
    overrides = parse_overrides(model_args.config_overrides)
    if model_args.model_name_or_path:
        path = model_args.model_name_or_path
        kwargs = dict(num_labels=num_labels, ignore_mismatched_sizes=True, **overrides)
        if id2label:
            kwargs.update(id2label=id2label, label2id=label2id)
        model = AutoModelForImageClassification.from_pretrained(path, **kwargs)
        try:
            source = AutoImageProcessor.from_pretrained(path)
        except (OSError, ValueError):
            source = model.config
        return model, source
    name = model_args.model_config
    if name.startswith("timm:"):
        from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

        config = TimmWrapperConfig(
            architecture=name[5:], num_labels=num_labels, model_args=overrides or None
        )
        if id2label:
            config.id2label, config.label2id = id2label, label2id
        model = TimmWrapperForImageClassification(config)
        return model, model.config
    presets = {k: v for fam in SCRATCH_PRESETS.values() for k, v in fam.items()}
    if name not in presets:
        raise NMSparsityConfigError(
            f"model_config={name!r} is not a known architecture. Use one of {sorted(presets)}, "
            f"timm:<architecture>, or --model_name_or_path for a pretrained model."
        )
    model_type = next(fam for fam, p in SCRATCH_PRESETS.items() if name in p)
    config = AutoConfig.for_model(
        model_type, **{**presets[name], **overrides}, num_labels=num_labels
    )
    if id2label:
        config.id2label, config.label2id = id2label, label2id
    return AutoModelForImageClassification.from_config(config), config


# ------------------------------------------------------------------ seed (timm) YAML
# timm train.py keys of the seed's YAML that map onto ours; the rest are listed as ignored.
SEED_TIMM_KEYS = {
    "aa",
    "amp",
    "amp_dtype",
    "amp_impl",
    "aot_autograd",
    "aug_repeats",
    "aug_splits",
    "batch_size",
    "bce_loss",
    "bce_target_thresh",
    "bn_eps",
    "bn_momentum",
    "channels_last",
    "checkpoint_freq_epoch",
    "checkpoint_hist",
    "class_map",
    "clip_grad",
    "clip_mode",
    "color_jitter",
    "cooldown_epochs",
    "crop_pct",
    "cutmix",
    "cutmix_minmax",
    "data",
    "data_dir",
    "dataset",
    "dataset_download",
    "decay_epochs",
    "decay_milestones",
    "decay_rate",
    "dist_bn",
    "drop",
    "drop_block",
    "drop_connect",
    "drop_path",
    "epoch_repeats",
    "epochs",
    "eval_metric",
    "experiment",
    "fast_norm",
    "force_cpu",
    "fuser",
    "gp",
    "grad_checkpointing",
    "hflip",
    "img_size",
    "in_chans",
    "initial_checkpoint",
    "input_size",
    "interpolation",
    "jsd_loss",
    "layer_decay",
    "local_rank",
    "log_interval",
    "log_wandb",
    "lr",
    "lr_base",
    "lr_base_scale",
    "lr_base_size",
    "lr_cycle_decay",
    "lr_cycle_limit",
    "lr_cycle_mul",
    "lr_k_decay",
    "lr_noise",
    "lr_noise_pct",
    "lr_noise_std",
    "mean",
    "min_lr",
    "mixup",
    "mixup_mode",
    "mixup_off_epoch",
    "mixup_prob",
    "mixup_switch_prob",
    "model",
    "model_ema",
    "model_ema_decay",
    "model_ema_force_cpu",
    "momentum",
    "no_aug",
    "no_ddp_bb",
    "no_prefetcher",
    "no_resume_opt",
    "num_classes",
    "opt",
    "opt_betas",
    "opt_eps",
    "output",
    "patience_epochs",
    "pin_mem",
    "pretrained",
    "ratio",
    "recount",
    "recovery_interval",
    "remode",
    "reprob",
    "resplit",
    "resume",
    "save_images",
    "scale",
    "sched",
    "sched_on_updates",
    "seed",
    "smoothing",
    "split_bn",
    "start_epoch",
    "std",
    "sync_bn",
    "tta",
    "torchcompile",
    "torchscript",
    "train_interpolation",
    "train_split",
    "use_multi_epochs_loader",
    "val_split",
    "validation_batch_size",
    "vflip",
    "warmup_epochs",
    "warmup_lr",
    "warmup_prefix",
    "weight_decay",
    "worker_seeding",
    "workers",
}


def is_seed_yaml(data: dict, our_keys: set[str]) -> bool:
    """A seed-style file carries timm training keys (``model``, ``lr_base``, ``epochs`` ...) that
    are not ours; a file mixing such keys with unknown ones is reported by the parser."""
    foreign = set(data) - our_keys
    return bool(foreign & SEED_TIMM_KEYS)


def seed_yaml_to_args(data: dict, world_size: int = 1) -> tuple[dict, list[str]]:
    """Translate a seed (timm fork) training YAML into our argument dict.

    Returns ``(args, ignored)``: a dict for `HfArgumentParser.parse_dict` and the timm keys that
    have no equivalent here (reported, not silently dropped). Keys that are neither timm's nor
    sparsity keys are an error naming them. The learning rate follows timm's rule
    ``lr = lr_base * global_batch / lr_base_size``.
    """
    sparsity, rest = NMSparsityConfig.split_known_keys(data)
    unknown = sorted(k for k in rest if k not in SEED_TIMM_KEYS)
    if unknown:
        raise NMSparsityConfigError(
            f"unknown keys in the seed-style YAML: {unknown}. They are neither timm training keys "
            f"nor sparsity keys; fix their spelling or remove them."
        )
    out: dict[str, Any] = {k: v for k, v in sparsity.items()}
    if "locations" in out and isinstance(out["locations"], list | tuple):
        out["locations"] = ",".join(out["locations"])
    used: set[str] = set()

    def take(key, default=None):
        used.add(key)
        return rest.get(key, default)

    batch = int(take("batch_size", 32))
    out["per_device_train_batch_size"] = batch
    if take("validation_batch_size"):
        out["per_device_eval_batch_size"] = int(rest["validation_batch_size"])
    epochs = float(take("epochs", 1))
    out["num_train_epochs"] = epochs
    lr = take("lr")
    if lr is None:
        lr = float(take("lr_base", 1e-3)) * batch * world_size / float(take("lr_base_size", 256))
    out["learning_rate"] = float(lr)
    out["weight_decay"] = float(take("weight_decay", 0.0))
    if take("clip_grad") is not None:
        out["max_grad_norm"] = float(rest["clip_grad"])
    take("clip_mode")
    opt = str(take("opt", "adamw")).lower()
    out["optim"] = {"adamw": "adamw_torch", "sgd": "sgd", "adam": "adamw_torch"}.get(opt, opt)
    sched = str(take("sched", "cosine")).lower()
    out["lr_scheduler_type"] = {"cosine": "cosine", "step": "constant", "linear": "linear"}.get(
        sched, sched
    )
    warmup = float(take("warmup_epochs", 0) or 0)
    if epochs > 0 and warmup > 0:
        out["warmup_steps"] = warmup / epochs  # a float < 1 is a ratio of the total steps
    if take("amp", False):
        out["bf16"] = str(take("amp_dtype", "float16")) == "bfloat16"
        out["fp16"] = not out["bf16"]
    take("amp_dtype")
    take("amp_impl")
    out["seed"] = int(take("seed", 0))
    out["dataloader_num_workers"] = int(take("workers", 0))
    if take("smoothing"):
        out["label_smoothing_factor"] = float(rest["smoothing"])
    if take("grad_checkpointing"):
        out["gradient_checkpointing"] = True
    if take("mixup"):
        out["mixup_alpha"] = float(rest["mixup"])
        out["mixup_prob"] = float(take("mixup_prob", 1.0))
    aa = take("aa")
    if aa:
        # timm's "rand-m15-n2-p1-mstd0": magnitude and op count carry over; torchvision's
        # RandAugment has no per-op probability or magnitude noise
        tokens = [t for t in str(aa).split("-") if t[:1] in ("m", "n") and t[1:].isdigit()]
        out["randaugment"] = "-".join(tokens)
    if take("reprob"):
        out["random_erasing"] = float(rest["reprob"])
    if take("bce_loss"):
        out["bce_loss"] = True
    model = take("model")
    if model:
        out["model_config"] = f"timm:{model}"
        if take("pretrained"):
            out["model_name_or_path"] = f"timm/{model}"
    overrides = []
    if take("drop_path"):
        overrides.append(f"drop_path_rate={rest['drop_path']}")
    if take("drop"):
        overrides.append(f"drop_rate={rest['drop']}")
    if take("num_classes"):
        out["num_labels"] = int(rest["num_classes"])
    if overrides:
        out["config_overrides"] = ",".join(overrides)
    if take("data_dir"):
        out["data_dir"] = rest["data_dir"]
    dataset = take("dataset")
    if dataset and str(dataset).startswith("hfds/"):
        out["dataset_name"] = str(dataset)[5:]
    elif dataset and rest.get("data_dir"):
        out["dataset_name"] = "imagefolder"
    if take("train_split"):
        out["train_split"] = rest["train_split"]
    if take("val_split"):
        out["eval_split"] = rest["val_split"]
    if take("img_size"):
        out["image_size"] = int(rest["img_size"])
    output = take("output")
    out["output_dir"] = output or os.path.join("outputs", str(model or "seed-run"))
    ignored = sorted(k for k in rest if k not in used and rest[k] not in (None, "", False, 0, 0.0))
    return out, ignored


# ------------------------------------------------------------------ argument parsing
# Flags that choose what to train on: without a config file they start a run from the argument
# classes' defaults instead of layering on the embedded digits default.
SOURCE_FLAGS = {"model_name_or_path", "model_config", "dataset_name", "data_dir"}


def parse_args(argv: list[str] | None, family: str):
    """(model_args, data_args, training_args, notes) from flags or a YAML/JSON file.

    With no arguments at all, the embedded default recipe of the family runs
    (``recipes/configs/<family>_digits.yaml``). A single ``.yaml``/``.yml``/``.json`` path is read
    as a config file (ours or the seed's); flags after it override its values. Flags without a
    file apply on top of the embedded default too (``--seed 1`` is the default run with seed 1),
    unless they choose a model or a dataset (`SOURCE_FLAGS`): then they start from the argument
    classes' own defaults, as in the transformers example scripts.
    """
    from transformers import HfArgumentParser

    from .data import DataArguments
    from .trainer import SparseTrainingArguments

    parser = HfArgumentParser((ModelArguments, DataArguments, SparseTrainingArguments))
    argv = list(sys.argv[1:] if argv is None else argv)
    notes: list[str] = []
    cpu_only = not _has_accelerator()
    default = RECIPES_DIR / f"{family}_digits.yaml"
    if not argv:
        notes.append(f"no arguments: running the embedded default {default.name}")
        argv = [str(default)]
    elif not argv[0].endswith((".yaml", ".yml", ".json")) and not (
        SOURCE_FLAGS & set(_explicit_flags(argv))
    ):
        notes.append(f"no config file: flags applied on top of the embedded default {default.name}")
        argv = [str(default), *argv]
    if argv[0].endswith((".yaml", ".yml", ".json")):
        path = Path(argv[0])
        if not path.is_file():
            raise NMSparsityConfigError(f"config file {str(path)!r} does not exist.")
        data = (
            json.loads(path.read_text())
            if path.suffix == ".json"
            else yaml.safe_load(path.read_text())
        ) or {}
        our_keys = {f.name for dc in parser.dataclass_types for f in dataclasses.fields(dc)}
        if is_seed_yaml(data, our_keys):
            data, ignored = seed_yaml_to_args(data, int(os.environ.get("WORLD_SIZE", "1")))
            notes.append(f"{path.name}: seed (timm) keys translated")
            if ignored:
                notes.append(f"timm keys with no equivalent here, ignored: {', '.join(ignored)}")
        else:
            # our file may still spell the sparsity keys the seed's way (n_sparsity, ...)
            sparsity, rest = NMSparsityConfig.split_known_keys(data)
            data = {**rest, **sparsity}
        # flags after the file override it
        merged = dict(data)
        if cpu_only:
            merged.setdefault("use_cpu", True)
        if len(argv) > 1:
            parsed = parser.parse_args_into_dataclasses(argv[1:], look_for_args_file=False)
            for key in _explicit_flags(argv[1:]):
                for obj in parsed:
                    if hasattr(obj, key):
                        merged[key] = getattr(obj, key)
        model_args, data_args, training_args = parser.parse_dict(merged, allow_extra_keys=False)
    else:
        if cpu_only and "--use_cpu" not in argv:
            argv += ["--use_cpu", "true"]
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(argv)
    return model_args, data_args, training_args, notes


def _has_accelerator() -> bool:
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


def _explicit_flags(argv: list[str]) -> list[str]:
    return [a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")]


# ------------------------------------------------------------------ the run
def run(argv: list[str] | None = None, family: str = "vit") -> dict[str, Any]:
    """Parse, build, train, finalize, save, verify, summarise. Returns the summary dict."""
    from transformers import enable_full_determinism, set_seed

    from .data import (
        MixupCollator,
        collate_fn,
        load_image_dataset,
        make_compute_metrics,
        require_max_steps,
        resolve_columns,
        transforms_from_args,
        with_transforms,
    )
    from .hub import verify_checkpoint
    from .trainer import NMSparseTrainer

    model_args, data_args, args, notes = parse_args(argv, family)
    require_max_steps(data_args.streaming, args.max_steps)
    start = time.time()
    # Seed before the model is built: a from-scratch model takes its initial weights from the
    # global RNG, and the Trainer only seeds in its own __init__, after the model exists.
    if args.full_determinism:
        enable_full_determinism(args.seed)
    else:
        set_seed(args.seed)

    train_raw, eval_raw, label_names = load_image_dataset(data_args)
    num_labels = len(label_names) if label_names else data_args.num_labels
    if not num_labels:
        raise NMSparsityConfigError(
            "num_labels: the dataset's labels carry no class names; set --num_labels."
        )
    model, source = build_model(model_args, family, label_names, num_labels)
    image_column, label_column = resolve_columns(
        train_raw, data_args.image_column, data_args.label_column
    )
    train_tf, eval_tf = transforms_from_args(data_args, source)
    train_ds = with_transforms(train_raw, train_tf, image_column, label_column)
    eval_ds = with_transforms(eval_raw, eval_tf, image_column, label_column)

    args.remove_unused_columns = False
    bce = model_args.bce_loss or data_args.mixup_alpha > 0
    collator = collate_fn
    eval_collator = None
    if bce:
        model.config.problem_type = "multi_label_classification"
        mix = MixupCollator(
            data_args.mixup_alpha or 1.0,
            num_labels,
            prob=data_args.mixup_prob if data_args.mixup_alpha > 0 else 0.0,
            seed=data_args.dataset_seed,
        )
        collator, eval_collator = mix, mix.eval_collator()
    metric_names = [m.strip() for m in model_args.metrics.split(",") if m.strip()]
    trainer = NMSparseTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=collator,
        compute_metrics=make_compute_metrics(metric_names),
    )
    if eval_collator is not None:
        _use_eval_collator(trainer, eval_collator)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    distributed = _check_ranks_agree(trainer)
    metrics = trainer.evaluate()
    final_dir = os.path.join(args.output_dir, "final")
    trainer.save_model(final_dir)
    summary: dict[str, Any] = {}
    report = None
    if trainer.args.should_save:
        report = verify_checkpoint(final_dir)
        summary = _summary(trainer, metrics, final_dir, report, time.time() - start, notes)
        summary["distributed"] = distributed
        print(format_summary(summary), flush=True)
    # No collective runs after this point. Tear the process group down on every rank before
    # returning: a gloo group left to interpreter shutdown can abort the process ("terminate
    # called without an active exception", pytorch/pytorch#190489). Also closes trackers.
    trainer.accelerator.end_training()
    if report is not None:
        report.raise_if_failed()
        with open(os.path.join(final_dir, "nmsparse_summary.json"), "w") as fh:
            json.dump(summary, fh, indent=2)
    return summary


def _check_ranks_agree(trainer) -> dict[str, Any]:
    """With several data-parallel processes, every rank must end with the same sparse weights
    (same masks from the same weights): compare a digest of them across ranks, fail loudly if not.
    Returns how the run was distributed (for the summary)."""
    import hashlib

    import torch.distributed as dist

    info = {
        "world_size": trainer.args.world_size,
        "wrapper": type(trainer.model_wrapped).__name__,
        "backend": getattr(trainer.accelerator.state, "backend", None),
    }
    if info["world_size"] < 2 or trainer.is_fsdp_enabled:  # FSDP ranks hold different shards
        return info
    digest = hashlib.sha256()
    modules = dict(trainer.model.named_modules())
    for name in sorted(trainer.sparsifier.layers):
        weight = modules[name].weight.detach().cpu().contiguous()
        digest.update(weight.numpy().tobytes())
    digests: list[str] = [""] * info["world_size"]
    dist.all_gather_object(digests, digest.hexdigest())
    if len(set(digests)) != 1:
        raise RuntimeError(
            f"the ranks ended with different sparse weights ({len(set(digests))} distinct "
            f"digests): masks diverged across processes. Please report this with your launch "
            f"configuration."
        )
    info["ranks_agree"] = True
    return info


def _use_eval_collator(trainer, collator) -> None:
    """The Trainer has one data_collator; evaluation must not see mixup (see MixupCollator)."""
    original = trainer.get_eval_dataloader

    def get_eval_dataloader(eval_dataset=None):
        train_collator = trainer.data_collator
        trainer.data_collator = collator
        try:
            return original(eval_dataset)
        finally:
            trainer.data_collator = train_collator

    trainer.get_eval_dataloader = get_eval_dataloader


def _summary(trainer, metrics, final_dir, report, seconds, notes) -> dict[str, Any]:
    cfg = trainer.sparsity_config
    meta = trainer.model.config.nm_sparsity if hasattr(trainer.model.config, "nm_sparsity") else {}
    by_loc: dict[str, list[float]] = {}
    for check in report.layers:
        by_loc.setdefault(check.location, []).append(check.sparsity)
    return {
        "recipe": cfg.recipe_name,
        "pattern": {loc: "{}:{}".format(*cfg.target_pattern(loc)) for loc in sorted(by_loc)},
        "sparse_dim": cfg.sparse_dim,
        "steps": trainer.state.global_step,
        "seconds": round(seconds, 1),
        "eval": {
            k: round(float(v), 4)
            for k, v in metrics.items()
            if isinstance(v, int | float) and not math.isnan(v)
        },
        "sparsity_by_location": {k: round(sum(v) / len(v), 4) for k, v in by_loc.items()},
        "achieved_sparsity": round(meta.get("achieved_sparsity", 0.0), 4),
        "layers_verified": f"{sum(c.ok for c in report.layers)}/{len(report.layers)}",
        "verified": report.ok,
        "checkpoint": os.path.abspath(final_dir),
        "notes": notes,
    }


def format_summary(s: dict[str, Any]) -> str:
    """The one-screen summary printed at the end of a recipe."""
    line = "=" * 72
    evals = "  ".join(
        f"{k.removeprefix('eval_')}={v}"
        for k, v in s["eval"].items()
        if not k.endswith(("runtime", "per_second")) and k != "epoch"
    )
    rows = [
        line,
        f"nmsparse_hf | {s['recipe']} | {', '.join(f'{k} {v}' for k, v in s['pattern'].items())}"
        f" kept (dim={s['sparse_dim']})",
        f"trained {s['steps']} optimizer steps in {s['seconds']} s",
        f"eval: {evals}",
        "sparsity by location: "
        + ", ".join(f"{k} {v:.1%}" for k, v in s["sparsity_by_location"].items())
        + f" | targeted weights: {s['achieved_sparsity']:.1%} zero",
        f"verified N:M: {'PASS' if s['verified'] else 'FAIL'} ({s['layers_verified']} layers)",
        f"processes: {s['distributed']['world_size']} ({s['distributed']['wrapper']}"
        + (", weights identical on every rank" if s["distributed"].get("ranks_agree") else "")
        + ")",
        f"checkpoint: {s['checkpoint']}",
        f"check again with: nmsparse verify {s['checkpoint']}",
    ]
    rows += [f"note: {n}" for n in s.get("notes", [])]
    rows.append(line)
    return "\n".join(rows)
