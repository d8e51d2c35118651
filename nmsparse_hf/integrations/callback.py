"""`NMSparsityCallback`: drives an `NMSparsifier` from the Trainer's events, and the sparsity logs."""

from __future__ import annotations

from transformers import Trainer, TrainerCallback
from transformers.utils import logging

from ..config import NMSparsityConfig
from ..errors import NMSparsityConfigError
from ..one_shot import mark_trained
from ..sparsifier import NMSparsifier

logger = logging.get_logger(__name__)

PHASE_IDS = {"dense": 0, "sparse": 1, "finetune": 2}


def sparsity_logs(sparsifier: NMSparsifier) -> dict[str, float]:
    """The numbers logged at each logging step (names documented in the README):

    * ``nm/phase``: 0 dense, 1 sparse, 2 fine-tune; ``nm/stage``: the SDGF stage;
    * ``nm/alpha``: the weight pruned entries still carry in the effective weights
      W~ = W * (mask + alpha * (1 - mask)) (1 in the dense phase, 0 once binary);
    * per location: ``nm/<loc>/n_keep`` and ``nm/<loc>/m`` (the pattern now; not logged in the
      dense phase), ``nm/<loc>/mask_sparsity`` (the share of weights the mask prunes, 1 - N/M;
      0 in the dense phase), ``nm/<loc>/weight_zeros`` (the share of effective weights that
      are exactly zero: stays 0 while alpha > 0, reaches mask_sparsity when alpha = 0) and
      ``nm/<loc>/mask_flip_rate`` (share of mask entries changed since the previous log).
    """
    plan = sparsifier.plan
    if plan is None:
        return {}
    out: dict[str, float] = {
        "nm/phase": PHASE_IDS[plan.phase],
        "nm/alpha": float(plan.alpha),
        "nm/stage": plan.stage,
    }
    for loc in sparsifier.locations:
        out[f"nm/{loc}/mask_sparsity"] = 0.0
        if plan.masked:  # the dense phase has no pattern
            n, m = plan.patterns[loc]
            out[f"nm/{loc}/n_keep"], out[f"nm/{loc}/m"] = float(n), float(m)
            out[f"nm/{loc}/mask_sparsity"] = 1.0 - n / m
    names = {"sparsity": "weight_zeros", "mask_flip_rate": "mask_flip_rate"}
    for key, value in sparsifier.stats().items():
        kind, loc = key.split("/")
        out[f"nm/{loc}/{names.get(kind, kind)}"] = value
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

    On a PEFT model (``get_peft_model`` or TRL's ``SFTTrainer(peft_config=...)``), ``add_to``
    attaches to the wrapped base layers and masks each LoRA delta with its base layer's mask
    (docs/METHOD.md §5.5); after training, ``trainer.model.merge_and_unload()`` is exactly N:M.
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
        mark_trained(self.sparsifier.model)  # a one-shot start's record says training followed
        if args.torch_compile and (args.torch_compile_backend or "inductor") == "inductor":
            self.sparsifier.compile_masks = True  # the step masks of a compiled model: compiled too
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
