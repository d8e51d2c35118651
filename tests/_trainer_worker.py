"""Runs one small NMSparseTrainer (or stock Trainer) job; used by test_trainer.py in fresh processes.

    python _trainer_worker.py OUT --max-steps 12 [--stop-at 6] [--resume CKPT] [--stock]
Writes OUT/final.safetensors (the model's weights at the end, before and after finalize) and
OUT/log_history.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from conftest import (  # noqa: E402
    TINY_SPARSITY,
    RandomImages,
    tiny_swin,
    tiny_swinv2,
    tiny_timm_vit,
    tiny_training_args,
    tiny_vit,
)

FACTORIES = {"vit": tiny_vit, "swin": tiny_swin, "swinv2": tiny_swinv2, "timm": tiny_timm_vit}


def main(argv=None):
    from safetensors.torch import save_file
    from transformers import Trainer, TrainerCallback

    from nmsparse_hf import NMSparsityConfig
    from nmsparse_hf.integrations import NMSparseTrainer, NMSparsityCallback

    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--max-steps", type=int, default=12)
    p.add_argument("--save-steps", type=int, default=6)
    p.add_argument("--stop-at", type=int, default=None)
    p.add_argument("--resume", default=None)
    p.add_argument("--stock", action="store_true")
    p.add_argument("--model", default="vit", choices=sorted(FACTORIES))
    a = p.parse_args(argv)

    model = FACTORIES[a.model]()
    sparsity = TINY_SPARSITY
    args = tiny_training_args(
        a.out,
        max_steps=a.max_steps,
        save_steps=a.save_steps,
        save_strategy="steps",
        **sparsity,
    )

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if a.stop_at is not None and state.global_step >= a.stop_at:
                control.should_training_stop = True

    callbacks = [StopAt()]
    if a.stock:
        trainer = Trainer(model=model, args=args, train_dataset=RandomImages(), callbacks=callbacks)
        callback = NMSparsityCallback.add_to(
            trainer, NMSparsityConfig(**sparsity), finalize_at_end=False
        )
    else:
        trainer = NMSparseTrainer(
            model=model, args=args, train_dataset=RandomImages(), callbacks=callbacks
        )
        callback = trainer.nm_callback
        callback.finalize_at_end = False
    trainer.train(resume_from_checkpoint=a.resume)
    state = {f"dense.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    sp = callback.sparsifier
    sp.finalize()
    state.update(
        {f"final.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    )
    save_file(state, os.path.join(a.out, "final.safetensors"))
    with open(os.path.join(a.out, "log_history.json"), "w") as fh:
        json.dump(trainer.state.log_history, fh)


if __name__ == "__main__":
    main()
