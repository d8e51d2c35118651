"""One training run of the resume-exactness tests (tests/test_resume_exact.py), in a fresh process.

    python _resume_worker.py OUT [--resume CKPT] [--streaming] [--workers N]
    torchrun --nproc_per_node 2 _resume_worker.py OUT ...   (DDP, gloo)

A tiny ViT trained with `NMSparseTrainer` on 48 embedded digits through the recipes' data pipeline
(`build_training_data`): timm's random resized crop + flip + RandAugment + random erasing, mixup
and cutmix (switching), BCE soft targets with label smoothing. Batch 8, 9 steps (map-style: 6 steps
an epoch, so the run crosses an epoch boundary), checkpoints every 4 steps. Writes
OUT/final.safetensors (the weights at the end, rank 0) and OUT/batches.json (a digest of every
training batch the model saw, per rank).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from conftest import tiny_training_args, tiny_vit  # noqa: E402


def main(argv=None):
    import torch
    from safetensors.torch import save_file

    from nmsparse_hf.data import DataArguments, build_training_data, load_image_dataset
    from nmsparse_hf.integrations import NMSparseTrainer

    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--resume", default=None)
    p.add_argument("--streaming", action="store_true")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=9)
    a = p.parse_args(argv)

    data_args = DataArguments(
        image_size=16,
        max_train_samples=48,
        max_eval_samples=16,
        streaming=a.streaming,
        shuffle_buffer_size=16,
        randaugment="m9-n2",
        random_erasing=0.25,
        mixup_alpha=0.8,
        cutmix_alpha=1.0,
        hflip=0.5,
        min_crop_scale=0.5,
    )
    train_raw, eval_raw, names = load_image_dataset(data_args)
    model = tiny_vit(hidden=32, image=16, patch=4)
    data = build_training_data(
        data_args, train_raw, eval_raw, len(names), bce_loss=True, label_smoothing=0.1
    )
    model.config.problem_type = "multi_label_classification"
    args = tiny_training_args(
        a.out,
        max_steps=a.max_steps,
        save_strategy="steps",
        save_steps=4,
        dataloader_num_workers=a.workers,
        remove_unused_columns=False,
        n_keep=1,
        m=4,
        locations="FF",
        decay_type="exp",
        decay_coef=0.2,
    )
    seen: list[str] = []
    trainer = NMSparseTrainer(
        model=model,
        args=args,
        train_dataset=data.train_dataset,
        data_collator=data.train_collator,
        callbacks=data.callbacks,
    )
    original = trainer.training_step

    def training_step(model, inputs, *rest, **kw):
        digest = hashlib.sha256(inputs["pixel_values"].numpy().tobytes())
        digest.update(inputs["labels"].numpy().tobytes())
        seen.append(digest.hexdigest()[:16])
        return original(model, inputs, *rest, **kw)

    trainer.training_step = training_step
    trainer.train(resume_from_checkpoint=a.resume)
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(a.out, f"batches-rank{rank}.json"), "w") as fh:
        json.dump(seen, fh)
    if rank == 0:
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        save_file(state, os.path.join(a.out, "final.safetensors"))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
