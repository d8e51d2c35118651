"""N:M-sparse training in a plain Accelerate loop: no Trainer, only `NMSparsifier`.

A tiny ViT learns scikit-learn's bundled handwritten digits (8x8 images, 10 classes, no network)
with MDGF-exp at 1:4 on the feed-forward layers, then the masks are baked in and the model is
saved with `save_sparse_pretrained` (the same export the Trainer uses) and verified.

    python examples/plain_loop.py            # or: accelerate launch examples/plain_loop.py
    nmsparse verify outputs/plain-loop-1of4  # check the checkpoint again
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset
from transformers import ViTConfig, ViTForImageClassification

from nmsparse_hf import NMSparsifier, NMSparsityConfig, save_sparse_pretrained, verify_checkpoint


def digits_tensors(seed: int = 0):
    """(train, test) TensorDatasets of the 1797 digits: 1-channel 8x8 images scaled to [-1, 1]."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test, train = order[:300], order[300:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


def main(
    epochs: int = 12,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    output_dir: str = "outputs/plain-loop-1of4",
) -> dict:
    """Train, finalize, save, verify; return {"accuracy", "report", "checkpoint"} (accuracy on the
    300 held-out digits, the verification of the saved checkpoint, its directory)."""
    torch.manual_seed(seed)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model = ViTForImageClassification(
        ViTConfig(
            image_size=8,
            patch_size=2,
            num_channels=1,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            num_labels=10,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    )
    train, test = digits_tensors(seed)
    loader = DataLoader(
        train, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    total_steps = epochs * len(loader)
    config = NMSparsityConfig(
        n_keep=1,
        m=4,
        locations="FF",
        decay_type="exp",
        decay_coef=7.0 / (0.7 * total_steps),
        dense_fraction=0.1,
        finetune_fraction=0.2,
    )
    # attach before accelerator.prepare wraps the model
    sparsifier = NMSparsifier(model, config, total_steps=total_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    step = 0
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            sparsifier.update(step)
            loss = model(pixel_values=x, labels=y).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            step += 1

    report = sparsifier.finalize()
    model.eval()
    x, y = test.tensors
    with torch.no_grad():
        pred = model(pixel_values=x.to(accelerator.device)).logits.argmax(-1).cpu()
    accuracy = float((pred == y).float().mean())
    accelerator.print(report)
    accelerator.print(
        f"{config.recipe_name} {config.n_keep}:{config.m} FF: held-out accuracy "
        f"{accuracy:.3f} after {total_steps} steps (chance 0.100)"
    )
    # every rank calls the save (it gathers sharded weights once); the main process writes
    save_sparse_pretrained(
        accelerator.unwrap_model(model),
        sparsifier,
        output_dir,
        eval_results={"accuracy": accuracy},
        overwrite=True,
        is_main_process=accelerator.is_main_process,
    )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        report = verify_checkpoint(output_dir).raise_if_failed()
        accelerator.print(f"saved and verified: {output_dir}")
    accelerator.end_training()  # destroys the process group when launched on several processes
    return {"accuracy": accuracy, "report": report, "checkpoint": output_dir}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--output-dir", default="outputs/plain-loop-1of4")
    args = parser.parse_args()
    main(args.epochs, args.batch_size, args.lr, output_dir=args.output_dir)
