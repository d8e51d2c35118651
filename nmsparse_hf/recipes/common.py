"""The run skeleton every recipe shares: the command-line entry (`recipe_cli`), the checks and
the output-directory lock before step 1 (`start_run`), and the end of a run (`save_and_finish`:
save the sparse model and its card, evaluate, verify, print and write the summary).

A recipe's ``main`` reads top to bottom::

    with start_run(recipe) as final_dir:      # checks, lock, settings printed, seeded
        ... data, model, trainer ...
        trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
        return save_and_finish(trainer, final_dir, card, start, notes)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import MISSING, fields
from enum import Enum
from typing import Any

from .arguments import RecipeArgs, RecipeConfigError, exit_setting_error, parse_args

LOCK_NAME = "nmsparse_run.lock"


# ------------------------------------------------------------------ entry point
def recipe_cli(recipe: str, main: Callable[[RecipeArgs], Any], argv: list[str] | None) -> None:
    """A recipe script's entry point: parse ``argv`` (default ``sys.argv[1:]``) for ``recipe``
    and run ``main``; a setting error is printed as one line on stderr with exit code 2 (no
    traceback), as the parser prints a bad flag."""
    from ..data import DataArgumentsError
    from ..errors import NMCheckpointError, NMSparsityConfigError, NMTargetError

    try:
        main(parse_args(argv, recipe))
    except (NMSparsityConfigError, NMTargetError, NMCheckpointError, DataArgumentsError) as exc:
        exit_setting_error(str(exc))


# ------------------------------------------------------------------ before step 1
@contextlib.contextmanager
def start_run(recipe: RecipeArgs) -> Iterator[str]:
    """Everything before the data is read, as a ``with`` block around the run; yields the
    final model's directory (``<output_dir>/final``).

    A training run refuses ``sparsity_type: dense`` (`refuse_dense`), takes the output
    directory's lock (`output_dir_lock`, released when the block ends, also on an error) and
    refuses to replace a finished model (`refuse_to_replace`). Then the settings are printed
    once and every RNG is seeded (`seed_everything`)."""
    args, script = recipe.training, recipe.script
    final_dir = os.path.join(args.output_dir, "final")
    with contextlib.ExitStack() as stack:
        if args.do_train:
            refuse_dense(args)
            stack.enter_context(output_dir_lock(args.output_dir, args))
            _on_main(args, refuse_to_replace, final_dir, script.overwrite_output_dir, recipe.notes)
        if args.process_index == 0:
            print(format_settings(recipe), flush=True)
        # Seed before the model is built: a from-scratch model takes its initial weights from
        # the global RNG, and the Trainer only seeds in its own __init__.
        seed_everything(args)
        yield final_dir


def seed_everything(args) -> None:
    """Seed every RNG from ``args.seed`` (fully deterministic kernels with
    ``args.full_determinism``). Call it before the model is built: a from-scratch model takes its
    initial weights from the global RNG, and the Trainer seeds only in its own ``__init__``."""
    from transformers import enable_full_determinism, set_seed

    if args.full_determinism:
        enable_full_determinism(args.seed)
    else:
        set_seed(args.seed)


def refuse_dense(args) -> None:
    """A recipe's product is a verified N:M-sparse checkpoint: ``sparsity_type: dense`` has
    none to export, so it is refused before step 1 rather than failing after training."""
    if args.sparsity_config().sparsity_type == "dense":
        raise RecipeConfigError(
            "sparsity_type=dense: a recipe trains and exports an N:M-sparse checkpoint, and a "
            "dense run has none (a seed-style config without sparsity_type is dense, as in the "
            "seed). Choose --sparsity_type structure_nm or srste, or train dense with a plain "
            "transformers Trainer."
        )


def refuse_to_replace(final_dir: str, overwrite: bool, notes: list[str] | None = None) -> str:
    """Refuse, before step 1, a run whose ``final/`` would replace a sparse model, unless
    ``overwrite`` (``--overwrite_output_dir``). Nothing is deleted here or later: the export
    replaces the old model only once the new one is written (`save_sparse_pretrained`).

    ``final/`` is looked at with `nmsparse_hf.export.checkpoint_state`: ``"finished"`` is
    refused; ``"incomplete"`` (a save killed part way) is not, the run carries on and saves
    anew, unless the folder holds a model claiming N:M sparsity in its ``config.json`` with no
    finish marker (saved by an earlier version, or copied in): that is refused as well, since
    nothing a user saved may be lost. Returns the state found."""
    from ..export import checkpoint_state

    state = checkpoint_state(final_dir)
    if state == "incomplete" and _claims_sparsity(final_dir):
        state = "finished (no finish marker)"
    if state.startswith("finished") and not overwrite:
        raise RecipeConfigError(
            f"output_dir: {final_dir} already holds a finished sparse model. Choose another "
            f"--output_dir, or pass --overwrite_output_dir true to replace it."
        )
    if notes is not None and state == "incomplete":
        notes.append(f"{final_dir} holds an incomplete save: the run saves anew")
    elif notes is not None and state.startswith("finished"):
        notes.append(
            f"{final_dir} is replaced once the new model is saved (--overwrite_output_dir)"
        )
    return state


def _claims_sparsity(final_dir: str) -> bool:
    try:
        with open(os.path.join(final_dir, "config.json"), encoding="utf-8") as fh:
            return "nm_sparsity" in json.load(fh)
    except (OSError, ValueError, TypeError):
        return False


def _on_main(args, check: Callable[..., Any], *check_args) -> None:
    """Run ``check`` on the main process only; under DDP/FSDP the other ranks wait for it and
    raise the same one-line error if it fails."""
    error = None
    if args.process_index == 0:
        try:
            check(*check_args)
        except RecipeConfigError as exc:
            error = str(exc)
    if args.world_size > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
    if error:
        raise RecipeConfigError(error)


# ------------------------------------------------------------------ one run per output_dir
def _holder(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as fh:
            holder = json.load(fh)
        return holder if isinstance(holder, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _is_stale(holder: dict[str, Any]) -> bool:
    """A lock whose run is gone: written on this host by a process that no longer exists."""
    pid = holder.get("pid")
    same_host = holder.get("host") == socket.gethostname()
    return same_host and isinstance(pid, int) and not _alive(pid)


def _describe(holder: dict[str, Any]) -> str:
    return (
        f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started "
        f"{holder.get('started', '?')}"
    )


def _try_lock(path: str, mine: dict[str, Any]) -> bool:
    """Create the lock file with ``mine`` in it, atomically and complete (written to a
    temporary file, then hard-linked into place); False if it exists."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(mine, fh)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def acquire_lock(output_dir: str) -> dict[str, Any]:
    """Take ``<output_dir>/nmsparse_run.lock`` for this process; returns what it holds (pid,
    host, start time). A lock left by a run that is gone (`_is_stale`) is taken over with a
    warning; a live one is a `RecipeConfigError` naming its holder."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_NAME)
    mine = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    for _ in range(3):  # a holder may release or go stale between the checks
        if _try_lock(path, mine):
            return mine
        holder = _holder(path)
        if holder is None:
            continue  # released meanwhile
        if not _is_stale(holder):
            raise RecipeConfigError(
                f"output_dir {output_dir} is in use by another run ({_describe(holder)}; lock "
                f"file {path}). Wait for it to end, choose another --output_dir, or delete the "
                f"lock file if that run is gone."
            )
        with contextlib.suppress(FileNotFoundError):  # only one taker wins the rename
            os.rename(path, f"{path}.stale.{os.getpid()}")
            os.unlink(f"{path}.stale.{os.getpid()}")
            print(
                f"warning: output_dir {output_dir}: taking over the lock of a run that is gone "
                f"({_describe(holder)}).",
                file=sys.stderr,
                flush=True,
            )
    raise RecipeConfigError(f"output_dir {output_dir}: could not take the lock file {path}.")


def release_lock(output_dir: str, mine: dict[str, Any]) -> None:
    """Remove the lock file if it still holds ``mine``."""
    path = os.path.join(output_dir, LOCK_NAME)
    if _holder(path) == mine:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


@contextlib.contextmanager
def output_dir_lock(output_dir: str, args=None) -> Iterator[None]:
    """One run per output directory: the main process holds ``<output_dir>/nmsparse_run.lock``
    (pid, host, start time) for the ``with`` block and releases it at the end, also on an
    error. Under DDP/FSDP only the main process takes it; the other ranks wait for the outcome
    and fail with the same line if the directory is in use."""
    held: list[dict[str, Any]] = []
    main = args is None or args.process_index == 0
    if args is None:
        held.append(acquire_lock(output_dir))
    else:
        _on_main(args, lambda: held.append(acquire_lock(output_dir)))
    try:
        yield
    finally:
        if main and held:
            release_lock(output_dir, held[0])


# ------------------------------------------------------------------ the end of a run
def save_and_finish(
    trainer,
    final_dir: str,
    card: dict[str, Any],
    start: float,
    notes: list[str],
    add_metrics: Callable[[dict[str, float]], dict[str, float]] | None = None,
) -> dict[str, Any]:
    """After ``trainer.train()``: check that the ranks agree, save the sparse model (before any
    evaluation, so an evaluation failure never costs the run) and its card, evaluate when the
    trainer has evaluation data and ``do_eval``, rewrite the card with the results, verify and
    print the summary (`finish_run`). ``add_metrics`` derives further metrics (perplexity) from
    the evaluation's. Returns the summary (empty on processes other than the main one)."""
    args = trainer.args
    distributed = check_ranks_agree(trainer)
    trainer.save_model(final_dir)  # replaces an old final/ only once the new one is written
    trainer.create_model_card(**card)
    metrics = trainer.evaluate() if args.do_eval and trainer.eval_dataset is not None else {}
    if metrics and add_metrics is not None:
        extra = add_metrics(metrics)
        metrics = {**metrics, **extra}
        for entry in reversed(trainer.state.log_history):  # the card reads its results there
            if "eval_loss" in entry:
                entry.update(extra)
                break
    if metrics:
        trainer.create_model_card(**card)  # now with the final evaluation
    return finish_run(trainer, metrics, final_dir, time.time() - start, notes, distributed)


def text_card_fields(model_args, data_args, output_dir: str) -> dict[str, Any]:
    """The model card's fields of a text recipe: title (the output directory's name), base
    model, and the dataset (Hub id and configuration, else the training file's name)."""
    if data_args.dataset_name:
        dataset = " ".join(filter(None, [data_args.dataset_name, data_args.dataset_config_name]))
        tags = [data_args.dataset_name]
    else:
        dataset, tags = os.path.basename(data_args.train_file or "local files"), None
    return dict(
        model_name=os.path.basename(os.path.abspath(output_dir)),
        finetuned_from=model_args.model_name_or_path,
        dataset=dataset,
        dataset_tags=tags,
    )


def evaluate_only(trainer, notes: list[str], add_metrics=None) -> dict[str, Any]:
    """``--do_eval`` without training: evaluate the model as given (``add_metrics`` derives
    further metrics from the results), print the results, write nothing. Returns
    ``{"eval", "notes", "steps": 0}``."""
    metrics = trainer.evaluate()
    metrics = {**metrics, **(add_metrics(metrics) if add_metrics else {})}
    summary = {"eval": numbers(metrics), "notes": notes, "steps": 0}
    if trainer.args.should_save:
        print("eval: " + "  ".join(f"{k}={v}" for k, v in summary["eval"].items()), flush=True)
    trainer.accelerator.end_training()
    return summary


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


def finish_run(trainer, metrics, final_dir, seconds, notes, distributed):
    """Verify the saved model, print and write the summary (with the distributed mode that
    really ran, `integrations.distributed.distributed_mode`); tear the process group down.
    Returns the summary (empty on processes other than the main one)."""
    from ..export import verify_checkpoint
    from ..integrations.distributed import distributed_mode

    mode = distributed_mode(trainer)
    if mode["note"]:
        notes.append(mode["note"])

    summary: dict[str, Any] = {}
    report = None
    if trainer.args.should_save:
        report = verify_checkpoint(final_dir)
        summary = summarize(trainer, metrics, final_dir, report, seconds, notes)
        summary["distributed"] = distributed
        summary["distributed_mode"] = mode["mode"]
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
    dist = s["distributed"]
    mode = s.get("distributed_mode")
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
        f"processes: {dist['world_size']} ({f'{mode}, ' if mode else ''}{dist['wrapper']}"
        + (", weights identical on every rank" if dist.get("ranks_agree") else "")
        + ")",
        f"checkpoint: {s['checkpoint']}",
        f"check again with: nmsparse verify {s['checkpoint']}",
    ]
    rows += [f"note: {n}" for n in s.get("notes", [])]
    rows.append(line)
    return "\n".join(rows)


# ------------------------------------------------------------------ what the run prints
_TRAINING_SHOWN = (
    "output_dir",
    "do_train",
    "do_eval",
    "max_steps",
    "num_train_epochs",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "max_grad_norm",
    "seed",
    "bf16",
    "fp16",
    "use_cpu",
    "eval_strategy",
    "save_strategy",
    "resume_from_checkpoint",
)


def format_settings(recipe: RecipeArgs) -> str:
    """The run's settings, printed once at start: model and data settings that differ from the
    argument classes' defaults, the sparsity recipe, the main training settings, and notes."""
    model_args, data_args, args, script, notes = recipe
    cfg = args.sparsity_config()
    patterns = ", ".join(
        f"{loc} {n}:{m}" for loc in cfg.locations for n, m in [cfg.target_pattern(loc)]
    )
    rows = [
        f"nmsparse_hf recipe | config: {script.config or 'none (flags only)'}",
        f"  model: {model_args.model_name_or_path or model_args.model_config}"
        + "".join(f", {kv}" for kv in [_changed(model_args)] if kv),
        "  data: " + (_changed(data_args) or "the defaults (the embedded data)"),
        f"  sparsity: {cfg.recipe_name}, {patterns} (dim={cfg.sparse_dim}), dense "
        f"{cfg.dense_fraction:g} / fine-tune {cfg.finetune_fraction:g} of the steps",
        "  training: " + ", ".join(f"{k}={_plain(getattr(args, k))}" for k in _TRAINING_SHOWN),
    ]
    rows += [f"  note: {n}" for n in notes]
    return "\n".join(rows)


def _changed(obj) -> str:
    """``name=value`` for the fields of a dataclass that differ from their defaults (the model's
    name is shown apart, a token never)."""
    out = []
    for f in fields(obj):
        value = getattr(obj, f.name)
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if value != default and f.name not in ("model_name_or_path", "model_config"):
            out.append(f"{f.name}={'***' if f.name == 'token' else _plain(value)}")
    return ", ".join(out)


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value
