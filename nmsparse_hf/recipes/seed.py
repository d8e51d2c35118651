"""Seed-style training YAMLs (the paper's timm fork): recognise them and translate them into ours.

A seed user brings one of two kinds of file: a full timm ``train.py`` YAML with the sparsity keys
beside timm's (the ViT-B/16 run), or a file of sparsity keys only (the Swin-v2 run). Both load
unchanged and mean what the seed meant:

* a key the file omits takes the value the seed's ``train.py`` would have used: one table,
  `SEED_DEFAULTS` (the seed's sparsity flags, then timm's ``train.py`` defaults);
* every timm key is either translated (`translate_*` below), inert (no effect on the trained
  weights: logging, checkpoint cadence, loader plumbing, `INERT_KEYS`), meaningless under the
  file's schedule as in timm itself (`SCHEDULE_KEYS`), or refused with a message when it is set
  to a value we cannot reproduce (`REQUIRED_VALUES`); nothing is dropped silently;
* the seed's spellings: ``sparsity_loc: KQFF`` (locations by substring), ``decay_type`` beside
  ``sparsity_type: SRSTE`` (the seed ignores it: warned once, then dropped here, in the
  translation layer, so our own keys keep refusing that combination).
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Callable
from typing import Any

from ..config import SEED_KEY_ALIASES, NMSparsityConfig, sparsity_section
from ..errors import NMSparsityConfigError

# What the seed's train.py uses when its YAML omits a key. Sparsity flags: the seed's argparse
# defaults; the rest: timm train.py's. ``None`` means "not set" exactly as there.
SEED_DEFAULTS: dict[str, Any] = {
    # --- sparsity (the seed's own flags)
    "sparsity_type": None,  # None = dense
    "n_sparsity": 2,
    "m_sparsity": 4,
    "n_sparsity_qkv": 2,  # independent of the FF pattern
    "m_sparsity_qkv": 4,
    "decay_type": "STEP",
    "decay_coef": 2e-4,
    "structure_decay_flag": False,
    "structure_decay_type": "SPARSIFY",
    "dense_steps": 0.0,  # fractions of training
    "fine_tune_steps": 0.0,
    "sparsity_loc": None,  # None = no layer named: the run is dense
    "sparse_dim": None,  # None = ours, row
    # --- optimisation (timm train.py)
    "batch_size": 128,
    "validation_batch_size": None,
    "epochs": 300,
    "opt": "sgd",
    "opt_eps": None,
    "opt_betas": None,
    "momentum": 0.9,
    "weight_decay": 2e-5,
    "clip_grad": None,
    "clip_mode": "norm",
    "lr": None,
    "lr_base": 0.1,
    "lr_base_size": 256,
    "lr_base_scale": "",  # '' = sqrt for adaptive optimizers (ada*, lamb), else linear
    "sched": "cosine",
    "min_lr": 0.0,
    "warmup_lr": 1e-5,
    "warmup_epochs": 5,
    "cooldown_epochs": 0,
    # --- augmentation (timm train.py)
    "aa": None,
    "scale": [0.08, 1.0],
    "ratio": [3.0 / 4.0, 4.0 / 3.0],
    "hflip": 0.5,
    "vflip": 0.0,
    "color_jitter": 0.4,  # timm turns it off when aa is set
    "interpolation": "",  # '' = the model's default
    "train_interpolation": "random",
    "crop_pct": None,  # None = the model's default
    "reprob": 0.0,
    "remode": "pixel",
    "recount": 1,
    "mixup": 0.0,
    "cutmix": 0.0,
    "cutmix_minmax": None,
    "mixup_prob": 1.0,
    "mixup_switch_prob": 0.5,
    "mixup_mode": "batch",
    "smoothing": 0.1,
    "bce_loss": False,
    # --- model, data, runtime (timm train.py)
    "model": None,
    "pretrained": False,
    "num_classes": None,
    "drop": 0.0,
    "drop_path": None,
    "gp": None,
    "img_size": None,
    "input_size": None,
    "dataset": "",
    "data_dir": None,
    "data": None,
    "train_split": "train",
    "val_split": "validation",
    "seed": 42,
    "workers": 4,
    "pin_mem": False,
    "amp": False,
    "amp_dtype": "float16",
    "grad_checkpointing": False,
    "output": "",
    "experiment": "",
    "log_interval": 50,
}

# Keys with no effect on the trained weights here (logging, checkpointing cadence, loader and
# launcher plumbing, BatchNorm syncing of models without BatchNorm): accepted whatever their value.
INERT_KEYS = {
    "amp_impl",
    "aot_autograd",
    "channels_last",
    "checkpoint_freq_epoch",
    "checkpoint_hist",
    "class_map",
    "dataset_download",
    "dist_bn",
    "eval_metric",
    "fuser",
    "local_rank",
    "log_wandb",
    "model_ema_decay",
    "model_ema_force_cpu",
    "no_ddp_bb",
    "no_prefetcher",
    "no_resume_opt",
    "recovery_interval",
    "save_images",
    "torchcompile",
    "torchscript",
    "use_multi_epochs_loader",
    "worker_seeding",
}

# Keys that timm itself reads only under some schedules; under any other they mean nothing there
# either (the seed's ViT file sets decay_rate with sched: cosine).
SCHEDULE_KEYS = {
    "decay_epochs": ("step",),
    "decay_milestones": ("multistep",),
    "decay_rate": ("step", "multistep", "plateau"),
    "patience_epochs": ("plateau",),
    "lr_cycle_decay": (),  # only with lr_cycle_limit > 1, which is refused
    "lr_noise_pct": (),  # only with lr_noise, which is refused
    "lr_noise_std": (),
    "warmup_prefix": (),  # see the schedule note
    "sched_on_updates": (),
}

# Keys whose other values change the training in ways not reproduced here: refused unless at
# this value (``None``/``False``/``0``/``''`` ones are timm's defaults).
REQUIRED_VALUES: dict[str, Any] = {
    "aug_repeats": 0,
    "aug_splits": 0,
    "bce_target_thresh": None,
    "bn_eps": None,
    "bn_momentum": None,
    "drop_block": None,
    "drop_connect": None,
    "epoch_repeats": 0,
    "fast_norm": False,
    "force_cpu": False,
    "in_chans": None,
    "initial_checkpoint": "",
    "jsd_loss": False,
    "layer_decay": None,
    "lr_cycle_limit": 1,
    "lr_cycle_mul": 1.0,
    "lr_k_decay": 1.0,
    "lr_noise": None,
    "mean": None,
    "mixup_off_epoch": 0,
    "model_ema": False,
    "no_aug": False,
    "resplit": False,
    "resume": "",
    "split_bn": False,
    "start_epoch": None,
    "std": None,
    "sync_bn": False,
    "tta": 0,
}


# Sparsity keys that only the seed spells this way (a file of them alone is a seed file).
_SEED_ONLY_SPARSITY_KEYS = {k for k, v in SEED_KEY_ALIASES.items() if k != v}
_OPTIMIZERS = {"adamw": "adamw_torch"}

_SCHEDULES = ("cosine",)


def is_seed_yaml(data: dict, our_keys: set[str]) -> bool:
    """A seed-style file carries timm training keys that are not ours (``model``, ``lr_base``,
    ``epochs`` ...), or consists of sparsity keys only, some spelt the seed's way
    (``n_sparsity``, ``sparsity_loc`` ...); a file mixing such keys with unknown ones is reported
    by the parser."""
    foreign = set(data) - our_keys
    if foreign & SEED_TIMM_KEYS:
        return True
    sparsity, rest = NMSparsityConfig.split_known_keys(data)
    spelled = {str(k).strip().lower().replace("-", "_") for k in data}
    return bool(sparsity) and not rest and bool(spelled & _SEED_ONLY_SPARSITY_KEYS)


def recipe_settings(
    data: dict, our_keys: set[str], world_size: int = 1
) -> tuple[dict[str, Any], list[str], bool]:
    """A config file's mapping in our setting names: the one place that tells the seed's timm
    YAML dialect from ours (`is_seed_yaml`) and translates it (`seed_yaml_to_args`).

    Returns ``(settings, notes, seed)``: in a file of ours, sparsity keys spelt the seed's way
    (``n_sparsity``, ``sparsity_loc`` ...) become our names and other keys pass through (the
    caller checks them); ``seed`` says whether the file was a seed-style one. A ``sparsity:``
    section is read as top-level keys (`sparsity_section`)."""
    data = sparsity_section(data)
    if is_seed_yaml(data, our_keys):
        settings, notes = seed_yaml_to_args(data, world_size)
        return settings, notes, True
    sparsity, rest = NMSparsityConfig.split_known_keys(data)
    return {**rest, **sparsity}, [], False


def seed_yaml_to_args(data: dict, world_size: int = 1) -> tuple[dict, list[str]]:
    """Translate a seed (timm fork) training YAML into our argument dict.

    Returns ``(args, notes)``: a dict for `HfArgumentParser.parse_dict` and sentences saying what
    was approximated or does not apply (shown at the start and in the run's summary). Keys that
    are neither timm's nor sparsity keys, and timm settings that cannot be reproduced, are errors
    naming them. Omitted keys take `SEED_DEFAULTS`. A file of sparsity keys only translates to
    sparsity arguments only (the rest of the run is ours: flags or the recipe's defaults).
    """
    sparsity, rest = NMSparsityConfig.split_known_keys(data)
    unknown = sorted(k for k in rest if k not in SEED_TIMM_KEYS)
    if unknown:
        raise NMSparsityConfigError(
            f"unknown keys in the seed-style YAML: {unknown}. They are neither timm training keys "
            f"nor sparsity keys; fix their spelling or remove them."
        )
    notes: list[str] = []
    out = translate_sparsity(data, notes)
    if not rest:
        return out, notes
    check_required_values(rest)

    def get(key: str) -> Any:
        return rest.get(key, SEED_DEFAULTS[key])

    for translate in (
        translate_optimization,
        translate_schedule,
        translate_augmentation,
        translate_model,
        translate_data,
        translate_runtime,
    ):
        translate(get, out, notes, world_size)
    notes += _schedule_key_notes(rest, str(get("sched")))
    return out, notes


# ------------------------------------------------------------------ sparsity
_SPARSITY_KEYS = (
    "sparsity_type",
    "n_sparsity",
    "m_sparsity",
    "n_sparsity_qkv",
    "m_sparsity_qkv",
    "decay_type",
    "decay_coef",
    "structure_decay_flag",
    "structure_decay_type",
    "dense_steps",
    "fine_tune_steps",
    "sparsity_loc",
    "sparse_dim",
)


# Every timm key a seed file may carry: translated, inert, schedule-bound or required.
SEED_TIMM_KEYS = (
    (set(SEED_DEFAULTS) - set(_SPARSITY_KEYS))
    | INERT_KEYS
    | set(SCHEDULE_KEYS)
    | set(REQUIRED_VALUES)
)


def translate_sparsity(data: dict, notes: list[str]) -> dict[str, Any]:
    """Our sparsity arguments from the seed's keys (or ours), the seed's defaults filling gaps.

    ``sparsity_type`` omitted means dense, as in the seed. A sparse run must name its layers
    (``sparsity_loc``). Under SR-STE the seed ignores ``decay_type``: a non-step value is warned
    about once and dropped."""
    given, _ = NMSparsityConfig.split_known_keys(data)
    defaults = {k: SEED_DEFAULTS[k] for k in _SPARSITY_KEYS if SEED_DEFAULTS[k] is not None}
    out = {**NMSparsityConfig.split_known_keys(defaults)[0], **given}
    if out.get("sparsity_type") is None:
        out.update(sparsity_type="dense", locations=out.get("locations") or "FF")
        notes.append("sparsity_type not set: a dense run, as in the seed")
    elif out.get("locations") is None:
        raise NMSparsityConfigError(
            "seed-style YAML: sparsity_loc is not set, so no layer would be sparse; name the "
            "layers, e.g. sparsity_loc: FF (or KQFF, QKVFF, FF,Q,K)."
        )
    if isinstance(out.get("locations"), list | tuple):
        out["locations"] = ",".join(out["locations"])
    _srste_decay(out, notes)
    return out


def _srste_decay(out: dict[str, Any], notes: list[str]) -> None:
    kind = str(out.get("sparsity_type", "")).strip().lower().replace("-", "_")
    decay = str(out.get("decay_type", "step")).strip().lower()
    if kind in ("srste", "sr_ste") and decay != "step":
        message = (
            f"decay_type={out['decay_type']!r} does not apply under sparsity_type=SRSTE (the "
            f"seed ignores it there): training SR-STE without mask decay"
        )
        warnings.warn(message, UserWarning, stacklevel=3)
        notes.append(message)
        out["decay_type"] = "step"


# ------------------------------------------------------------------ refusals
def check_required_values(rest: dict[str, Any]) -> None:
    """Refuse timm settings this project does not reproduce, naming each key, value and fix."""
    bad = {
        k: v for k, v in rest.items() if k in REQUIRED_VALUES and not _same(v, REQUIRED_VALUES[k])
    }
    if bad:
        listed = ", ".join(f"{k}={v!r} (supported: {REQUIRED_VALUES[k]!r})" for k, v in bad.items())
        raise NMSparsityConfigError(
            f"seed-style YAML: timm settings not reproduced here: {listed}. Remove them or set "
            f"the supported value; the run would otherwise differ from what the file means."
        )


def _same(value: Any, expected: Any) -> bool:
    if expected in (None, "", False, 0) and value in (None, "", False, 0, 0.0):
        return True
    return value == expected


# ------------------------------------------------------------------ translations
Getter = Callable[[str], Any]


def timm_learning_rate(get: Getter, world_size: int) -> float:
    """timm's rule: ``lr``, else ``lr_base * ratio`` with ratio = global batch / ``lr_base_size``,
    square-rooted when ``lr_base_scale`` is ``sqrt`` (its default for ada*/lamb optimizers)."""
    if get("lr") is not None:
        return float(get("lr"))
    ratio = int(get("batch_size")) * world_size / float(get("lr_base_size"))
    scale = str(get("lr_base_scale") or "")
    if not scale:
        opt = str(get("opt")).lower()
        scale = "sqrt" if any(o in opt for o in ("ada", "lamb")) else "linear"
    if scale == "sqrt":
        ratio = math.sqrt(ratio)
    return float(get("lr_base")) * ratio


def translate_optimization(get: Getter, out: dict, notes: list[str], world_size: int) -> None:
    """Batch size, learning rate, optimizer, weight decay, gradient clipping."""
    out["per_device_train_batch_size"] = int(get("batch_size"))
    if get("validation_batch_size"):
        out["per_device_eval_batch_size"] = int(get("validation_batch_size"))
    out["learning_rate"] = timm_learning_rate(get, world_size)
    opt = str(get("opt")).lower()
    if opt not in _OPTIMIZERS:
        raise NMSparsityConfigError(
            f"seed-style YAML: opt={get('opt')!r} is not translated (supported: "
            f"{sorted(_OPTIMIZERS)}; timm's default is sgd). Set opt: adamw, or write the run "
            f"with our keys (optim, optim_args)."
        )
    out["optim"] = _OPTIMIZERS[opt]
    if get("opt_eps") is not None:
        out["adam_epsilon"] = float(get("opt_eps"))
    if get("opt_betas") is not None:
        out["adam_beta1"], out["adam_beta2"] = (float(b) for b in get("opt_betas"))
    out["weight_decay"] = float(get("weight_decay"))
    if get("clip_grad") is not None:
        if get("clip_mode") != "norm":
            raise NMSparsityConfigError(
                f"seed-style YAML: clip_mode={get('clip_mode')!r} is not supported; the Trainer "
                f"clips by norm (clip_mode: norm)."
            )
        out["max_grad_norm"] = float(get("clip_grad"))
    else:
        out["max_grad_norm"] = 0.0  # timm: no clipping unless clip_grad is set


def translate_schedule(get: Getter, out: dict, notes: list[str], world_size: int) -> None:
    """Epochs, warm-up, cosine schedule, min_lr, cool-down."""
    sched = str(get("sched")).lower()
    if sched not in _SCHEDULES:
        raise NMSparsityConfigError(
            f"seed-style YAML: sched={get('sched')!r} (with decay_epochs / decay_milestones / "
            f"decay_rate) is not translated: only timm's cosine schedule is. Use sched: cosine, "
            f"or write the run with our keys (lr_scheduler_type)."
        )
    epochs, cooldown = float(get("epochs")), float(get("cooldown_epochs") or 0)
    out["num_train_epochs"] = epochs + cooldown
    warmup = float(get("warmup_epochs") or 0)
    if warmup > 0:
        out["warmup_steps"] = warmup / (epochs + cooldown)  # < 1: a ratio of the total steps
    min_lr = float(get("min_lr") or 0.0)
    out["lr_scheduler_type"] = "cosine_with_min_lr" if min_lr > 0 else "cosine"
    if min_lr > 0:
        out["lr_scheduler_kwargs"] = {"min_lr": min_lr}
    notes.append(
        "timm cosine schedule approximated per optimizer step: warm-up from 0 (timm: warmup_lr="
        f"{get('warmup_lr')}), cosine to min_lr={min_lr} over the steps after warm-up"
        + (f", {cooldown:g} cool-down epochs included in the cosine" if cooldown else "")
    )


def translate_augmentation(get: Getter, out: dict, notes: list[str], world_size: int) -> None:
    """timm's augmentation and mixing keys -> our DataArguments (same meaning, timm's pipeline)."""
    aa = get("aa")
    if aa:
        match = re.fullmatch(r"rand-m(\d+)-n(\d+)-p1-mstd0", str(aa).strip().lower())
        out["randaugment"] = f"m{match.group(1)}-n{match.group(2)}" if match else str(aa)
    out["crop_scale"] = [float(v) for v in get("scale")]
    out["crop_ratio"] = [float(v) for v in get("ratio")]
    out["hflip"], out["vflip"] = float(get("hflip")), float(get("vflip"))
    out["color_jitter"] = None if get("color_jitter") is None else float(get("color_jitter"))
    out["interpolation"] = get("interpolation") or None
    out["train_interpolation"] = get("train_interpolation") or "bilinear"
    out["crop_pct"] = get("crop_pct")
    out["random_erasing"] = float(get("reprob"))
    out["random_erasing_mode"], out["random_erasing_count"] = get("remode"), int(get("recount"))
    out["mixup_alpha"], out["cutmix_alpha"] = float(get("mixup")), float(get("cutmix"))
    out["cutmix_minmax"] = get("cutmix_minmax")
    out["mixup_prob"] = float(get("mixup_prob"))
    out["mixup_switch_prob"] = float(get("mixup_switch_prob"))
    out["mixup_mode"] = get("mixup_mode")
    out["label_smoothing_factor"] = float(get("smoothing"))
    out["bce_loss"] = bool(get("bce_loss"))
    mixing = (out["mixup_alpha"] > 0 or out["cutmix_alpha"] > 0) and out["mixup_prob"] > 0
    if mixing and not out["bce_loss"]:
        notes.append(
            "mixup/cutmix without bce_loss: trained with BCE on the soft targets (timm would use "
            "soft-target cross-entropy)"
        )


def translate_model(get: Getter, out: dict, notes: list[str], world_size: int) -> None:
    """The timm architecture (through TimmWrapper), its head size and regularisation."""
    model = get("model")
    if model:
        out["model_config"] = f"timm:{model}"
        if get("pretrained"):
            out["model_name_or_path"] = f"timm/{model}"
    overrides = []
    if get("drop_path"):
        overrides.append(f"drop_path_rate={get('drop_path')}")
    if get("drop"):
        overrides.append(f"drop_rate={get('drop')}")
    if get("gp"):
        overrides.append(f"global_pool={get('gp')}")
    if overrides:
        if not model:
            raise NMSparsityConfigError(
                f"seed-style YAML: {', '.join(overrides)} needs a timm model: set model."
            )
        out["config_overrides"] = ",".join(overrides)
    if get("num_classes"):
        out["num_labels"] = int(get("num_classes"))


def translate_data(get: Getter, out: dict, notes: list[str], world_size: int) -> None:
    """Where the images come from and their size."""
    data_dir = get("data_dir") or get("data")
    if data_dir:
        out["data_dir"] = data_dir
    dataset = str(get("dataset") or "")
    if dataset.startswith("hfds/"):
        out["dataset_name"] = dataset[5:]
    elif dataset and data_dir:
        out["dataset_name"] = "imagefolder"
    elif dataset:
        raise NMSparsityConfigError(
            f"seed-style YAML: dataset={dataset!r} needs data_dir (an imagefolder root), or "
            f"use dataset: hfds/<hub id>."
        )
    out["train_split"], out["eval_split"] = get("train_split"), get("val_split")
    size = get("img_size") or (get("input_size") or [None])[-1]
    if size:
        out["image_size"] = int(size)


def translate_runtime(get: Getter, out: dict, notes: list[str], world_size: int) -> None:
    """Precision, seed, loader workers, gradient checkpointing, logging, output directory."""
    if get("amp"):
        out["bf16"] = str(get("amp_dtype")) == "bfloat16"
        out["fp16"] = not out["bf16"]
    out["seed"] = int(get("seed"))
    out["dataloader_num_workers"] = int(get("workers"))
    out["dataloader_pin_memory"] = bool(get("pin_mem"))
    if get("grad_checkpointing"):
        out["gradient_checkpointing"] = True
    out["logging_steps"] = int(get("log_interval"))
    name = get("experiment") or str(get("model") or "seed-run")
    out["output_dir"] = os.path.join(get("output") or "outputs", name)


def _schedule_key_notes(rest: dict[str, Any], sched: str) -> list[str]:
    unused = sorted(k for k, scheds in SCHEDULE_KEYS.items() if k in rest and sched not in scheds)
    if not unused:
        return []
    return [f"{', '.join(unused)}: not used by timm's {sched} schedule either"]
