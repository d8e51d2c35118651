"""The ``nmsparse`` console script.

    nmsparse verify CHECKPOINT [--json]
        Check a saved sparse checkpoint against its nm_sparsity metadata (reads JSON and
        safetensors only). Exit 0: every layer is N:M and the metadata matches the weights;
        1: a violation or a metadata mismatch; 2: the input cannot be read.
    nmsparse schedule CONFIG --total-steps N [--every K] [--plot out.png] [--ignore-unknown]
        Print the schedule (phase, alpha and each location's pattern) at every phase/stage
        boundary and every K steps; optionally plot it.
    nmsparse report CONFIG --model-type vit|swin|swinv2 [--total-steps N] [--ignore-unknown]
        Build the default-size model of that family (no weights) and list which layers the
        config makes sparse, with their patterns, and which it skips.

CONFIG is a YAML file with our keys or the seed's, flat or under a ``sparsity:`` section; a full
training YAML needs ``--ignore-unknown``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import NMSparsityConfig
from .errors import NMSparsityError

EXIT_OK, EXIT_FAIL, EXIT_UNREADABLE = 0, 1, 2


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


# ---------------------------------------------------------------------------------- verify
def _verify(args: argparse.Namespace) -> int:
    from .hub import verify_checkpoint

    try:
        report = verify_checkpoint(args.path)
    except (NMSparsityError, OSError) as exc:
        reason = f"cannot read {args.path}: {_one_line(exc)}"
        if args.json:
            print(json.dumps({"ok": False, "error": reason}))
        print(f"nmsparse verify: {reason}", file=sys.stderr)
        return EXIT_UNREADABLE
    bad = [c.name for c in report.layers if not c.ok]
    if report.ok:
        reason = (
            f"OK: {len(report.layers)} layer blocks N:M-compliant, metadata matches the weights"
        )
    else:
        parts = []
        if bad:
            parts.append(
                f"{len(bad)} layer block(s) not N:M ({', '.join(bad[:3])}{' ...' * (len(bad) > 3)})"
            )
        if report.problems:
            parts.append(f"{len(report.problems)} metadata problem(s) ({report.problems[0]})")
        if not report.layers and not report.problems:
            parts.append("no layer to verify")
        reason = "FAIL: " + "; ".join(parts)
    if args.json:
        print(
            json.dumps(
                {
                    "ok": report.ok,
                    "reason": reason,
                    "layers": [
                        {
                            "name": c.name,
                            "location": c.location,
                            "pattern": list(c.pattern),
                            "shape": list(c.shape),
                            "sparsity": c.sparsity,
                            "violations": c.violations,
                            "max_nonzeros": c.max_nonzeros,
                            "ok": c.ok,
                        }
                        for c in report.layers
                    ],
                    "problems": report.problems,
                },
                indent=2,
            )
        )
    else:
        print(report)
        print(reason)
    if not report.ok and args.json:
        print(f"nmsparse verify: {reason}", file=sys.stderr)
    return EXIT_OK if report.ok else EXIT_FAIL


# ---------------------------------------------------------------------------------- schedule
def _recipe_keys() -> set[str]:
    """Keys a recipe config may carry besides the sparsity ones: the fields of the recipe's
    model, data and training arguments, and the seed's timm training keys."""
    import dataclasses

    from transformers import TrainingArguments

    from .data import DataArguments
    from .recipe import SEED_TIMM_KEYS, ModelArguments

    fields = {
        f.name
        for dc in (ModelArguments, DataArguments, TrainingArguments)
        for f in dataclasses.fields(dc)
    }
    return fields | SEED_TIMM_KEYS


def _load_config(path: str, ignore_unknown: bool) -> NMSparsityConfig:
    """A sparsity config from a YAML file: ours, a recipe config (its training keys are passed
    over), or a seed-style one; any other unknown key is an error unless ``ignore_unknown``."""
    try:
        config = NMSparsityConfig.from_yaml(path, ignore_unknown=True)
        unknown = sorted(set(config.extra) - _recipe_keys())
        if unknown and not ignore_unknown:
            try:  # raises, naming them with "did you mean" hints
                NMSparsityConfig.from_dict({k: config.extra[k] for k in unknown})
            except NMSparsityError as exc:
                raise NMSparsityError(f"{path}: {exc}") from None
        return config
    except NMSparsityError as exc:
        hint = (
            ""
            if ignore_unknown or "unknown" not in str(exc)
            else " (for a full training YAML, pass --ignore-unknown)"
        )
        raise NMSparsityError(f"{exc}{hint}") from None


def _pattern_text(pattern: tuple[int, int] | None) -> str:
    return "dense" if pattern is None else f"{pattern[0]}:{pattern[1]}"


def schedule_table(schedule, every: int | None = None) -> str:
    """The text table of `SparsitySchedule.table`: step, phase, alpha, the pattern of each location
    (``dense`` in the dense phase), and which boundary (phase or SDGF stage start) the step is."""
    events: dict[int, list[str]] = {}
    for name, step in schedule.boundaries().items():
        if step < schedule.total_steps and not (name == "dense" and schedule.sparse_start == 0):
            label = name if ":" in name else f"{name} starts"
            events.setdefault(step, []).append(label)
    locs = list(schedule.locations)
    rows = [("step", "phase", "alpha", *locs, "boundary")]
    for plan in schedule.table(every):
        rows.append(
            (
                str(plan.step),
                plan.phase,
                f"{plan.alpha:.4g}",
                *(_pattern_text(plan.patterns.get(loc)) for loc in locs),
                ", ".join(events.get(plan.step, [])),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def plot_schedule(schedule, path: str | Path) -> Path:
    """Write a PNG: alpha over steps, and each location's density (n/m) and group size m, with the
    dense and fine-tune phases shaded and SDGF stage starts marked. Needs matplotlib (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    total = schedule.total_steps
    steps = (
        set(range(total)) if total <= 5000 else {round(i * (total - 1) / 2000) for i in range(2001)}
    )
    for step in schedule.boundaries().values():
        steps |= {step - 1, step}
    steps = sorted(s for s in steps if 0 <= s < total)
    plans = [schedule.at(s) for s in steps]
    cfg = schedule.config
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True, constrained_layout=True)
    ax_alpha, ax_density, ax_m = axes
    ax_alpha.plot(steps, [p.alpha for p in plans], drawstyle="steps-post", color="black")
    ax_alpha.set_ylabel("alpha (pruned-weight\nfactor in forward)")
    ax_alpha.set_ylim(-0.05, 1.05)
    ax_alpha.set_title(
        f"{cfg.recipe_name}, total_steps={total}: "
        + ", ".join(f"{loc} {_pattern_text(cfg.target_pattern(loc))}" for loc in schedule.locations)
    )
    for i, loc in enumerate(schedule.locations):
        pats = [p.patterns.get(loc) for p in plans]
        density = [1.0 if q is None else q[0] / q[1] for q in pats]
        group = [1 if q is None else q[1] for q in pats]
        offset = (i - (len(schedule.locations) - 1) / 2) * 0.006
        style = {"drawstyle": "steps-post", "label": loc, "linewidth": 1.8, "alpha": 0.85}
        ax_density.plot(steps, [d + offset for d in density], **style)
        ax_m.plot(steps, [g * (1 + offset) for g in group], **style)
    ax_density.set_ylabel("density n/m\n(1 = dense)")
    ax_density.set_ylim(0, 1.08)
    ax_m.set_ylabel("group size m\n(1 = dense)")
    ax_m.set_yscale("log", base=2)
    ms = sorted({1} | {q[1] for p in plans for q in p.patterns.values()})
    ax_m.set_yticks(ms, [str(v) for v in ms])
    ax_m.minorticks_off()
    ax_m.set_xlabel("optimizer step")
    ax_density.legend(loc="upper right", title="location", fontsize=8)
    for ax in axes:
        if schedule.sparse_start > 0:
            ax.axvspan(0, schedule.sparse_start, color="0.85", label="_dense")
        if schedule.finetune_start < total:
            ax.axvspan(schedule.finetune_start, total, color="#cfe3f7", label="_finetune")
        for name, step in schedule.boundaries().items():
            if ":stage" in name:
                ax.axvline(step, color="0.5", linestyle=":", linewidth=0.8)
        ax.set_xlim(0, total)
        ax.grid(alpha=0.3)
    ymax = ax_alpha.get_ylim()[1]
    if schedule.sparse_start > 0:
        ax_alpha.text(schedule.sparse_start / 2, ymax * 0.9, "dense", ha="center", va="top")
    ax_alpha.text(
        (schedule.sparse_start + schedule.finetune_start) / 2,
        ymax * 0.9,
        "sparse",
        ha="center",
        va="top",
    )
    if schedule.finetune_start < total:
        ax_alpha.text(
            (schedule.finetune_start + total) / 2, ymax * 0.9, "fine-tune", ha="center", va="top"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _schedule(args: argparse.Namespace) -> int:
    from .schedule import SparsitySchedule

    try:
        config = _load_config(args.config, args.ignore_unknown)
        if args.every is not None and args.every < 1:
            raise NMSparsityError(f"--every = {args.every}: give a positive number of steps.")
        schedule = SparsitySchedule(config, args.total_steps)
    except NMSparsityError as exc:
        print(f"nmsparse schedule: {_one_line(exc)}", file=sys.stderr)
        return EXIT_UNREADABLE
    bounds = schedule.boundaries()
    print(
        f"{config.recipe_name}: "
        + ", ".join(
            f"{loc} {_pattern_text(config.target_pattern(loc))}" for loc in schedule.locations
        )
        + f", dim={config.sparse_dim}, total_steps={schedule.total_steps}, sparse phase "
        f"[{bounds['sparse']}, {bounds['finetune']}), fine-tune from {bounds['finetune']}"
    )
    print(schedule_table(schedule, args.every))
    if args.plot:
        try:
            written = plot_schedule(schedule, args.plot)
        except ImportError:
            print(
                "nmsparse schedule: --plot needs matplotlib: pip install matplotlib",
                file=sys.stderr,
            )
            return EXIT_UNREADABLE
        print(f"plot written to {written}")
    return EXIT_OK


# ---------------------------------------------------------------------------------- report
_FAMILIES = {
    "vit": ("ViTConfig", "ViTForImageClassification"),
    "swin": ("SwinConfig", "SwinForImageClassification"),
    "swinv2": ("Swinv2Config", "Swinv2ForImageClassification"),
}


def _report(args: argparse.Namespace) -> int:
    import torch
    import transformers

    from .sparsifier import NMSparsifier

    try:
        config = _load_config(args.config, args.ignore_unknown)
        config_cls, model_cls = (getattr(transformers, n) for n in _FAMILIES[args.model_type])
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            model = model_cls(config_cls())
        sparsifier = NMSparsifier(model, config, total_steps=args.total_steps)
    except NMSparsityError as exc:
        print(f"nmsparse report: {_one_line(exc)}", file=sys.stderr)
        return EXIT_UNREADABLE
    print(sparsifier.report())
    return EXIT_OK


# ---------------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``nmsparse`` command."""
    parser = argparse.ArgumentParser(
        prog="nmsparse", description="N:M sparsity tools (nmsparse_hf)."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    verify = sub.add_parser(
        "verify", help="check a saved sparse checkpoint is N:M as its metadata says"
    )
    verify.add_argument("path", help="checkpoint directory (config.json + safetensors)")
    verify.add_argument("--json", action="store_true", help="print the result as JSON")
    verify.set_defaults(func=_verify)

    schedule = sub.add_parser("schedule", help="print (and plot) the sparsity schedule of a config")
    schedule.add_argument(
        "config", help="YAML with the sparsity settings (ours or the seed's keys)"
    )
    schedule.add_argument(
        "--total-steps", type=int, required=True, help="optimizer steps of the run"
    )
    schedule.add_argument(
        "--every", type=int, default=None, help="also list every K-th step (default: total/20)"
    )
    schedule.add_argument("--plot", default=None, help="write a PNG of the schedule to this path")
    schedule.add_argument(
        "--ignore-unknown",
        action="store_true",
        help="ignore non-sparsity keys (full training YAML)",
    )
    schedule.set_defaults(func=_schedule)

    report = sub.add_parser("report", help="which layers of a model family the config makes sparse")
    report.add_argument("config", help="YAML with the sparsity settings")
    report.add_argument("--model-type", choices=sorted(_FAMILIES), required=True)
    report.add_argument("--total-steps", type=int, default=1000, help="run length (default 1000)")
    report.add_argument(
        "--ignore-unknown",
        action="store_true",
        help="ignore non-sparsity keys (full training YAML)",
    )
    report.set_defaults(func=_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``nmsparse`` with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
