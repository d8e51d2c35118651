"""One rank of the two-process streaming test (tests/test_data.py::test_two_ranks_*).

Launched by ``torchrun --nproc_per_node 2``. Loads local webdataset shards through
`load_image_dataset(streaming=True)`, then trains a real `transformers.Trainer` (gloo, CPU) for
two epochs, once with the Trainer's default data path (rank 0 reads and dispatches batches) and
once with ``dispatch_batches=False`` (each rank reads its own shards). A tiny model records the
sample ids each forward pass receives; each rank writes them to ``<out>/<mode>-rank<r>.json``.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from torch import nn


class RecordingModel(nn.Module):
    """A linear classifier whose forward also takes and records ``sample_id``."""

    def __init__(self, in_features: int, num_labels: int):
        super().__init__()
        self.linear = nn.Linear(in_features, num_labels)
        self.seen: list[list[int]] = []

    def forward(self, pixel_values, labels=None, sample_id=None):
        self.seen.append(sample_id.tolist())
        logits = self.linear(pixel_values.flatten(1))
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps_per_epoch", type=int, required=True)
    parser.add_argument("--batch_size", type=int, default=4)
    cli = parser.parse_args()

    import torch.distributed as dist
    from transformers import Trainer, TrainingArguments

    from nmsparse_hf.data import (
        DataArguments,
        build_transforms,
        collate_fn,
        load_image_dataset,
        require_max_steps,
        with_transforms,
    )

    data_args = DataArguments(
        dataset_name="webdataset",
        data_dir=cli.data_dir,
        streaming=True,
        shuffle_buffer_size=8,
        dataset_seed=0,
        image_size=8,
    )
    train, _, _ = load_image_dataset(data_args)
    train = with_transforms(train, build_transforms(8, train=False), "jpg", "cls")

    def collate(examples):
        batch = collate_fn(examples)
        batch["sample_id"] = torch.tensor([int(e["__key__"].split("_")[-1]) for e in examples])
        return batch

    epochs = 2
    max_steps = epochs * cli.steps_per_epoch
    require_max_steps(data_args.streaming, max_steps)
    for mode, dispatch in (("dispatch", None), ("per_rank", False)):
        torch.manual_seed(0)
        model = RecordingModel(3 * 8 * 8, 3)
        args = TrainingArguments(
            output_dir=os.path.join(cli.out, f"trainer-{mode}"),
            max_steps=max_steps,
            per_device_train_batch_size=cli.batch_size,
            learning_rate=1e-3,
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            remove_unused_columns=False,
            dataloader_num_workers=0,
            seed=0,
            accelerator_config={"dispatch_batches": dispatch},
        )
        trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collate)
        trainer.train()
        record = {
            "mode": mode,
            "rank": dist.get_rank(),
            "world_size": dist.get_world_size(),
            "backend": dist.get_backend(),
            "trainer_world_size": trainer.args.world_size,
            "global_step": trainer.state.global_step,
            "seen": model.seen,
        }
        path = os.path.join(cli.out, f"{mode}-rank{record['rank']}.json")
        with open(path, "w") as f:
            json.dump(record, f)
    # every rank, after the last collective: gloo left to interpreter shutdown can abort
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
