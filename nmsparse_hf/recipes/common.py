"""What every recipe does the same way: seed before the model exists, refuse to replace a finished
model, check that data-parallel ranks agree, verify the saved model and print the summary."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from .arguments import RecipeConfigError


def seed_everything(args) -> None:
    """Seed every RNG from ``args.seed`` (fully deterministic kernels with
    ``args.full_determinism``). Call it before the model is built: a from-scratch model takes its
    initial weights from the global RNG, and the Trainer seeds only in its own ``__init__``."""
    from transformers import enable_full_determinism, set_seed

    if args.full_determinism:
        enable_full_determinism(args.seed)
    else:
        set_seed(args.seed)


def refuse_to_replace(final_dir: str, overwrite: bool) -> None:
    """Refuse, before step 1, a run whose ``final/`` would replace a finished sparse model,
    unless ``overwrite`` (``--overwrite_output_dir``)."""
    config = os.path.join(final_dir, "config.json")
    try:
        with open(config, encoding="utf-8") as fh:
            finished = "nm_sparsity" in json.load(fh)
    except (OSError, ValueError, TypeError):
        finished = False
    if finished and not overwrite:
        raise RecipeConfigError(
            f"output_dir: {final_dir} already holds a finished sparse model. Choose another "
            f"--output_dir, or pass --overwrite_output_dir true to replace it."
        )


def check_ranks_agree(trainer) -> dict[str, Any]:
    """With several data-parallel processes, every rank must end with the same sparse weights
    (same masks from the same weights): compare a digest of them across ranks, fail loudly if not.
    Returns how the run was distributed (for the summary)."""
    import hashlib

    import torch.distributed as dist

    info = {
        "world_size": trainer.args.world_size,
        "wrapper": type(trainer.model_wrapped).__name__,
        "backend": getattr(trainer.accelerator.state, "backend", None),
    }
    if info["world_size"] < 2 or trainer.is_fsdp_enabled:  # FSDP ranks hold different shards
        return info
    digest = hashlib.sha256()
    modules = dict(trainer.model.named_modules())
    for name in sorted(trainer.sparsifier.layers):
        weight = modules[name].weight.detach().cpu().contiguous()
        digest.update(weight.numpy().tobytes())
    digests: list[str] = [""] * info["world_size"]
    dist.all_gather_object(digests, digest.hexdigest())
    if len(set(digests)) != 1:
        raise RuntimeError(
            f"the ranks ended with different sparse weights ({len(set(digests))} distinct "
            f"digests): masks diverged across processes. Please report this with your launch "
            f"configuration."
        )
    info["ranks_agree"] = True
    return info


def finish_run(trainer, metrics, final_dir, seconds, notes, distributed) -> dict[str, Any]:
    """Verify the saved model, print and write the summary; tear the process group down."""
    from ..export import verify_checkpoint

    summary: dict[str, Any] = {}
    report = None
    if trainer.args.should_save:
        report = verify_checkpoint(final_dir)
        summary = summarize(trainer, metrics, final_dir, report, seconds, notes)
        summary["distributed"] = distributed
        print(format_summary(summary), flush=True)
    # No collective runs after this point. Tear the process group down on every rank before
    # returning: a gloo group left to interpreter shutdown can abort the process ("terminate
    # called without an active exception", pytorch/pytorch#190489). Also closes trackers.
    trainer.accelerator.end_training()
    if report is not None:
        report.raise_if_failed()
        with open(os.path.join(final_dir, "nmsparse_summary.json"), "w") as fh:
            json.dump(summary, fh, indent=2)
    return summary


def numbers(metrics) -> dict[str, float]:
    """The finite numeric metrics, rounded for the summary."""
    return {
        k: round(float(v), 4)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not math.isnan(v)
    }


def summarize(trainer, metrics, final_dir, report, seconds, notes) -> dict[str, Any]:
    """The summary of a finished run (what `format_summary` prints and the run writes as JSON)."""
    cfg = trainer.sparsity_config
    from ..export import load_sparse_metadata

    meta = load_sparse_metadata(final_dir)
    by_loc: dict[str, list[float]] = {}
    for check in report.layers:
        by_loc.setdefault(check.location, []).append(check.sparsity)
    return {
        "recipe": cfg.recipe_name,
        "pattern": {loc: "{}:{}".format(*cfg.target_pattern(loc)) for loc in sorted(by_loc)},
        "sparse_dim": cfg.sparse_dim,
        "steps": trainer.state.global_step,
        "steps_now": getattr(trainer, "steps_this_run", trainer.state.global_step),
        "seconds": round(seconds, 1),
        "eval": numbers(metrics),
        "sparsity_by_location": {k: round(sum(v) / len(v), 4) for k, v in by_loc.items()},
        "achieved_sparsity": round(meta.achieved_sparsity, 4),
        "layers_verified": f"{sum(c.ok for c in report.layers)}/{len(report.layers)}",
        "verified": report.ok,
        "checkpoint": os.path.abspath(final_dir),
        "notes": notes,
    }


def format_summary(s: dict[str, Any]) -> str:
    """The one-screen summary printed at the end of a recipe."""
    line = "=" * 72
    evals = "  ".join(
        f"{k.removeprefix('eval_')}={v}"
        for k, v in s["eval"].items()
        if not k.endswith(("runtime", "per_second")) and k != "epoch"
    )
    rows = [
        line,
        f"nmsparse_hf | {s['recipe']} | {', '.join(f'{k} {v}' for k, v in s['pattern'].items())}"
        f" kept (dim={s['sparse_dim']})",
        f"trained {s.get('steps_now', s['steps'])} optimizer steps now ({s['steps']} in all) "
        f"in {s['seconds']} s",
        f"eval: {evals or 'not run (--do_eval false)'}",
        "sparsity by location: "
        + ", ".join(f"{k} {v:.1%}" for k, v in s["sparsity_by_location"].items())
        + f" | targeted weights: {s['achieved_sparsity']:.1%} zero",
        f"verified N:M: {'PASS' if s['verified'] else 'FAIL'} ({s['layers_verified']} layers)",
        f"processes: {s['distributed']['world_size']} ({s['distributed']['wrapper']}"
        + (", weights identical on every rank" if s["distributed"].get("ranks_agree") else "")
        + ")",
        f"checkpoint: {s['checkpoint']}",
        f"check again with: nmsparse verify {s['checkpoint']}",
    ]
    rows += [f"note: {n}" for n in s.get("notes", [])]
    rows.append(line)
    return "\n".join(rows)
