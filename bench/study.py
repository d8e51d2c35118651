"""The paper in miniature: held-out accuracy of every N:M recipe where capacity binds.

A narrow tiny ViT (8x8 one-channel images, patch 2, see ``MODEL``) learns scikit-learn's bundled
handwritten digits (1497 train / 300 held out, the split of ``examples/plain_loop.py``; no
network). Sparsity sits either on the feed-forward layers only (``FF``) or on the feed-forward
layers and the attention query, key and value projections at the same pattern (``FF+QKV``), row
grouping, at patterns up to 1:32 (1:64 where every targeted layer's input width allows it).

Every run of a seed has an **equal budget**: the same initial weights, the same split and batch
order, the same optimizer (AdamW), learning rate and cosine schedule and the same number of
optimizer steps; no dense warm-up; the last ``--finetune`` fraction of the steps (10% by
default) runs with the binary target mask for every recipe. The model is evaluated as exported:
``finalize()`` bakes W ⊙ Φ(W; N, M) into the weights before the held-out pass.

Recipes (docs/METHOD.md §4): ``dense``, ``STE``, ``SR-STE`` (λ = 2e-4), ``MDGF-linear`` /
``MDGF-exp`` (α ≈ 0 at 70% of the steps: β = 1/L and 6.9/L with L = 0.7 × steps),
``SDGF-stepwise`` / ``SDGF-geometric`` (the pattern decays in equal stages over the sparse phase;
geometric stages that do not fit a layer are skipped by ``structure_decay_fallback``).

Statistics: for each cell (location, pattern, recipe) the mean over seeds with its 95% t
interval, and the per-seed **paired** difference to SR-STE at the same location and pattern (same
initial weights and batch order): mean, 95% t interval, and seeds ahead / tied / total.

The grid is run column by column (a column is one location and pattern), sparsest first, every
seed and recipe of a column before the next, and the JSON is rewritten after every run: a run
that is stopped keeps its finished runs, and running the same command again skips them.

    .venv/bin/python bench/study.py                              # the full grid, into docs/
    .venv/bin/python bench/study.py --cell FF+QKV/1:32/MDGF-exp  # rerun one cell, every seed
    .venv/bin/python bench/study.py --seeds 1 --epochs 1 --recipes dense,SR-STE \\
        --columns FF/1:8 --out /tmp/study                      # smoke run
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
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
RESULTS = "study_results.json"
PLOT = "study.png"

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
LOCATIONS = {"FF": "FF", "FF+QKV": "FF,QKV"}
RECIPES = (
    "dense",
    "STE",
    "SR-STE",
    "MDGF-linear",
    "MDGF-exp",
    "SDGF-stepwise",
    "SDGF-geometric",
)
# Settings that change what a run computes: a saved run is reused only if they match.
RUN_KEYS = ("epochs", "batch_size", "lr", "clip", "warmup", "finetune")


def recipe_config(
    name: str, pattern: tuple[int, int], location: str, total_steps: int, finetune: float = 0.0
) -> NMSparsityConfig:
    """The `NMSparsityConfig` of recipe ``name`` at ``pattern`` (n_keep, m) on ``location``
    (``FF`` or ``FF+QKV``, Q/K/V at the same pattern) for a run of ``total_steps`` optimizer steps
    (MDGF's beta depends on it), the last ``finetune`` fraction with the binary target mask."""
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
    if location not in LOCATIONS:
        raise SystemExit(
            f"--locations: unknown location {location!r}; choose from {', '.join(LOCATIONS)}."
        )
    n_keep, m = pattern
    return NMSparsityConfig(
        n_keep=n_keep,
        m=m,
        n_keep_qkv=n_keep,
        m_qkv=m,
        locations=LOCATIONS[location],
        finetune_fraction=0.0 if name == "dense" else finetune,
        **fields[name],
    )


def load_digits_split(seed: int):
    """(train, test) TensorDatasets: `digits_tensors` of ``examples/plain_loop.py``."""
    path = ROOT / "examples" / "plain_loop.py"
    spec = importlib.util.spec_from_file_location("plain_loop", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.digits_tensors(seed)


def train_one(cell: tuple[str, str, str], seed: int, data, args: argparse.Namespace) -> dict:
    """Train one run of ``cell`` = (location, pattern, recipe) and return {"accuracy",
    "train_loss", "seconds", "steps", "decay_coef"}: held-out accuracy of the finalized
    (exported) model and mean loss of the last epoch."""
    location, pattern, recipe = cell
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
    if recipe == "dense":  # no mask: the pattern and location are unused
        config = recipe_config(recipe, (1, 4), "FF", total_steps)
    else:
        config = recipe_config(recipe, parse_pattern(pattern), location, total_steps, args.finetune)
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


def parse_pattern(text: str) -> tuple[int, int]:
    """``"1:32"`` -> (1, 32); a malformed pattern exits with the fix."""
    try:
        n_keep, m = (int(v) for v in text.split(":"))
    except ValueError:
        raise SystemExit(f"pattern {text!r} is not N:M (e.g. 1:32).") from None
    if not 0 < n_keep < m:
        raise SystemExit(f"pattern {text!r} needs 0 < N < M.")
    return n_keep, m


def t_interval(values: list[float]) -> dict:
    """Mean, sample std, n and the half-width of the 95% Student-t interval of the mean (0 for a
    single value)."""
    from scipy.stats import t as student_t

    n = len(values)
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if n > 1 else 0.0
    half = float(student_t.ppf(0.975, n - 1)) * std / math.sqrt(n) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n, "ci95": half}


def summarize(runs: list[dict]) -> dict:
    """{location: {pattern: {recipe: cell}}}; dense (one run per seed) is listed in every column.

    A cell holds the t interval of its accuracy (`t_interval`) and ``vs_srste``: the per-seed
    paired difference to SR-STE at the same location and pattern (t interval, plus seeds ahead,
    tied and total), and ``train_loss``, the mean over seeds of the last epoch's training loss."""
    acc = {(r["location"], r["pattern"], r["recipe"], r["seed"]): r["accuracy"] for r in runs}
    loss = {
        (r["location"], r["pattern"], r["recipe"], r["seed"]): r.get("train_loss") for r in runs
    }
    columns = sorted({(loc, p) for loc, p, rec, _ in acc if rec != "dense"}, key=column_order)
    out: dict[str, dict] = {}
    for loc, pattern in columns:
        recipes = [r for r in RECIPES if any(k[2] == r for k in acc)]
        for recipe in recipes:
            key = ("dense", "dense", "dense") if recipe == "dense" else (loc, pattern, recipe)
            seeds = sorted(k[3] for k in acc if k[:3] == key)
            if seeds:
                cell = cell_stats(acc, key, (loc, pattern), seeds)
                losses = [loss[(*key, s)] for s in seeds]
                if None not in losses:
                    cell["train_loss"] = statistics.fmean(losses)
                out.setdefault(loc, {}).setdefault(pattern, {})[recipe] = cell
    return out


def cell_stats(acc: dict, key: tuple, column: tuple[str, str], seeds: list[int]) -> dict:
    """One cell of `summarize`: accuracy t interval and the paired difference to SR-STE."""
    cell = t_interval([acc[(*key, s)] for s in seeds])
    reference = ("SR-STE", column[0], column[1])
    paired = [
        acc[(*key, s)] - acc[(column[0], column[1], "SR-STE", s)]
        for s in seeds
        if (column[0], column[1], "SR-STE", s) in acc and key[2] != reference[0]
    ]
    if paired:
        cell["vs_srste"] = {
            **t_interval(paired),
            "ahead": sum(d > 0 for d in paired),
            "tied": sum(d == 0 for d in paired),
        }
    return cell


def column_order(column: tuple[str, str]) -> tuple:
    """Sort key of a (location, pattern) column: location as in ``LOCATIONS``, then density."""
    n_keep, m = parse_pattern(column[1])
    return (list(LOCATIONS).index(column[0]), -n_keep / m)


def tables(summary: dict) -> str:
    """Three markdown tables, one column per location and pattern: accuracy (%) mean ± 95% CI,
    the paired difference to SR-STE (points) mean ± 95% CI with seeds ahead / seeds, and the
    mean training loss of the last epoch."""
    columns = [(loc, p) for loc, pats in summary.items() for p in pats]
    recipes = [r for r in RECIPES if any(r in summary[c[0]][c[1]] for c in columns)]
    head = " | ".join(f"{p} {loc}" for loc, p in columns)
    acc = [f"| recipe | {head} |", "|---|" + "---|" * len(columns)]
    diff = [f"| recipe − SR-STE | {head} |", "|---|" + "---|" * len(columns)]
    loss = [f"| train loss | {head} |", "|---|" + "---|" * len(columns)]
    for recipe in recipes:
        cells = [summary[loc][p].get(recipe) for loc, p in columns]
        acc.append(f"| {recipe} | " + " | ".join(fmt_acc(c) for c in cells) + " |")
        if recipe != "SR-STE":
            diff.append(f"| {recipe} | " + " | ".join(fmt_diff(c) for c in cells) + " |")
        losses = ["n/a" if c is None else f"{c.get('train_loss', float('nan')):.3f}" for c in cells]
        loss.append(f"| {recipe} | " + " | ".join(losses) + " |")
    return "\n\n".join("\n".join(t) for t in (acc, diff, loss))


def fmt_acc(cell: dict | None) -> str:
    """``mean ± ci95 (n)`` in percent, or n/a."""
    if cell is None:
        return "n/a"
    return f"{100 * cell['mean']:.2f} ± {100 * cell['ci95']:.2f} ({cell['n']})"


def fmt_diff(cell: dict | None) -> str:
    """``+mean ± ci95 (ahead/n)`` in points, or n/a."""
    d = None if cell is None else cell.get("vs_srste")
    if d is None:
        return "n/a"
    return f"{100 * d['mean']:+.2f} ± {100 * d['ci95']:.2f} ({d['ahead']}/{d['n']})"


def plot(summary: dict, path: Path, title: str) -> None:
    """Top row: accuracy vs pattern, one panel per location, one line per recipe (mean with its
    95% t interval), dense as a dashed line with its interval as a band. Bottom row: the paired
    difference to SR-STE (points) with its 95% t interval; 0 is SR-STE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    locations = list(summary)
    fig, axes = plt.subplots(
        2, len(locations), figsize=(6 * len(locations) + 2, 9), squeeze=False, sharey="row"
    )
    for k, loc in enumerate(locations):
        plot_panel(axes[0][k], summary[loc], loc, paired=False)
        plot_panel(axes[1][k], summary[loc], loc, paired=True)
    axes[0][0].set_ylabel("held-out accuracy (%), 300 digits")
    axes[1][0].set_ylabel("recipe − SR-STE, same seed (points)")
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[1][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_panel(ax, columns: dict, location: str, paired: bool) -> None:
    """One panel of `plot`: accuracy, or (``paired``) the difference to SR-STE."""
    import matplotlib.pyplot as plt

    patterns = sorted(columns, key=lambda p: -parse_pattern(p)[0] / parse_pattern(p)[1])
    skip = {"SR-STE"} if paired else {"dense"}
    recipes = [r for r in RECIPES if r not in skip and any(r in columns[p] for p in patterns)]
    colors = dict(zip(RECIPES, ("black", *plt.get_cmap("tab10").colors), strict=False))
    dense = next((columns[p]["dense"] for p in patterns if "dense" in columns[p]), None)
    if dense and not paired:
        mean, half = 100 * dense["mean"], 100 * dense["ci95"]
        ax.axhline(mean, color="black", linestyle="--", linewidth=1.2, label="dense")
        ax.axhspan(mean - half, mean + half, color="0.85", zorder=0)
    if paired:
        ax.axhline(0.0, color=colors["SR-STE"], linewidth=1.2, label="SR-STE")
    width = 0.6 / max(len(recipes), 1)
    for i, recipe in enumerate(recipes):
        offset = (i - (len(recipes) - 1) / 2) * width
        pts = [(k + offset, columns[p].get(recipe)) for k, p in enumerate(patterns)]
        pts = [
            (x, c["vs_srste"] if paired else c)
            for x, c in pts
            if c and (not paired or "vs_srste" in c)
        ]
        ax.errorbar(
            [x for x, _ in pts],
            [100 * c["mean"] for _, c in pts],
            yerr=[100 * c["ci95"] for _, c in pts],
            marker="o",
            capsize=3,
            color=colors[recipe],
            linestyle=":" if recipe == "dense" else "-",
            label=recipe,
        )
    kept = [100 * parse_pattern(p)[0] / parse_pattern(p)[1] for p in patterns]
    ax.set_xticks(
        range(len(patterns)), [f"{p}\n({k:.3g}% kept)" for p, k in zip(patterns, kept, strict=True)]
    )
    ax.set_xlabel(f"N:M on {location} (row)")
    ax.set_title(
        f"{location}: " + ("paired difference to SR-STE" if paired else "accuracy"), fontsize=10
    )
    ax.grid(alpha=0.3, axis="y")


def load_runs(path: Path, args: argparse.Namespace) -> list[dict]:
    """The runs already in ``path`` (none if it does not exist); refuses a file written with
    other run settings or another model, which its runs would silently mix with."""
    if not path.exists() or args.fresh:
        return []
    saved = json.loads(path.read_text())
    config = saved.get("config", {})
    mine = {k: getattr(args, k) for k in RUN_KEYS}
    theirs = {k: config.get("args", {}).get(k) for k in RUN_KEYS}
    if theirs != mine or config.get("model") != MODEL:
        raise SystemExit(
            f"{path} holds runs of other settings ({theirs}, model {config.get('model')}); "
            f"this run has {mine}, model {MODEL}. Pass the same settings to resume, another "
            "--out, or --fresh to start over."
        )
    return saved.get("runs", [])


def plan(args: argparse.Namespace) -> list[tuple[tuple[str, str, str], int]]:
    """The (cell, seed) runs of this invocation, in order: dense first, then column by column in
    the order of --columns (list the column that matters most first), per column seed by seed,
    every recipe."""
    if args.cell:
        cell = parse_cell(args.cell)
        return [(cell, seed) for seed in range(args.seeds)]
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    columns = [parse_column(c.strip()) for c in args.columns.split(",") if c.strip()]
    for name in recipes:  # fail on a typo before any training
        recipe_config(name, (1, 4), "FF", 100)
    order = []
    if "dense" in recipes:
        order += [(("dense", "dense", "dense"), s) for s in range(args.seeds)]
    for loc, pattern in columns:
        for seed in range(args.seeds):
            order += [((loc, pattern, r), seed) for r in recipes if r != "dense"]
    return order


def parse_column(text: str) -> tuple[str, str]:
    """``LOCATION/PATTERN`` (``FF+QKV/1:32``) -> (location, pattern), checked."""
    location, _, pattern = text.partition("/")
    recipe_config("SR-STE", parse_pattern(pattern), location, 100)
    return location, pattern


def parse_cell(text: str) -> tuple[str, str, str]:
    """``LOCATION/PATTERN/RECIPE`` (``FF+QKV/1:32/MDGF-exp``) or ``dense`` -> a cell key."""
    if text == "dense":
        return ("dense", "dense", "dense")
    parts = text.split("/")
    if len(parts) != 3:
        raise SystemExit(f"--cell: {text!r} is not LOCATION/PATTERN/RECIPE (FF+QKV/1:32/SR-STE).")
    location, pattern, recipe = parts
    recipe_config(recipe, parse_pattern(pattern), location, 100)
    return (location, pattern, recipe)


def write(out: Path, runs: list[dict], args: argparse.Namespace, wall: float) -> dict:
    """Rewrite ``study_results.json`` (config, summary, runs) atomically; return its content."""
    results = {
        "config": {
            "command": "bench/study.py " + " ".join(args.argv),
            "args": {k: v for k, v in vars(args).items() if k != "argv"},
            "model": MODEL,
            "sparsity": {
                "locations": {k: v for k, v in LOCATIONS.items()},
                "qkv_pattern": "same as FF",
                "sparse_dim": "row",
                "dense_fraction": 0.0,
                "finetune_fraction": args.finetune,
                "alpha_zero_at": ALPHA_ZERO_AT,
                "srste_lambda": NMSparsityConfig().srste_lambda,
                "structure_decay_start_k": NMSparsityConfig().structure_decay_start_k,
            },
            "optimizer": "AdamW(weight_decay=0.01), cosine with linear warm-up",
            "steps_per_run": runs[0]["steps"] if runs else None,
            "data": "sklearn digits, 1497 train / 300 held out (split by seed)",
            "machine": {
                "platform": platform.platform(),
                "processor": platform.processor() or platform.machine(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "threads": args.threads,
            },
            "wall_seconds_this_invocation": wall,
            "run_seconds_total": sum(r["seconds"] for r in runs),
        },
        "summary": summarize(runs),
        "runs": runs,
    }
    tmp = out / (RESULTS + ".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out / RESULTS)
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line of `main`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8, help="seeds 0..K-1 (default 8)")
    parser.add_argument("--epochs", type=int, default=16, help="epochs per run (default 16)")
    parser.add_argument(
        "--columns",
        default="FF+QKV/1:32,FF/1:32,FF+QKV/1:8,FF+QKV/1:64,FF/1:64",
        help="comma list of LOCATION/PATTERN (LOCATION: FF or FF+QKV), run in this order",
    )
    parser.add_argument(
        "--recipes", default=",".join(RECIPES), help="comma list of " + ", ".join(RECIPES)
    )
    parser.add_argument(
        "--cell", help="rerun one cell LOCATION/PATTERN/RECIPE (or dense) for every seed"
    )
    parser.add_argument("--fresh", action="store_true", help="ignore the runs already in --out")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW peak lr (default 3e-3)")
    parser.add_argument("--clip", type=float, default=1.0, help="grad-norm clip (0: off)")
    parser.add_argument("--warmup", type=float, default=0.05, help="warm-up fraction of steps")
    parser.add_argument(
        "--finetune", type=float, default=0.1, help="binary-mask fine-tune fraction"
    )
    parser.add_argument("--out", default=str(ROOT / "docs"), help="folder for the JSON and PNG")
    parser.add_argument("--no-plot", action="store_true", help="skip study.png")
    parser.add_argument(
        "--report", action="store_true", help="train nothing: tables and plot of the saved runs"
    )
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    return args


def run_grid(out: Path, args: argparse.Namespace) -> dict:
    """Train the runs of `plan` that ``out`` does not hold yet (all of a --cell), rewriting the
    JSON after each; return its final content."""
    todo = plan(args)
    runs = load_runs(out / RESULTS, args)
    if args.cell:  # a rerun replaces the cell's saved runs
        runs = [r for r in runs if (r["location"], r["pattern"], r["recipe"]) != todo[0][0]]
    done = {(r["location"], r["pattern"], r["recipe"], r["seed"]) for r in runs}
    start, data = time.perf_counter(), {}
    for cell, seed in todo:
        if (*cell, seed) in done:
            continue
        data.setdefault(seed, load_digits_split(seed))
        result = train_one(cell, seed, data[seed], args)
        runs.append(
            {"location": cell[0], "pattern": cell[1], "recipe": cell[2], "seed": seed, **result}
        )
        done.add((*cell, seed))
        print(
            f"seed {seed}  {cell[0]:>6} {cell[1]:>5}  {cell[2]:<15} acc {result['accuracy']:.3f}  "
            f"loss {result['train_loss']:.3f}  {result['seconds']:.1f}s",
            flush=True,
        )
        write(out, runs, args, time.perf_counter() - start)
    return write(out, runs, args, time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    """Run (or resume) the study, print the tables, write the JSON and the plot to --out."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        saved = json.loads((out / RESULTS).read_text())
        results = {**saved, "summary": summarize(saved["runs"])}
    else:
        results = run_grid(out, args)
    steps = results["config"]["steps_per_run"]
    print(f"\nheld-out accuracy (%), mean ± 95% t interval (seeds); {steps} steps per run")
    print(
        "then: paired difference to SR-STE (points), mean ± 95% t interval (seeds ahead / seeds);\n"
        "then: mean training loss of the last epoch\n"
    )
    print(tables(results["summary"]))
    if not args.no_plot and results["summary"]:
        plot(
            results["summary"],
            out / PLOT,
            f"Tiny ViT on digits, {steps} steps; mean and 95% t interval over seeds",
        )
    written = ([] if args.report else [out / RESULTS]) + ([] if args.no_plot else [out / PLOT])
    if written:
        print("\nwrote " + ", ".join(map(str, written)))
    return results


if __name__ == "__main__":
    main()
