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

import os

from transformers import Trainer
from transformers.utils import logging

from ..config import NMSparsityConfig
from ..errors import NMSparsityConfigError
from ..export import load_sparse_metadata, push_sparse_to_hub, save_sparse_pretrained
from ..export.card import write_model_card
from ..sparsifier import NMSparsifier
from .arguments import SparseTrainingArguments
from .callback import NMSparsityCallback
from .resume import reload_if_keys_missing

logger = logging.get_logger(__name__)


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
        self.sparse_output_dir: str | None = None  # where save_model last wrote the sparse model

    # ------------------------------------------------------------------ saving
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save like `Trainer.save_model`; once the masks are baked in (after `train`), save
        through `save_sparse_pretrained`, the one sparse-export path: exact zeros, the
        ``nm_sparsity`` metadata in ``config.json``, the processing class (so ``pipeline()``
        loads the directory), a model card, and a verification of the written files.

        Under FSDP the weights are gathered once (a full state dict, whatever the plugin's
        ``state_dict_type``) so the result is a plain checkpoint; intermediate checkpoints keep
        the Trainer's own format and carry no sparsity claim. With ``push_to_hub``, the sparse
        model is uploaded once, from the directory it was saved to.
        """
        output_dir = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not self.sparsifier.finalized:
            if hasattr(getattr(model, "config", None), "nm_sparsity"):
                del model.config.nm_sparsity  # a dense intermediate checkpoint carries no claim
            return super().save_model(output_dir, _internal_call=_internal_call)
        state = None
        if self.is_fsdp_enabled:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            state = get_model_state_dict(  # a collective: every rank gathers each weight once
                self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        save_sparse_pretrained(
            model,
            self.sparsifier,
            output_dir,
            processing_class=self.processing_class,
            eval_results=self._last_eval_results(),
            model_name=os.path.basename(os.path.abspath(self.args.output_dir)),
            overwrite=True,  # like Trainer.save_model: same-named files are replaced
            state_dict=state,
            is_main_process=self.args.should_save,
        )
        self.sparse_output_dir = output_dir
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def create_model_card(self, **kwargs) -> None:
        """Write the model card. Once finalized: our sparse card (`write_model_card`) in the
        sparse checkpoint's directory, with the Trainer's card arguments (``model_name``,
        ``tags``, ``finetuned_from``, ``dataset``, ``dataset_tags``, ``license``); before, the
        Trainer's own card."""
        if not self.sparsifier.finalized:
            return super().create_model_card(**kwargs)
        if not self.is_world_process_zero():
            return None
        folder = self.sparse_output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if kwargs.get("dataset") and not kwargs.get("dataset_tags"):
            kwargs["dataset_tags"] = kwargs["dataset"]  # as the Trainer's own card does
        model_tags = list(getattr(model, "model_tags", None) or [])
        if model_tags:
            tags = kwargs.get("tags") or []
            tags = [tags] if isinstance(tags, str) else list(tags)
            kwargs["tags"] = tags + [t for t in model_tags if t not in tags]
        write_model_card(
            folder,
            load_sparse_metadata(folder),
            eval_results=self._last_eval_results(),
            model_name=kwargs.pop("model_name", None),
            model_type=getattr(getattr(model, "config", None), "model_type", None),
            **kwargs,
        )
        return None

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs,
    ):
        """Upload the model to ``args.hub_model_id``, like `Trainer.push_to_hub`.

        Once finalized, the sparse checkpoint is uploaded once with `push_sparse_to_hub` (it
        verifies first): the files of the model, its processor and card, from the directory
        `save_model` last wrote it to (saving it into ``output_dir`` if it was not saved yet),
        never the training checkpoints or a copy of the model in a subfolder. ``kwargs`` are
        the card's arguments (`create_model_card`: ``tags``, ``finetuned_from``, ``dataset`` ...).
        Before finalization this is the Trainer's own push.
        """
        if not self.sparsifier.finalized:
            return super().push_to_hub(
                commit_message=commit_message,
                blocking=blocking,
                token=token,
                revision=revision,
                private=private,
                **kwargs,
            )
        token = token if token is not None else self.args.hub_token
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        if self.sparse_output_dir is None:
            self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        kwargs.setdefault("model_name", self.hub_model_id.split("/")[-1])
        self.create_model_card(**kwargs)
        self._finish_current_push()
        return push_sparse_to_hub(
            self.sparse_output_dir,
            self.hub_model_id,
            token=token,
            private=private,
            revision=revision if revision is not None else self.args.hub_revision,
            commit_message=commit_message,
            blocking=blocking,
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
        reload_if_keys_missing(target, resume_from_checkpoint)
