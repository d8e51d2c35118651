"""How the sparse step's fixed cost amortises: overhead over dense vs batch size and model width.

The masks, W~ and the SR-STE/MDGF terms are work per weight, not per sample, so their share of a
training step falls as the batch grows and as activations outgrow weights. This script runs
`bench/step_overhead.py`'s round-robin measurement (same variants, same statistics: per-round
ratio to dense, median and IQR) for each setting:

* batch sizes ``--batches`` (default 1 8 32) on ViT-S/16;
* widths ``--widths`` (default ViT-S/16 and ViT-B/16) at batch ``--width-batch`` (default 8);

and writes ``step_scaling.json`` (every setting's summary) and ``step_scaling.png`` into
``--out``. The plot shows the time inside the sparse passes as % of the dense step (median over
rounds, IQR bars; the low-noise measure of `bench/step_overhead.py`), against batch size and
against width; the printed lines give the end-to-end overhead too.

    python bench/step_scaling.py --out docs --repeats 5
    python bench/step_scaling.py --out /tmp/scaling --layers 1 --image-size 32 --repeats 1 \\
        --warmup 0 --batches 1 2 --widths vit-s          # smoke
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_overhead import (  # noqa: E402
    VARIANTS,
    WIDTHS,
    build_model,
    keep_heap,
    parse_pattern,
    run_variants,
    summarize,
)

DEFAULT_VARIANTS = ["dense", "STE", "SR-STE", "MDGF-exp", "authors"]


def measure(width: str, batch: int, args) -> dict:
    """One setting: build the model, run the variants round-robin, summarise."""
    base = build_model(False, args.layers, args.image_size, width=width)
    start = time.perf_counter()
    variants = run_variants(
        args.variants,
        base,
        batch,
        args.image_size,
        args.warmup,
        args.repeats,
        parse_pattern(args.pattern),
    )
    summary = summarize(variants)
    for row in summary.values():
        row.pop("rounds", None)
    seconds = time.perf_counter() - start
    line = ", ".join(
        f"{name} passes {r['passes_pct']:.2f}% [{r['passes_pct_iqr'][0]:.2f}, "
        f"{r['passes_pct_iqr'][1]:.2f}], step {r['overhead_pct']:+.1f}% "
        f"[{r['overhead_pct_iqr'][0]:+.1f}, {r['overhead_pct_iqr'][1]:+.1f}]"
        for name, r in summary.items()
        if name != "dense"
    )
    dense_ms = summary["dense"]["step_ms"]
    print(f"{width} batch {batch}: dense {dense_ms:.0f} ms/step; {line}  ({seconds:.0f} s)")
    return {"width": width, "batch": batch, "seconds": seconds, "variants": summary}


def plot(results: dict, path: Path) -> None:
    """Two panels: the passes' time as % of dense vs batch size (log x), and vs width; IQR bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = [n for n in results["variants"] if n != "dense"]
    for name in names:
        rows = results["batch"]
        xs = [r["batch"] for r in rows]
        ys = [r["variants"][name]["passes_pct"] for r in rows]
        lo = [y - r["variants"][name]["passes_pct_iqr"][0] for y, r in zip(ys, rows, strict=True)]
        hi = [r["variants"][name]["passes_pct_iqr"][1] - y for y, r in zip(ys, rows, strict=True)]
        left.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=name)
    left.set_xscale("log", base=2)
    left.set_xlabel(f"batch size ({results['batch_width']})")
    left.set_ylabel("time in the sparse passes (% of dense step)")
    left.axhline(3, color="gray", linestyle=":", linewidth=1)
    left.set_title("sparse passes vs batch size")
    left.legend(fontsize=8)
    rows = results["width"]
    offsets = [(i - (len(names) - 1) / 2) * 0.8 / max(len(names), 1) for i in range(len(names))]
    for name, off in zip(names, offsets, strict=True):
        ys = [r["variants"][name]["passes_pct"] for r in rows]
        lo = [y - r["variants"][name]["passes_pct_iqr"][0] for y, r in zip(ys, rows, strict=True)]
        hi = [r["variants"][name]["passes_pct_iqr"][1] - y for y, r in zip(ys, rows, strict=True)]
        xs = [i + off for i in range(len(rows))]
        right.bar(xs, ys, width=0.8 / max(len(names), 1), yerr=[lo, hi], capsize=2, label=name)
    right.set_xticks(range(len(rows)), [r["width"] for r in rows])
    right.set_xlabel(f"model (batch {results['width_batch']})")
    right.axhline(3, color="gray", linestyle=":", linewidth=1)
    right.set_title("sparse passes vs width")
    fig.suptitle(
        f"N:M sparse training step over dense, FF {results['pattern']}, CPU, "
        f"{results['threads']} threads (median over rounds, IQR bars; target 3% dotted)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="docs", help="folder for step_scaling.json/.png")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--widths", nargs="+", default=["vit-s", "vit-b"], choices=list(WIDTHS))
    parser.add_argument("--width-batch", type=int, default=8)
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=VARIANTS)
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--layers", type=int, default=None, help="encoder depth (default 12)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    heap_kept = keep_heap()  # as bench/step_overhead.py: no random page-fault time
    args.variants = ["dense"] + [v for v in args.variants if v != "dense"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "pattern": args.pattern,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "layers": args.layers or 12,
        "image_size": args.image_size,
        "torch": torch.__version__,
        "heap_kept": heap_kept,
        "variants": args.variants,
        "batch_width": "vit-s",
        "width_batch": args.width_batch,
        "batch": [],
        "width": [],
    }
    measured: dict[tuple[str, int], dict] = {}
    for batch in args.batches:
        measured[("vit-s", batch)] = measure("vit-s", batch, args)
        results["batch"].append(measured[("vit-s", batch)])
    for width in args.widths:
        key = (width, args.width_batch)
        if key not in measured:
            measured[key] = measure(width, args.width_batch, args)
        results["width"].append(measured[key])
    (out / "step_scaling.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "step_scaling.png")
    print(f"wrote {out / 'step_scaling.json'} and {out / 'step_scaling.png'}")
    return results


if __name__ == "__main__":
    main()
