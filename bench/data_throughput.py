"""Images per second per CPU core of the ImageNet recipe's training input pipeline.

Sizes ``dataloader_num_workers``: a GPU that trains at G images/s needs about G / R workers, with R
the rate per core below (each DataLoader worker is one process on one core).

The pipeline is the one the recipe ``vit_b16_imagenet_mdgf_exp_1of32.yaml`` builds
(`nmsparse_hf.data.build_training_data` with the config's data settings): JPEG decode, timm's
training transform (random-resized crop to 224 with random interpolation, flip, RandAugment
m15-n2, normalize), every draw keyed by (seed, epoch, sample), then the batch collator with
timm's mixup (alpha 0.5, BCE soft targets). The images are written locally first: ``--count``
JPEGs (quality 90) of ``--source-size`` (``224`` by default; ImageNet's average is about
500x375, give ``--source-size 500x375`` for that), smooth random content so they compress like
photographs rather than noise. The data are read map-style from an ``imagefolder``; the recipe
streams, which runs the same per-example work.

Measured, with one torch thread (as in a worker):

* ``per example``: ``dataset[i]`` (decode + augmentation) in this process, images/s = one core;
* ``collate+mixup``: the collator over batches of ``--batch`` (runs in the worker that builds
  the batch), images/s;
* ``DataLoader w=K``: end to end with K worker processes (``--workers``), images/s over all
  workers, after one warm-up batch per worker.

    python bench/data_throughput.py --count 512 --workers 1 2
    python bench/data_throughput.py --count 256 --source-size 500x375 --workers 1 2
    python bench/data_throughput.py --count 16 --batch 4 --workers 1 --out /tmp/dt   # smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

CONFIG = "vit_b16_imagenet_mdgf_exp_1of32.yaml"


def write_jpegs(folder: Path, count: int, size: tuple[int, int], classes: int = 4) -> None:
    """``count`` JPEGs of ``size`` (width, height) in ``classes`` class folders: smooth random
    colour fields (upsampled 8x8 noise) plus mild grain, seeded."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        low = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        image = np.asarray(low.resize(size, Image.BICUBIC), dtype=np.int16)
        image = image + rng.integers(-12, 13, image.shape, dtype=np.int16)
        out = folder / f"class{i % classes}"
        out.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(out / f"{i}.jpg", quality=90)


def recipe_data_arguments(data_dir: Path):
    """The recipe config's `DataArguments`, reading ``data_dir`` (map-style) instead of the Hub."""
    from transformers import HfArgumentParser

    from nmsparse_hf.data import DataArguments
    from nmsparse_hf.recipes.arguments import shipped_config

    values = yaml.safe_load(shipped_config(CONFIG).read_text())
    fields = {f.name for f in dataclasses.fields(DataArguments)}
    data = {k: v for k, v in values.items() if k in fields}
    data.update(dataset_name=None, data_dir=str(data_dir), streaming=False)
    (args,) = HfArgumentParser(DataArguments).parse_dict(data, allow_extra_keys=True)
    return args, values


def build(data_dir: Path, cache_dir: Path):
    """(train dataset, train collator, data arguments) as the recipe builds them."""
    import datasets

    from nmsparse_hf.data import build_training_data

    args, values = recipe_data_arguments(data_dir)
    raw = datasets.load_dataset(
        "imagefolder", data_dir=str(data_dir), split="train", cache_dir=str(cache_dir)
    )
    data = build_training_data(
        args, raw, raw, num_labels=1000, bce_loss=bool(values.get("bce_loss")), seed=0
    )
    return data.train_dataset, data.train_collator, args


def per_example(dataset, count: int) -> float:
    """Images/s of ``dataset[i]`` (decode + augmentation) over ``count`` examples, one core."""
    dataset[0]  # warm-up (lazy imports, first decode)
    start = time.perf_counter()
    for i in range(count):
        dataset[i % len(dataset)]
    return count / (time.perf_counter() - start)


def collate_rate(dataset, collator, batch: int, rounds: int) -> float:
    """Images/s of the collator (stack + mixup) on ready examples."""
    examples = [dataset[i % len(dataset)] for i in range(batch)]
    collator(examples)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        collator(examples)
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def loader_rate(dataset, collator, batch: int, workers: int, batches: int) -> float:
    """Images/s through a DataLoader with ``workers`` processes, after a warm-up batch each."""
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        collate_fn=collator,
        persistent_workers=False,
        prefetch_factor=2,
        worker_init_fn=lambda _: torch.set_num_threads(1),
    )
    it = iter(loader)
    for _ in range(workers):
        next(it)
    start = time.perf_counter()
    seen = 0
    for _ in range(batches):
        try:
            seen += len(next(it)["labels"])
        except StopIteration:
            break
    return seen / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=512, help="JPEGs written and timed")
    parser.add_argument("--source-size", default="224", help="JPEG size: S or WxH")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default=None, help="folder for data_throughput.json")
    args = parser.parse_args(argv)
    w, _, h = args.source_size.partition("x")
    size = (int(w), int(h or w))
    torch.set_num_threads(1)
    result: dict = {"config": CONFIG, "source_size": list(size), "count": args.count}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        start = time.perf_counter()
        write_jpegs(folder, args.count, size)
        result["write_s"] = time.perf_counter() - start
        dataset, collator, data_args = build(folder, Path(tmp) / "cache")
        print(
            f"{args.count} JPEGs {size[0]}x{size[1]} (mean "
            f"{sum(p.stat().st_size for p in folder.rglob('*.jpg')) / args.count / 1024:.0f} KiB); "
            f"recipe {CONFIG}: image_size {data_args.image_size}, randaugment "
            f"{data_args.randaugment}, train_interpolation {data_args.train_interpolation}, "
            f"mixup {data_args.mixup_alpha}, collator {type(collator).__name__}"
        )
        result["per_example_per_core"] = per_example(dataset, args.count)
        print(
            f"per example (decode + augmentation), 1 core: {result['per_example_per_core']:.1f} img/s"
        )
        result["collate_mixup"] = collate_rate(dataset, collator, args.batch, 5)
        print(f"collate + mixup, batch {args.batch}: {result['collate_mixup']:.0f} img/s")
        result["loader"] = {}
        for workers in args.workers:
            batches = max(args.count // args.batch - workers, 1)
            rate = loader_rate(dataset, collator, args.batch, workers, batches)
            result["loader"][str(workers)] = rate
            print(f"DataLoader w={workers}: {rate:.1f} img/s ({rate / workers:.1f} per worker)")
    per_core = result["per_example_per_core"]
    print(
        f"sizing: workers per GPU ~ (GPU training img/s) / {per_core:.0f}; e.g. a GPU training "
        f"at 1000 img/s needs ~{1000 / per_core:.0f} workers on cores like these"
    )
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "data_throughput.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
