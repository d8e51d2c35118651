"""Hugging Face Trainer integration: `SparseTrainingArguments`, `NMSparsityCallback`, `NMSparseTrainer`.

Thin adapters from the Trainer's events to `NMSparsifier`:

* the schedule is driven by optimizer steps (``state.global_step`` / ``state.max_steps``), so
  gradient accumulation and resuming do not shift it;
* at each logging step the callback adds phase, alpha, the pattern of each location, the realised
  sparsity of the effective weights and the mask flip rate since the last log to the logs, so every
  ``report_to`` backend and the progress output show them;
* at train end the target masks are baked into the weights; `NMSparseTrainer.save_model` then
  writes a plain HF checkpoint with exact zeros, an ``nm_sparsity`` block in ``config.json`` and a
  model card. Intermediate checkpoints keep the dense weights, so resuming is exact.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging

from .config import NMSparsityConfig
from .errors import NMSparsityConfigError
from .sparsifier import NMSparsifier

logger = logging.get_logger(__name__)

PHASE_IDS = {"dense": 0, "sparse": 1, "finetune": 2}
_REGEX_CHARS = re.compile(r"[\\*+?()|\[\]{}^$]")


@dataclass
class SparseTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the N:M sparsity fields of `NMSparsityConfig` (same names, same
    meaning). Parsed by `HfArgumentParser` from the command line, YAML or JSON;
    `sparsity_config()` returns the validated `NMSparsityConfig`."""

    # --- pattern
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
            "help": "Group along a Linear weight's input ('row', the hardware layout) or output ('col')."
        },
    )
    locations: str = field(
        default="FF",
        metadata={"help": "Sparse locations, comma-separated: FF, Q, K, V, O, C (QKV = Q,K,V)."},
    )
    # --- recipe
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
    # --- phases
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
    # --- targets
    target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Override the model preset: module names or name suffixes (e.g. fc1 fc2); a "
            "single value with regex characters is a regex matched against the whole name."
        },
    )
    exclude_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules kept dense (same forms as target_modules)."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.sparsity_config()  # fail on bad sparsity settings when the arguments are parsed

    def sparsity_config(self) -> NMSparsityConfig:
        """The `NMSparsityConfig` these arguments describe (validated)."""
        names = {f.name for f in dataclasses.fields(NMSparsityConfig)} - {"extra"}
        values = {name: getattr(self, name) for name in names}
        for key in ("target_modules", "exclude_modules"):
            values[key] = _patterns(values[key])
        return NMSparsityConfig(**values)


def _patterns(value):
    """A one-element list holding regex characters is a regex; otherwise a list of names."""
    if value is None or isinstance(value, str):
        return value
    value = list(value)
    if len(value) == 1 and _REGEX_CHARS.search(value[0]):
        return value[0]
    return value


def sparsity_logs(sparsifier: NMSparsifier) -> dict[str, float]:
    """The numbers logged at each logging step: phase id (0 dense, 1 sparse, 2 fine-tune), alpha,
    SDGF stage, and per location the current pattern (``n_keep``, ``m``, ``density`` = n/m; only the
    density, 1.0, in the dense phase), realised sparsity and mask flip rate."""
    plan = sparsifier.plan
    if plan is None:
        return {}
    out: dict[str, float] = {
        "nm/phase": PHASE_IDS[plan.phase],
        "nm/alpha": float(plan.alpha),
        "nm/stage": plan.stage,
    }
    for loc in sparsifier.locations:
        if plan.masked:  # the dense phase has no pattern: only its density (1.0) is logged
            n, m = plan.patterns[loc]
            out[f"nm/{loc}/n_keep"], out[f"nm/{loc}/m"] = float(n), float(m)
        out[f"nm/{loc}/density"] = (
            plan.patterns[loc][0] / plan.patterns[loc][1] if plan.masked else 1.0
        )
    for key, value in sparsifier.stats().items():
        kind, loc = key.split("/")
        out[f"nm/{loc}/{kind}"] = value
    return out


class NMSparsityCallback(TrainerCallback):
    """Drives an `NMSparsifier` from the Trainer's events; works with a stock `Trainer` too.

    * ``on_train_begin``: sets the run length to ``state.max_steps`` and applies the plan of
      ``state.global_step`` (also right after a resume);
    * ``on_step_begin`` / ``on_step_end``: applies the plan of the step about to run (after the
      optimizer step, so evaluation and checkpoints see the current effective weights);
    * ``on_log``: adds `sparsity_logs` to training logs;
    * ``on_train_end``: bakes the target masks into the weights (``finalize``) and verifies.

    With a stock ``Trainer``, reporting callbacks run before callbacks passed in ``callbacks=``;
    use `NMSparsityCallback.add_to(trainer)` to put it first so TensorBoard & co. see its metrics.
    """

    def __init__(self, sparsifier: NMSparsifier, finalize_at_end: bool = True):
        self.sparsifier = sparsifier
        self.finalize_at_end = finalize_at_end

    @classmethod
    def add_to(cls, trainer: Trainer, config: NMSparsityConfig | None = None, **kwargs):
        """Attach a sparsifier to ``trainer.model`` (if it has none) and insert the callback first."""
        sparsifier = kwargs.pop("sparsifier", None)
        if sparsifier is None:
            if config is None:
                raise NMSparsityConfigError(
                    "NMSparsityCallback.add_to needs config=NMSparsityConfig(...) or sparsifier=..."
                )
            sparsifier = NMSparsifier(trainer.model, config, total_steps=None)
        callback = cls(sparsifier, **kwargs)
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    def on_train_begin(self, args, state, control, **kwargs):
        self.sparsifier.set_total_steps(state.max_steps)
        self.sparsifier.update(state.global_step)
        if (
            state.global_step > 0
            and args.logging_steps
            and state.global_step % _log_every(args, state) == 0
        ):
            # resumed at a logging step: the flip rate of the next log compares with these masks,
            # exactly as in an uninterrupted run
            self.sparsifier.stats()
        logger.info(self.sparsifier.report())

    def on_step_begin(self, args, state, control, **kwargs):
        self.sparsifier.update(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.sparsifier.update(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or self.sparsifier.finalized:
            return
        extra = sparsity_logs(self.sparsifier)
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_train_end(self, args, state, control, **kwargs):
        if self.finalize_at_end and self.sparsifier.layers and not self.sparsifier.finalized:
            report = self.sparsifier.finalize()
            logger.info(f"nmsparse_hf: masks baked into the weights\n{report}")


def _log_every(args, state) -> int:
    steps = args.logging_steps
    if 0 < steps < 1:  # a ratio of max_steps
        import math

        steps = math.ceil(state.max_steps * steps)
    return int(steps)


class NMSparseTrainer(Trainer):
    """`Trainer` that trains an N:M-sparse model and saves it as a verified sparse checkpoint.

    Args: those of `Trainer`, plus ``sparsity_config`` (default: ``args.sparsity_config()`` when
    ``args`` is a `SparseTrainingArguments`). The sparsifier is attached in ``__init__`` (before
    Accelerate wraps the model; targets and shapes are validated there), its callback is put first,
    and the run length is taken from ``state.max_steps`` when training starts.
    """

    def __init__(
        self, model=None, args=None, *pos, sparsity_config: NMSparsityConfig | None = None, **kwargs
    ):
        if sparsity_config is None:
            if not isinstance(args, SparseTrainingArguments):
                raise NMSparsityConfigError(
                    "NMSparseTrainer needs sparsity settings: pass args=SparseTrainingArguments(...) "
                    "or sparsity_config=NMSparsityConfig(...)."
                )
            sparsity_config = args.sparsity_config()
        if model is None:
            raise NMSparsityConfigError(
                "NMSparseTrainer needs model=...: the sparsifier attaches to it before training "
                "(model_init is not supported)."
            )
        self.sparsity_config = sparsity_config
        self.sparsifier = NMSparsifier(model, sparsity_config, total_steps=None)
        super().__init__(model, args, *pos, **kwargs)
        self.nm_callback = NMSparsityCallback(self.sparsifier)
        self.callback_handler.callbacks.insert(0, self.nm_callback)

    # ------------------------------------------------------------------ saving
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save like `Trainer.save_model`; once the masks are baked in (after `train`), also record
        the ``nm_sparsity`` metadata in ``config.json``, write the model card and verify the files.

        Under FSDP the sparse export gathers the full state dict (whatever the plugin's
        ``state_dict_type``) so the result is a plain checkpoint; intermediate checkpoints keep
        the Trainer's own format.
        """
        output_dir = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not self.sparsifier.finalized:
            if hasattr(getattr(model, "config", None), "nm_sparsity"):
                del model.config.nm_sparsity  # a dense intermediate checkpoint carries no claim
            return super().save_model(output_dir, _internal_call=_internal_call)
        from . import hub

        self.sparsifier.verify()
        meta = hub.sparse_metadata(model, self.sparsifier)  # collective under FSDP: all ranks
        model.config.nm_sparsity = meta
        if self.is_fsdp_enabled:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            state = get_model_state_dict(
                self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
            if self.args.should_save:
                model.save_pretrained(output_dir, state_dict=state)
        else:
            super().save_model(output_dir, _internal_call=True)
        if self.args.should_save:
            hub.write_model_card(
                output_dir,
                meta,
                eval_results=self._last_eval_results(),
                model_name=os.path.basename(os.path.abspath(self.args.output_dir)),
                model_type=getattr(model.config, "model_type", None),
            )
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def create_model_card(self, *args, **kwargs):
        """The Trainer's push path calls this: write our sparse model card once finalized."""
        if not self.sparsifier.finalized:
            return super().create_model_card(*args, **kwargs)
        from . import hub

        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        meta = getattr(model.config, "nm_sparsity", None) or hub.sparse_metadata(
            model, self.sparsifier
        )
        hub.write_model_card(
            self.args.output_dir,
            meta,
            eval_results=self._last_eval_results(),
            model_name=kwargs.get("model_name"),
            model_type=getattr(model.config, "model_type", None),
        )

    def _last_eval_results(self) -> dict | None:
        for entry in reversed(self.state.log_history or []):
            metrics = {k: v for k, v in entry.items() if k.startswith("eval_")}
            if metrics:
                return metrics
        return None

    # ------------------------------------------------------------------ resuming
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Load a checkpoint and make sure every weight really arrived.

        transformers 5.x writes ViT/Swin weights under their older names while the Trainer loads
        them non-strictly into the renamed modules (upstream issue 43701: resume silently restarts
        from random weights). When keys are missing after the stock load, the checkpoint is read
        again through ``from_pretrained`` (which knows the renaming) and loaded strictly.
        """
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        if not isinstance(target, PreTrainedModel):
            return
        on_disk = _checkpoint_keys(resume_from_checkpoint)
        if on_disk is None or set(target.state_dict()) <= on_disk:
            return
        logger.warning(
            f"nmsparse_hf: {resume_from_checkpoint} stores weights under other module names than "
            f"the model (transformers issue 43701); reloading them through from_pretrained."
        )
        reloaded = type(target).from_pretrained(resume_from_checkpoint, dtype=_dtype_of(target))
        state = reloaded.state_dict()
        result = target.load_state_dict(state, strict=False)
        if result.missing_keys:
            raise RuntimeError(
                f"resuming from {resume_from_checkpoint}: weights {result.missing_keys[:5]} are "
                f"missing from the checkpoint even after renaming; refusing to continue from "
                f"random weights."
            )


def _checkpoint_keys(path: str) -> set[str] | None:
    import json

    from safetensors import safe_open

    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        with safe_open(single, framework="pt") as fh:
            return set(fh.keys())
    if os.path.isfile(index):
        with open(index) as fh:
            return set(json.load(fh)["weight_map"])
    return None


def _dtype_of(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype
