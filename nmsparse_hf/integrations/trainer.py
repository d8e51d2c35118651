"""Hugging Face Trainer integration: `NMSparseTrainer`.

Thin adapters from the Trainer to `NMSparsifier`:

* the schedule is driven by optimizer steps (``state.global_step`` / ``state.max_steps``), so
  gradient accumulation and resuming do not shift it;
* at train end the target masks are baked into the weights; `NMSparseTrainer.save_model` then
  writes a plain HF checkpoint with exact zeros, an ``nm_sparsity`` block in ``config.json`` and a
  model card;
* intermediate ``checkpoint-N`` folders keep the dense master weights, so resuming is exact; each
  records the run's sparsity settings (checked on resume) and carries a README saying how to get
  its sparse model (``nmsparse export``);
* nothing dense reaches the Hub: every push during training is the sparse model of that step
  (masks baked into a copy), written through the one save path and verified.
"""

from __future__ import annotations

import copy
import os
from typing import Any

from transformers import Trainer
from transformers.trainer_utils import HubStrategy
from transformers.utils import logging

from ..config import NMSparsityConfig
from ..errors import NMSparsityConfigError, NMSparsityError
from ..export import load_sparse_metadata, push_sparse_to_hub, save_sparse_pretrained
from ..export.checkpoint import write_model_card
from ..sparsifier import NMSparsifier
from ..targets import peft_base_model
from .arguments import SparseTrainingArguments
from .callback import NMSparsityCallback
from .distributed import distributed_mode
from .resume import (
    TRAINER_STATE,
    check_sparsity_state,
    checkpoint_problem,
    last_readable_checkpoint,
    reload_if_keys_missing,
    write_sparsity_state,
)
from .snapshot import binary_at_target, save_sparse_snapshot, write_checkpoint_readme

logger = logging.get_logger(__name__)

# where the sparse model of the latest save during training is written before it is pushed
HUB_STAGING_DIR = "_nmsparse_hub_push"
_DENSE_HUB_STRATEGIES = (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS)


def refuse_dense_hub_strategy(args) -> None:
    """``hub_strategy`` ``checkpoint`` / ``all_checkpoints`` upload Trainer checkpoints, whose
    weights are the dense master weights, under the model's name: refused at setup."""
    strategy = getattr(args, "hub_strategy", HubStrategy.EVERY_SAVE)
    if getattr(args, "push_to_hub", False) and HubStrategy(strategy) in _DENSE_HUB_STRATEGIES:
        raise NMSparsityConfigError(
            f"hub_strategy={HubStrategy(strategy).value!r} would upload Trainer checkpoints, which "
            f"hold dense master weights, under the sparse model's name. Use hub_strategy="
            f"'every_save' (the verified sparse model of each save is pushed) or 'end'; resume "
            f"from the local checkpoints."
        )


class NMSparseTrainer(Trainer):
    """`Trainer` that trains an N:M-sparse model and saves it as a verified sparse checkpoint.

    Args: those of `Trainer`, plus ``sparsity_config`` (default: ``args.sparsity_config()`` when
    ``args`` is a `SparseTrainingArguments`). The sparsifier is attached in ``__init__`` (before
    Accelerate wraps the model; targets and shapes are validated there), its callback is put first,
    and the run length is taken from ``state.max_steps`` when training starts.

    Raises `NMSparsityConfigError` at construction for ``push_to_hub`` with ``hub_strategy``
    ``checkpoint`` or ``all_checkpoints`` (they would upload dense checkpoints).
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
        refuse_dense_hub_strategy(args)
        self.sparsity_config = sparsity_config
        self.sparsifier = NMSparsifier(model, sparsity_config, total_steps=None)
        super().__init__(model, args, *pos, **kwargs)
        self.nm_callback = NMSparsityCallback(self.sparsifier)
        self.callback_handler.callbacks.insert(0, self.nm_callback)
        self.sparse_output_dir: str | None = None  # where save_model last wrote the sparse model
        self._pushed_dir: str | None = None  # the sparse directory last pushed by push_to_hub
        self._push_kwargs: dict = {}
        self._start_step = 0
        self._held_load_results: list | None = None

    # ------------------------------------------------------------------ training
    def train(self, resume_from_checkpoint: str | bool | None = None, *pos, **kwargs):
        """`Trainer.train`, with checks before step 1:

        * a finalized model (masks baked in by an earlier ``train()``) is refused: training it
          again would train dense weights with no sparsity applied;
        * ``resume_from_checkpoint=True`` takes the newest *readable* checkpoint of
          ``output_dir`` (damaged ones are skipped with a warning naming them); a given path must
          be readable (`checkpoint_problem`);
        * the checkpoint must have been trained with this run's sparsity config
          (`check_sparsity_state`: each differing field is named).

        Raises:
            NMSparsityError: any of the above.
        """
        if self.sparsifier.finalized:
            raise NMSparsityError(
                "NMSparseTrainer.train: this model is finalized (an earlier train() baked its "
                "masks into the weights), so training it again would train without sparsity. "
                "To continue training, call trainer.sparsifier.detach() and build a new "
                "NMSparseTrainer for the model (or resume from a checkpoint)."
            )
        checkpoint = self._resolve_checkpoint(resume_from_checkpoint)
        self._start_step = 0
        if checkpoint is not None:
            check_sparsity_state(checkpoint, self.sparsity_config)
            import json

            with open(os.path.join(checkpoint, TRAINER_STATE), encoding="utf-8") as fh:
                self._start_step = int(json.load(fh)["global_step"])
        return super().train(checkpoint, *pos, **kwargs)

    def _resolve_checkpoint(self, value: str | bool | None) -> str | None:
        if value is None or value is False:
            return None
        if value is True:
            found = last_readable_checkpoint(self.args.output_dir)
            if found is None:
                raise NMSparsityError(
                    f"resume_from_checkpoint=True: there is no checkpoint in output_dir "
                    f"{self.args.output_dir!r}. Pass a checkpoint path, or start without resuming."
                )
            return found
        problem = checkpoint_problem(value)
        if problem is not None:
            raise NMSparsityError(
                f"resume_from_checkpoint={str(value)!r} cannot be resumed: {problem}. Pass "
                f"another checkpoint, or resume_from_checkpoint=True for the newest readable one."
            )
        return str(value)

    def _training_rows(self) -> dict[str, Any]:
        """The card's rows on how this run was distributed (`distributed_mode`)."""
        mode = self.distributed_mode()
        return {"distributed mode": mode["mode"], "processes": mode["processes"]}

    def distributed_mode(self) -> dict:
        """How this run was really distributed, from the model's wrapper (`distributed_mode`:
        ``mode`` single / DDP / FSDP1 / FSDP2 / DeepSpeed, ``processes``, ``wrapper``, ``note``)."""
        return distributed_mode(self)

    @property
    def steps_this_run(self) -> int:
        """Optimizer steps run by the last ``train()`` call of this trainer (``state.global_step``
        counts those of the checkpoint it resumed from too)."""
        return self.state.global_step - self._start_step

    # ------------------------------------------------------------------ saving
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the sparse model. Once the masks are baked in (after `train`), save through
        `save_sparse_pretrained`, the one sparse-export path: exact zeros, the ``nm_sparsity``
        metadata in ``config.json``, the processing class (so ``pipeline()`` loads the
        directory), a model card, and a verification of the written files; with
        ``push_to_hub``, the sparse model is then uploaded once, from that directory. A PEFT
        (LoRA) model is saved merged (``merge_and_unload`` of a copy): a plain N:M checkpoint.

        Before that there is no sparse model: a call by the user is refused (nothing dense is
        written as if it were the model); the Trainer's own calls write its checkpoints (dense
        master weights, no sparsity claim, plus ``nm_sparsity_state.json`` and a README.md
        saying how to get the sparse model of that step). Under FSDP the weights are gathered
        once (a full state dict, whatever the plugin's ``state_dict_type``).

        Raises:
            NMSparsityError: called by the user before the model is finalized.
        """
        output_dir = output_dir or self.args.output_dir
        if not self.sparsifier.finalized:
            if not _internal_call:
                raise NMSparsityError(
                    "NMSparseTrainer.save_model: the model is not finalized yet, so its weights "
                    "are the dense master weights, not the sparse model. Call it after train() "
                    "(which bakes the masks in); for the sparse model of the current step without "
                    "touching training, use trainer.save_sparse_snapshot(output_dir)."
                )
            return self._save_training_checkpoint(output_dir)
        model, state_dict = self._unwrapped(), self._full_state_dict()
        if peft_base_model(model) is not model:
            # LoRA: the sparse model is the merged one (the adapters' deltas are masked by the
            # base pattern, so merging keeps every layer N:M); merged on a copy, so the trained
            # adapter model stays as it is
            model, state_dict = copy.deepcopy(model).merge_and_unload(), None
        save_sparse_pretrained(
            model,
            self.sparsifier,
            output_dir,
            processing_class=self.processing_class,
            eval_results=self._last_eval_results(),
            model_name=os.path.basename(os.path.abspath(self.args.output_dir)),
            card={"training": self._training_rows()},
            overwrite=True,  # like Trainer.save_model: same-named files are replaced
            state_dict=state_dict,
            is_main_process=self.args.should_save,
        )
        self.sparse_output_dir = output_dir
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_training_checkpoint(self, output_dir: str) -> None:
        """The Trainer's checkpoint: dense master weights (exact resume), no sparsity claim, the
        run's sparsity settings and a README pointing to ``nmsparse export``."""
        model = self._unwrapped()
        if hasattr(getattr(model, "config", None), "nm_sparsity"):
            del model.config.nm_sparsity  # a dense checkpoint carries no claim
        super().save_model(output_dir, _internal_call=True)
        if self.args.should_save:
            step = self.state.global_step
            write_sparsity_state(
                output_dir, self.sparsity_config, step, self.sparsifier.total_steps
            )
            write_checkpoint_readme(output_dir, step, self.sparsity_config)

    def save_sparse_snapshot(self, output_dir: str, **save_kwargs) -> str | None:
        """Write the sparse model of the current step to ``output_dir`` (`save_sparse_snapshot`:
        the target masks baked into a copy, verified, with metadata and card); the training
        weights are untouched. Call it on every process (a collective under FSDP); only the main
        process writes. ``save_kwargs`` go to `save_sparse_pretrained` (``overwrite``, ``card``
        ...). Returns ``output_dir`` on the main process, else None."""
        state = self._full_state_dict()
        if not self.args.should_save:
            return None
        step = self.state.global_step
        evals = None
        if binary_at_target(self.sparsity_config, self.sparsifier.total_steps, step):
            evals = self._last_eval_results(step)
        save_kwargs.setdefault("processing_class", self.processing_class)
        save_kwargs.setdefault("eval_results", evals)
        save_sparse_snapshot(
            self._unwrapped(), self.sparsity_config, output_dir, state_dict=state, **save_kwargs
        )
        return output_dir

    def create_model_card(self, **kwargs) -> None:
        """Write the model card. Once finalized: our sparse card (`write_model_card`) in the
        sparse checkpoint's directory, with the Trainer's card arguments (``model_name``,
        ``tags``, ``finetuned_from``, ``dataset``, ``dataset_tags``, ``license``); when that
        directory was already pushed, it is pushed again, so the card on the Hub is the local
        one. Before, the Trainer's own card."""
        if not self.sparsifier.finalized:
            return super().create_model_card(**kwargs)
        folder = self._write_sparse_card(**kwargs)
        if folder is not None and self._pushed_dir == folder:
            self._finish_current_push()
            push_sparse_to_hub(
                folder, self.hub_model_id, commit_message="Update model card", **self._push_kwargs
            )
        return None

    def _write_sparse_card(self, **kwargs) -> str | None:
        if not self.is_world_process_zero():
            return None
        folder = self.sparse_output_dir or self.args.output_dir
        model = self._unwrapped()
        if kwargs.get("dataset") and not kwargs.get("dataset_tags"):
            kwargs["dataset_tags"] = kwargs["dataset"]  # as the Trainer's own card does
        model_tags = list(getattr(model, "model_tags", None) or [])
        if model_tags:
            tags = kwargs.get("tags") or []
            tags = [tags] if isinstance(tags, str) else list(tags)
            kwargs["tags"] = tags + [t for t in model_tags if t not in tags]
        kwargs.setdefault("training", self._training_rows())
        write_model_card(
            folder,
            load_sparse_metadata(folder),
            eval_results=self._last_eval_results(),
            model_name=kwargs.pop("model_name", None),
            model_type=getattr(getattr(model, "config", None), "model_type", None),
            **kwargs,
        )
        return folder

    # ------------------------------------------------------------------ the Hub
    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs,
    ):
        """Upload the finalized sparse model to ``args.hub_model_id``, like `Trainer.push_to_hub`.

        The sparse checkpoint is uploaded with `push_sparse_to_hub` (it verifies first): the
        files of the model, its processor and card, from the directory `save_model` last wrote
        it to (saving it into ``output_dir`` if it was not saved yet), never the training
        checkpoints. ``kwargs`` are the card's arguments (`create_model_card`: ``tags``,
        ``finetuned_from``, ``dataset`` ...). A later `create_model_card` pushes the new card.

        Raises:
            NMSparsityError: the model is not finalized (before or during training there is no
                sparse model to push; the saves during training push the sparse model of their
                step with ``hub_strategy='every_save'``).
        """
        if not self.sparsifier.finalized:
            raise NMSparsityError(
                "NMSparseTrainer.push_to_hub: the model is not finalized yet (its weights are the "
                "dense master weights), so there is no sparse model to push. Call it after "
                "train(); during training, hub_strategy='every_save' pushes the sparse model of "
                "each save."
            )
        token = token if token is not None else self.args.hub_token
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        if self.sparse_output_dir is None:
            self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        kwargs.setdefault("model_name", self.hub_model_id.split("/")[-1])
        self._write_sparse_card(**kwargs)
        self._finish_current_push()
        self._push_kwargs = dict(
            token=token,
            private=private,
            revision=revision if revision is not None else self.args.hub_revision,
        )
        self._pushed_dir = self.sparse_output_dir
        return push_sparse_to_hub(
            self.sparse_output_dir,
            self.hub_model_id,
            commit_message=commit_message,
            blocking=blocking,
            **self._push_kwargs,
        )

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """At each save during training (``hub_strategy`` ``every_save``): push the sparse model
        of this step (`save_sparse_snapshot` into ``output_dir/_nmsparse_hub_push``, then
        `push_sparse_to_hub` in the background), never the checkpoint's dense weights. As in
        the Trainer, a save is not pushed while the previous push is still running, unless
        ``hub_always_push`` (then it waits for it)."""
        if HubStrategy(self.args.hub_strategy) == HubStrategy.END:
            return
        from transformers.utils.hub import PushInProgress

        state = self._full_state_dict()  # a collective under FSDP: every rank takes part
        if not self.is_world_process_zero():
            return
        busy = self.push_in_progress is not None and not self.push_in_progress.is_done()
        if busy and not self.args.hub_always_push:
            return
        self._finish_current_push()  # the staging folder is rewritten below
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        step = self.state.global_step
        folder = os.path.join(self.args.output_dir, HUB_STAGING_DIR)
        evals = None
        if binary_at_target(self.sparsity_config, self.sparsifier.total_steps, step):
            evals = self._last_eval_results(step)
        save_sparse_snapshot(
            self._unwrapped(),
            self.sparsity_config,
            folder,
            state_dict=state,
            processing_class=self.processing_class,
            eval_results=evals,
            model_name=self.hub_model_id.split("/")[-1],
            overwrite=True,
        )
        job = push_sparse_to_hub(
            folder,
            self.hub_model_id,
            token=self.args.hub_token,
            revision=self.args.hub_revision,
            commit_message=f"Training in progress, step {step} (sparse model of this step)",
            blocking=False,
        )
        self.push_in_progress = PushInProgress([job])

    # ------------------------------------------------------------------ helpers
    def _unwrapped(self):
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def _full_state_dict(self):
        """Under FSDP, the whole weights (a collective: every rank gathers each weight once);
        otherwise None (the model's own state_dict serves)."""
        if not self.is_fsdp_enabled:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )

    def _last_eval_results(self, step: int | None = None) -> dict | None:
        """The metrics of the last evaluation (at ``step`` only, when given)."""
        for entry in reversed(self.state.log_history or []):
            metrics = {k: v for k, v in entry.items() if k.startswith("eval_")}
            if metrics and (step is None or entry.get("step") == step):
                return metrics
        return None

    # ------------------------------------------------------------------ resuming
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Load a checkpoint and make sure every weight really arrived.

        transformers 5.x writes ViT/Swin weights under their older names while the Trainer loads
        them non-strictly into the renamed modules (upstream issue 43701: resume silently restarts
        from random weights). When keys are missing after the stock load, the checkpoint is read
        again through ``from_pretrained`` (which knows the renaming) and loaded; its "missing /
        unexpected keys" warnings are then replaced by one line saying every weight arrived.
        """
        self._held_load_results = []
        try:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        finally:
            held, self._held_load_results = self._held_load_results, None
        reloaded = False
        if not (self.is_fsdp_enabled or self.is_deepspeed_enabled):
            target = self.accelerator.unwrap_model(model if model is not None else self.model)
            reloaded = reload_if_keys_missing(target, resume_from_checkpoint)
        if not reloaded:
            for result in held:
                super()._issue_warnings_after_load(result)

    def _issue_warnings_after_load(self, load_result) -> None:
        """Hold the stock "missing / unexpected keys" warnings while `_load_from_checkpoint`
        decides whether a reload makes them moot."""
        if self._held_load_results is not None:
            self._held_load_results.append(load_result)
            return
        super()._issue_warnings_after_load(load_result)
