"""The paper in miniature: held-out accuracy of each N:M recipe at 2:4, 1:8 and 1:16 on FF.

A tiny ViT (8x8 one-channel images, patch 2, 2 layers, hidden 64, MLP 256) learns scikit-learn's
bundled handwritten digits (1497 train / 300 held out, the split of ``examples/plain_loop.py``;
no network). Every (recipe, pattern) runs under an **equal budget** for a given seed: the same
initial weights, the same split and batch order, the same optimizer (AdamW), learning rate and
cosine schedule, the same number of steps. Sparsity is on the feed-forward layers (``FF``, row
grouping); no dense warm-up and no fine-tune phase, so every sparse recipe spends the whole run
under its own schedule (docs/METHOD.md §5) and is evaluated as exported: ``finalize()`` bakes
W ⊙ Φ(W; N, M) into the weights before the held-out pass.

Recipes (docs/METHOD.md §4):

* ``dense``: no mask. Its runs do not depend on the pattern, so it runs once per seed and is
  shown as the reference in every pattern's column.
* ``STE`` (opt-in, not in the default list): binary mask from step 0, straight-through gradient.
* ``SR-STE``: binary mask + lambda (1 - m) W on the pruned weights' gradient, lambda = 2e-4.
* ``MDGF-linear`` / ``MDGF-exp``: pruned weights contribute alpha_j W to the forward, alpha
  decaying to ~0 at 70% of training, the paper's advice: linear beta = 1/L, exp beta = 6.9/L with
  L = 0.7 x total steps.
* ``SDGF-stepwise`` / ``SDGF-geometric``: the pattern itself decays in equal stages over the run:
  stepwise (M-1):M, M/2:M, ..., N:M (1:8: 7:8, 4:8, 2:8, 1:8; 1:16 has five stages), geometric
  (kN):(kM) for k = 8, 4, 2, 1 (the default ``structure_decay_start_k``). The geometric 1:16
  start 8:128 does not fit fc1's 64 inputs: ``structure_decay_fallback`` lets fc1 hold the next
  stage that fits (4:64) there; fc2 (256 inputs) takes every stage.

Optimizer: AdamW (lr 3e-3, weight decay 0.01), cosine with 5% linear warm-up, grad-norm clip 1.0
(the paper's), batch 64, 12 epochs (288 steps) by default.

Runs are interleaved (for each seed, for each pattern, every recipe) so that load from other
processes on a shared machine spreads over all recipes alike.

    .venv/bin/python bench/study.py                       # 3 seeds, the full grid, docs/
    .venv/bin/python bench/study.py --seeds 1 --epochs 1 --recipes dense,SR-STE --patterns 1:8 \
        --out /tmp/study
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from torch.utils.data import DataLoader
from transformers import ViTConfig, ViTForImageClassification, get_cosine_schedule_with_warmup

from nmsparse_hf import NMSparsifier, NMSparsityConfig

ROOT = Path(__file__).resolve().parents[1]
ALPHA_ZERO_AT = 0.7  # the paper's advice: alpha ~ 0 at about 70% of training

MODEL = {
    "image_size": 8,
    "patch_size": 2,
    "num_channels": 1,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 256,
    "num_labels": 10,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}


def recipe_config(name: str, n_keep: int, m: int, total_steps: int) -> NMSparsityConfig:
    """The `NMSparsityConfig` of recipe ``name`` at ``n_keep:m`` on FF for a run of
    ``total_steps`` optimizer steps (MDGF's beta depends on it)."""
    sparse_steps = ALPHA_ZERO_AT * total_steps
    fields: dict[str, dict] = {
        "dense": {"sparsity_type": "dense"},
        "STE": {"sparsity_type": "structure_nm", "decay_type": "step"},
        "SR-STE": {"sparsity_type": "srste"},
        "MDGF-linear": {"decay_type": "linear", "decay_coef": 1.0 / sparse_steps},
        "MDGF-exp": {"decay_type": "exp", "decay_coef": 6.9 / sparse_steps},
        "SDGF-stepwise": {"structure_decay": True, "structure_decay_type": "sparsify"},
        "SDGF-geometric": {
            "structure_decay": True,
            "structure_decay_type": "fine",
            "structure_decay_fallback": True,
        },
    }
    if name not in fields:
        raise SystemExit(f"--recipes: unknown recipe {name!r}; choose from {', '.join(fields)}.")
    return NMSparsityConfig(n_keep=n_keep, m=m, locations="FF", **fields[name])


def load_digits_split(seed: int):
    """(train, test) TensorDatasets: `digits_tensors` of ``examples/plain_loop.py``."""
    path = ROOT / "examples" / "plain_loop.py"
    spec = importlib.util.spec_from_file_location("plain_loop", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.digits_tensors(seed)


def train_one(
    recipe: str, pattern: tuple[int, int], seed: int, data, args: argparse.Namespace
) -> dict:
    """Train one run and return {"accuracy", "train_loss", "seconds", "steps", "decay_coef"}:
    held-out accuracy of the finalized (exported) model, mean loss of the last epoch."""
    train, test = data
    torch.manual_seed(seed)
    model = ViTForImageClassification(ViTConfig(**MODEL))
    loader = DataLoader(
        train,
        batch_size=args.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    total_steps = args.epochs * len(loader)
    config = recipe_config(recipe, *pattern, total_steps)
    sparsifier = NMSparsifier(model, config, total_steps=total_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, round(args.warmup * total_steps), total_steps
    )
    start = time.perf_counter()
    step, losses = 0, []
    model.train()
    for _ in range(args.epochs):
        losses = []
        for x, y in loader:
            sparsifier.update(step)
            loss = model(pixel_values=x, labels=y).loss
            loss.backward()
            if args.clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            step += 1
    if config.enabled:
        sparsifier.finalize()  # the exported weights: W * mask, verified N:M
    model.eval()
    x, y = test.tensors
    with torch.no_grad():
        accuracy = float((model(pixel_values=x).logits.argmax(-1) == y).float().mean())
    return {
        "accuracy": accuracy,
        "train_loss": statistics.fmean(losses),
        "seconds": time.perf_counter() - start,
        "steps": total_steps,
        "decay_coef": config.decay_coef if config.mask_decay else None,
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[dict], recipes: list[str], patterns: list[str]) -> dict:
    """{recipe: {pattern: {"mean", "std", "n", "vs_srste"}}}; dense is repeated in every pattern.

    ``vs_srste`` is the per-seed paired difference to SR-STE at the same pattern (same init and
    batch order), as mean, std and how many seeds came out ahead."""
    acc = {(r["recipe"], r["pattern"], r["seed"]): r["accuracy"] for r in runs}
    out: dict[str, dict] = {}
    for recipe in recipes:
        out[recipe] = {}
        for pattern in patterns:
            key = "dense" if recipe == "dense" else pattern
            seeds = sorted(s for (rc, p, s) in acc if rc == recipe and p == key)
            if not seeds:
                continue
            mean, std = mean_std([acc[recipe, key, s] for s in seeds])
            cell = {"mean": mean, "std": std, "n": len(seeds)}
            paired = [
                acc[recipe, key, s] - acc["SR-STE", pattern, s]
                for s in seeds
                if ("SR-STE", pattern, s) in acc and recipe != "SR-STE"
            ]
            if paired:
                d_mean, d_std = mean_std(paired)
                cell["vs_srste"] = {
                    "mean": d_mean,
                    "std": d_std,
                    "ahead": sum(d > 0 for d in paired),
                    "tied": sum(d == 0 for d in paired),
                    "n": len(paired),
                }
            out[recipe][pattern] = cell
    return out


def table(summary: dict, patterns: list[str]) -> str:
    """Markdown table: held-out accuracy (%) mean ± std per recipe and pattern."""
    lines = [
        "| recipe | " + " | ".join(f"{p} FF" for p in patterns) + " |",
        "|---|" + "---|" * len(patterns),
    ]
    for recipe, cells in summary.items():
        row = []
        for p in patterns:
            c = cells.get(p)
            row.append("n/a" if c is None else f"{100 * c['mean']:.1f} ± {100 * c['std']:.1f}")
        lines.append(f"| {recipe} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def paired_table(summary: dict, patterns: list[str]) -> str:
    """Markdown table: paired difference to SR-STE (points), mean ± std, seeds ahead/total."""
    lines = [
        "| recipe − SR-STE | " + " | ".join(f"{p} FF" for p in patterns) + " |",
        "|---|" + "---|" * len(patterns),
    ]
    for recipe, cells in summary.items():
        if recipe == "SR-STE" or not any("vs_srste" in c for c in cells.values()):
            continue
        row = []
        for p in patterns:
            d = cells.get(p, {}).get("vs_srste")
            row.append(
                "n/a"
                if d is None
                else f"{100 * d['mean']:+.1f} ± {100 * d['std']:.1f} ({d['ahead']}/{d['n']})"
            )
        lines.append(f"| {recipe} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(summary: dict, runs: list[dict], patterns: list[str], path: Path, title: str) -> None:
    """Accuracy vs pattern, one line per recipe (mean ± std error bars, seeds as dots); dense as a
    horizontal band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 5), constrained_layout=True)
    sparse = [r for r in summary if r != "dense"]
    colors = plt.get_cmap("tab10").colors
    xs = range(len(patterns))
    if "dense" in summary and summary["dense"]:
        cell = next(iter(summary["dense"].values()))
        mean, std = 100 * cell["mean"], 100 * cell["std"]
        ax.axhline(mean, color="black", linestyle="--", linewidth=1.2, label="dense")
        ax.axhspan(mean - std, mean + std, color="0.85", zorder=0)
    width = 0.6 / max(len(sparse), 1)
    for i, recipe in enumerate(sparse):
        offset = (i - (len(sparse) - 1) / 2) * width
        cells = [summary[recipe].get(p) for p in patterns]
        x = [k + offset for k, c in zip(xs, cells, strict=True) if c]
        mean = [100 * c["mean"] for c in cells if c]
        std = [100 * c["std"] for c in cells if c]
        color = colors[i % len(colors)]
        ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, color=color, label=recipe)
        for k, p in enumerate(patterns):
            seeds = [
                100 * r["accuracy"] for r in runs if r["recipe"] == recipe and r["pattern"] == p
            ]
            ax.scatter([k + offset] * len(seeds), seeds, s=9, color=color, alpha=0.35, zorder=1)
    ax.set_xticks(
        list(xs),
        [f"{p}\n({100 * int(p.split(':')[0]) / int(p.split(':')[1]):.3g}% kept)" for p in patterns],
    )
    ax.set_xlabel("N:M on the feed-forward layers (row)")
    ax.set_ylabel("held-out accuracy (%), 300 digits")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    """Run the study, print the tables, write ``study_results.json`` and ``study.png`` to --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..K-1 (default 3)")
    parser.add_argument("--epochs", type=int, default=12, help="epochs per run (default 12)")
    parser.add_argument("--patterns", default="2:4,1:8,1:16", help="N:M kept on FF, comma list")
    parser.add_argument(
        "--recipes",
        default="dense,SR-STE,MDGF-linear,MDGF-exp,SDGF-stepwise,SDGF-geometric",
        help="comma list of dense, STE, SR-STE, MDGF-linear, MDGF-exp, SDGF-stepwise, "
        "SDGF-geometric",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW peak lr (default 3e-3)")
    parser.add_argument("--clip", type=float, default=1.0, help="grad-norm clip (0: off)")
    parser.add_argument("--warmup", type=float, default=0.05, help="warm-up fraction of steps")
    parser.add_argument("--out", default=str(ROOT / "docs"), help="folder for the JSON and PNG")
    parser.add_argument("--no-plot", action="store_true", help="skip study.png")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    patterns = [p.strip() for p in args.patterns.split(",") if p.strip()]
    parsed = {p: tuple(int(v) for v in p.split(":")) for p in patterns}
    for name in recipes:  # fail on a typo before any training
        recipe_config(name, 1, 4, 100)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    runs: list[dict] = []
    start = time.perf_counter()
    for seed in range(args.seeds):
        data = load_digits_split(seed)
        for pattern in patterns:
            for recipe in recipes:
                if recipe == "dense" and pattern != patterns[0]:
                    continue  # dense ignores the pattern: one run per seed
                result = train_one(recipe, parsed[pattern], seed, data, args)
                run = {
                    "recipe": recipe,
                    "pattern": "dense" if recipe == "dense" else pattern,
                    "seed": seed,
                    **result,
                }
                runs.append(run)
                print(
                    f"seed {seed}  {run['pattern']:>5}  {recipe:<15} acc {run['accuracy']:.3f}  "
                    f"loss {run['train_loss']:.3f}  {run['seconds']:.1f}s",
                    flush=True,
                )
    wall = time.perf_counter() - start

    summary = summarize(runs, recipes, patterns)
    steps = runs[0]["steps"]
    print(f"\nheld-out accuracy (%), mean ± std over {args.seeds} seed(s), {steps} steps per run")
    print(table(summary, patterns))
    if "SR-STE" in recipes and len(recipes) > 1:
        print("\npaired difference to SR-STE (points), mean ± std (seeds ahead / seeds)")
        print(paired_table(summary, patterns))
    print(f"\nwall time {wall:.0f} s for {len(runs)} runs")

    results = {
        "config": {
            "command": "bench/study.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "args": vars(args),
            "model": MODEL,
            "sparsity": {
                "locations": "FF",
                "sparse_dim": "row",
                "dense_fraction": 0.0,
                "finetune_fraction": 0.0,
                "alpha_zero_at": ALPHA_ZERO_AT,
                "srste_lambda": NMSparsityConfig().srste_lambda,
                "structure_decay_start_k": NMSparsityConfig().structure_decay_start_k,
            },
            "optimizer": "AdamW(weight_decay=0.01), cosine with linear warm-up",
            "steps_per_run": steps,
            "data": "sklearn digits, 1497 train / 300 held out (split by seed)",
            "machine": {
                "platform": platform.platform(),
                "processor": platform.processor() or platform.machine(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "threads": args.threads,
            },
            "wall_seconds": wall,
        },
        "summary": summary,
        "runs": runs,
    }
    (out / "study_results.json").write_text(json.dumps(results, indent=2) + "\n")
    if not args.no_plot:
        plot(
            summary,
            runs,
            patterns,
            out / "study.png",
            f"Tiny ViT on digits, N:M on FF, {steps} steps, mean ± std over {args.seeds} "
            f"seed(s) (dots: seeds)",
        )
    print(
        f"wrote {out / 'study_results.json'}" + ("" if args.no_plot else f", {out / 'study.png'}")
    )
    return results


if __name__ == "__main__":
    main()
