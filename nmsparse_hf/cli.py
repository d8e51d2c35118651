"""The ``nmsparse`` console script.

    nmsparse --version
    nmsparse verify CHECKPOINT [--json]
        Check a saved sparse checkpoint against its nm_sparsity metadata (reads JSON and
        safetensors only).
    nmsparse push CHECKPOINT REPO_ID [--token T] [--private] [--revision R]
                  [--commit-message M] [--create-pr]
        Verify the checkpoint, then upload it to the Hugging Face Hub (`push_sparse_to_hub`).
    nmsparse export CHECKPOINT OUT [--overwrite]
        Bake a Trainer checkpoint-N (dense master weights) into the sparse model of step N: the
        target masks of the run's recorded sparsity config applied, verified, with its card
        (`export_checkpoint`).
    nmsparse schedule CONFIG --total-steps N [--every K] [--plot out.png] [--ignore-unknown]
        Print the schedule (phase, alpha and each location's pattern) at every phase/stage
        boundary and every K steps (default: N/20), row by row as it is computed; optionally plot.
    nmsparse report CONFIG [--model-type vit|swin|swinv2] [--total-steps N] [--ignore-unknown]
        Build the model the config describes (``model_config`` / ``config_overrides`` /
        ``model_name_or_path`` of a recipe config; the family's default-size model with
        ``--model-type`` when the config names none) on the meta device (no weights, no memory) and
        list which layers the config makes sparse, with their patterns, and which it skips.
    nmsparse prune MODEL OUT --method magnitude|wanda|sparsegpt [--calibration-file FILE]
                   [--n-keep N --m M --sparsity-loc LOCS | --config YAML]
                   [--calibration-samples K] [--max-length L] [--batch-size B] [--device D]
        One-shot N:M pruning of a pretrained model and its tokenizer (`one_shot`), saved as a
        verified sparse checkpoint (`save_sparse_pretrained`).

CONFIG is a YAML file with our keys or the seed's, flat or under a ``sparsity:`` section; a recipe
config's training keys are passed over; other unknown keys are an error unless
``--ignore-unknown``. Every multi-word option takes both spellings (``--total-steps`` and
``--total_steps``).

Exit status: 0 success; 1 the checkpoint does not verify; 2 the input cannot be read or is
invalid (a one-line message on stderr says why).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .config import NMSparsityConfig
from .errors import NMSparsityError

EXIT_OK, EXIT_FAIL, EXIT_UNREADABLE = 0, 1, 2


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


# ---------------------------------------------------------------------------------- verify
def _verify(args: argparse.Namespace) -> int:
    from .export import NMIncompleteCheckpointError, verify_checkpoint

    try:
        report = verify_checkpoint(args.path)
    except (NMSparsityError, OSError) as exc:
        incomplete = isinstance(exc, NMIncompleteCheckpointError)  # an interrupted save
        reason = _one_line(exc) if incomplete else f"cannot read {args.path}: {_one_line(exc)}"
        if args.json:
            state = {"state": "incomplete"} if incomplete else {}
            print(json.dumps({"ok": False, "error": reason, **state}))
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
                            "negative_zeros": c.negative_zeros,
                            "ok": c.ok,
                        }
                        for c in report.layers
                    ],
                    "problems": report.problems,
                    "warnings": report.warnings(),
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
def _argument_keys() -> set[str]:
    """The fields of the recipes' model, data, training and sparsity arguments."""
    import dataclasses

    from .recipes.arguments import recipe_keys

    return recipe_keys() | {f.name for f in dataclasses.fields(NMSparsityConfig)}


def _recipe_keys() -> set[str]:
    """Keys a recipe config may carry besides the sparsity ones: the fields of the recipe's
    model, data and training arguments, and the seed's timm training keys."""
    from .recipes.seed import SEED_TIMM_KEYS

    return _argument_keys() | SEED_TIMM_KEYS


def _load_config(path: str, ignore_unknown: bool) -> NMSparsityConfig:
    """The sparsity config a recipe would run from the config file at ``path``: the recipes' one
    reading of config files (`recipes.arguments.config_file_settings`, which tells and translates
    the seed's timm dialect), then its sparsity settings. Training keys are passed over; any other
    unknown key is an error unless ``ignore_unknown``."""
    from .recipes.arguments import config_file_settings

    settings, _, _ = config_file_settings(path)
    sparsity, rest = NMSparsityConfig.split_known_keys(settings)
    unknown = sorted(str(key) for key in set(rest) - _recipe_keys())
    if unknown and not ignore_unknown:
        try:  # raises, naming them with "did you mean" hints
            NMSparsityConfig.from_dict({key: rest[key] for key in unknown})
        except NMSparsityError as exc:
            raise NMSparsityError(
                f"{path}: {exc} (for a full training YAML, pass --ignore-unknown)"
            ) from None
    try:
        return NMSparsityConfig.from_dict(sparsity)
    except NMSparsityError as exc:
        raise NMSparsityError(f"{path}: {exc}") from None


def _pattern_text(pattern: tuple[int, int] | None) -> str:
    return "dense" if pattern is None else f"{pattern[0]}:{pattern[1]}"


def _boundary_labels(schedule) -> dict[int, list[str]]:
    """Step -> the boundaries (phase or SDGF stage starts) that fall on it."""
    events: dict[int, list[str]] = {}
    for name, step in schedule.boundaries().items():
        if step < schedule.total_steps and not (name == "dense" and schedule.sparse_start == 0):
            label = name if ":" in name else f"{name} starts"
            events.setdefault(step, []).append(label)
    return events


def schedule_lines(schedule, every: int | None = None) -> Iterator[str]:
    """The schedule as text lines, one row per step of `SparsitySchedule.table` (every ``every``-th
    step, each boundary and the last step): step, phase, alpha, the pattern of each location
    (``dense`` in the dense phase), and which boundary the step is. A generator with fixed column
    widths, so the rows stream: a table of 10^9 steps is never held in memory."""
    events = _boundary_labels(schedule)
    locs = list(schedule.locations)
    widths = [len(str(schedule.total_steps - 1)), len("finetune"), len("0.0000")]
    for loc in locs:
        texts = [_pattern_text(p) for p in schedule.stages[loc]] + ["dense"]
        widths.append(max(len(t) for t in texts))
    header = ("step", "phase", "alpha", *locs, "boundary")
    widths = [max(w, len(h)) for w, h in zip(widths, header, strict=False)] + [0]

    def line(values) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()

    yield line(header)
    for plan in schedule.table(every):
        yield line(
            (
                str(plan.step),
                plan.phase,
                f"{plan.alpha:.4g}",
                *(_pattern_text(plan.patterns.get(loc)) for loc in locs),
                ", ".join(events.get(plan.step, [])),
            )
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
    if config.sparsity_type == "dense":
        print(
            "dense: sparsity_type is dense (a seed-style file that omits sparsity_type is a "
            "dense run), so no layer is masked at any step; set sparsity_type (structure_nm, "
            "srste) for a sparse run."
        )
        return EXIT_OK
    bounds = schedule.boundaries()
    print(
        f"{config.recipe_name}: "
        + ", ".join(
            f"{loc} {_pattern_text(config.target_pattern(loc))}" for loc in schedule.locations
        )
        + f", dim={config.sparse_dim}, total_steps={schedule.total_steps}, sparse phase "
        f"[{bounds['sparse']}, {bounds['finetune']}), fine-tune from {bounds['finetune']}"
    )
    for text in schedule_lines(schedule, args.every):
        print(text)
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


_MODEL_KEYS = ("model_name_or_path", "model_config", "config_overrides", "num_labels")


def _named_model(path: str) -> dict[str, Any]:
    """The model keys a config file names (a seed-style YAML's timm ``model`` translated, by
    the recipes' one reader of config files)."""
    from .recipes.arguments import config_file_settings

    data, _, _ = config_file_settings(path)
    return {key: data[key] for key in _MODEL_KEYS if data.get(key) is not None}


# the model classes a recipe builds from a pretrained config, tried in this order
_AUTO_CLASSES = (
    "AutoModelForImageClassification",
    "AutoModelForSeq2SeqLM",
    "AutoModelForSequenceClassification",
    "AutoModelForCausalLM",
    "AutoModel",
)


def _model_from_config(config) -> Any:
    """The model of ``config`` (no weights): the first auto class that knows its model type."""
    import transformers

    for name in _AUTO_CLASSES:
        try:
            return getattr(transformers, name).from_config(config)
        except ValueError:  # this auto class has no mapping for the config's model type
            continue
    raise NMSparsityError(f"no transformers model class builds a {config.model_type!r} config.")


def _build_report_model(path: str, model_type: str | None) -> tuple[Any, str]:
    """(model on the meta device, what it is): the model the config names, else the default-size
    model of ``model_type``."""
    import torch
    import transformers

    from .recipes.models import ModelArguments, build_model, parse_overrides

    named = _named_model(path)
    num_labels = int(named.pop("num_labels", 1000))
    overrides = named.get("config_overrides")
    with torch.device("meta"):  # shapes only: no memory, no initialisation, no weights read
        if named.get("model_name_or_path"):
            source = named["model_name_or_path"]
            config = transformers.AutoConfig.from_pretrained(source, **parse_overrides(overrides))
            config.num_labels = num_labels
            return _model_from_config(config), f"{source} (its config.json; no weights read)"
        if named.get("model_config"):
            model = build_model(ModelArguments(**named), "", None, num_labels).model
            extra = f", {overrides}" if overrides else ""
            return model, f"model_config={named['model_config']}{extra}"
        if model_type is None:
            raise NMSparsityError(
                f"{path} names no model (model_config or model_name_or_path): pass --model-type "
                f"{'|'.join(sorted(_FAMILIES))} to report on that family's default-size model."
            )
        config_cls, model_cls = (getattr(transformers, n) for n in _FAMILIES[model_type])
        return model_cls(config_cls()), f"{model_type} default size ({config_cls.__name__}())"


def _report(args: argparse.Namespace) -> int:
    from .sparsifier import NMSparsifier

    try:
        config = _load_config(args.config, args.ignore_unknown)
        model, description = _build_report_model(args.config, args.model_type)
        sparsifier = NMSparsifier(model, config, total_steps=args.total_steps)
    except (ValueError, OSError) as exc:  # ours (NMSparsityError) and transformers' config errors
        print(f"nmsparse report: {_one_line(exc)}", file=sys.stderr)
        return EXIT_UNREADABLE
    print(f"model: {description}")
    print(sparsifier.report())
    return EXIT_OK


# ---------------------------------------------------------------------------------- push
def _push(args: argparse.Namespace) -> int:
    from .errors import NMVerificationError
    from .export import push_sparse_to_hub

    try:
        commit = push_sparse_to_hub(
            args.path,
            args.repo_id,
            token=args.token,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
            create_pr=args.create_pr,
        )
    except NMVerificationError as exc:
        print(
            f"nmsparse push: not pushed, {args.path} does not verify: {_one_line(exc)}",
            file=sys.stderr,
        )
        return EXIT_FAIL
    except (NMSparsityError, OSError) as exc:
        print(f"nmsparse push: cannot push {args.path}: {_one_line(exc)}", file=sys.stderr)
        return EXIT_UNREADABLE
    except Exception as exc:  # the Hub's own errors (authentication, network, repo id)
        print(f"nmsparse push: upload to {args.repo_id} failed: {_one_line(exc)}", file=sys.stderr)
        return EXIT_UNREADABLE
    url = getattr(commit, "commit_url", None) or getattr(commit, "pr_url", None) or commit
    print(f"pushed {args.path} to {args.repo_id}: {url}")
    return EXIT_OK


# ---------------------------------------------------------------------------------- export
def _export(args: argparse.Namespace) -> int:
    from .errors import NMVerificationError
    from .integrations.snapshot import export_checkpoint

    try:
        out = export_checkpoint(args.checkpoint, args.output_dir, overwrite=args.overwrite)
    except NMVerificationError as exc:
        print(f"nmsparse export: not exported: {_one_line(exc)}", file=sys.stderr)
        return EXIT_FAIL
    except (NMSparsityError, OSError) as exc:
        print(f"nmsparse export: {_one_line(exc)}", file=sys.stderr)
        return EXIT_UNREADABLE
    print(f"exported the sparse model of {args.checkpoint} to {out} (verified)")
    return EXIT_OK


# ---------------------------------------------------------------------------------- prune
def _calibration_texts(path: str, limit: int) -> list[str]:
    """The first ``limit`` samples of a calibration file: JSON lines with a ``text`` field
    (``.jsonl``/``.json``), else plain text with one sample per line; empty lines are skipped."""
    file = Path(path)
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise NMSparsityError(
            f"--calibration-file {path}: cannot read it as text ({exc})."
        ) from None
    as_json = file.suffix in (".jsonl", ".json")
    texts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if as_json:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise NMSparsityError(f"{path}:{number}: not a JSON line ({exc.msg}).") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise NMSparsityError(
                    f"{path}:{number}: a JSON line needs a string 'text' field (one sample per "
                    f"line)."
                )
            line = record["text"]
        texts.append(line)
        if len(texts) == limit:
            break
    if not texts:
        raise NMSparsityError(f"--calibration-file {path}: holds no text sample.")
    return texts


def _prune_config(args: argparse.Namespace) -> NMSparsityConfig:
    """The config of ``--config`` (if any) with the pattern flags given on the command line."""
    data = _load_config(args.config, args.ignore_unknown).to_dict() if args.config else {}
    flags = {
        "n_keep": args.n_keep,
        "m": args.m,
        "n_keep_qkv": args.n_keep_qkv,
        "m_qkv": args.m_qkv,
        "locations": args.sparsity_loc,
        "sparse_dim": args.sparse_dim,
    }
    data.update({key: value for key, value in flags.items() if value is not None})
    return NMSparsityConfig.from_dict(data)


def _load_pretrained(path: str, device: str | None) -> tuple[Any, Any]:
    """(model, tokenizer) of a local directory or Hub id: the model class from the config's
    ``architectures`` (causal LM, sequence classification, else the named class, else
    ``AutoModel``)."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    arch = (config.architectures or [""])[0]
    if arch.endswith("ForCausalLM"):
        cls = transformers.AutoModelForCausalLM
    elif arch.endswith("ForSequenceClassification"):
        cls = transformers.AutoModelForSequenceClassification
    else:
        cls = getattr(transformers, arch, None) or transformers.AutoModel
    model = cls.from_pretrained(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return model, tokenizer


def _calibration_batches(model, tokenizer, texts: list[str], max_length: int, batch_size: int):
    """Tokenized calibration batches with the inputs ``model.forward`` names (an
    encoder-decoder's decoder reads the same tokens)."""
    import inspect

    if batch_size > 1 and tokenizer.pad_token is None:
        raise NMSparsityError(
            f"--batch-size {batch_size}: the tokenizer has no pad token to pad a batch with. "
            f"Use --batch-size 1."
        )
    accepted = set(inspect.signature(model.forward).parameters)
    batches = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        encoded = tokenizer(
            chunk, return_tensors="pt", truncation=True, max_length=max_length, padding=True
        )
        batch = {k: v for k, v in encoded.items() if k in accepted}
        if getattr(model.config, "is_encoder_decoder", False):
            batch["decoder_input_ids"] = batch["input_ids"]
            batch["decoder_attention_mask"] = batch["attention_mask"]
        if batch["input_ids"].shape[-1]:
            batches.append(batch)
    return batches


def _check_output_dir(path: str, overwrite: bool) -> None:
    """Refuse, before any work, an output that save_sparse_pretrained would refuse."""
    from .export.metadata import MANIFEST

    folder = Path(path)
    if folder.is_file():
        raise NMSparsityError(f"OUT = {path!r} is a file. Pass a directory.")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / MANIFEST).is_file():
        if not overwrite:
            raise NMSparsityError(
                f"OUT = {path!r} holds files not written by nmsparse_hf. Choose an empty "
                f"directory, or pass --overwrite."
            )


def _prune(args: argparse.Namespace) -> int:
    from .errors import NMVerificationError
    from .export import save_sparse_pretrained
    from .one_shot import finalized_sparsifier, one_shot

    try:
        config = _prune_config(args)
        _check_output_dir(args.output_dir, args.overwrite)
        if args.calibration_samples < 1 or args.max_length < 1 or args.batch_size < 1:
            raise NMSparsityError(
                "--calibration-samples, --max-length and --batch-size must be at least 1."
            )
        texts = None
        if args.calibration_file:
            texts = _calibration_texts(args.calibration_file, args.calibration_samples)
        model, tokenizer = _load_pretrained(args.model, args.device)
        calibration = None
        if texts is not None:
            calibration = _calibration_batches(
                model, tokenizer, texts, args.max_length, args.batch_size
            )
        report = one_shot(model, config, args.method, calibration)
    except (ValueError, OSError) as exc:  # ours (NMSparsityError) and transformers' load errors
        print(f"nmsparse prune: {_one_line(exc)}", file=sys.stderr)
        return EXIT_UNREADABLE
    print(report)
    sparsifier = finalized_sparsifier(model, config)
    try:
        save_sparse_pretrained(
            model,
            sparsifier,
            args.output_dir,
            processing_class=tokenizer,
            overwrite=args.overwrite,
            card={"base_model": args.model},
        )
    except NMVerificationError as exc:
        print(f"nmsparse prune: the output does not verify: {_one_line(exc)}", file=sys.stderr)
        return EXIT_FAIL
    except (NMSparsityError, OSError) as exc:
        print(
            f"nmsparse prune: cannot save to {args.output_dir}: {_one_line(exc)}", file=sys.stderr
        )
        return EXIT_UNREADABLE
    finally:
        sparsifier.detach()
    print(f"saved a verified {args.method} one-shot N:M checkpoint to {args.output_dir}")
    return EXIT_OK


# ---------------------------------------------------------------------------------- entry point
def _option(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """Add ``--a-b`` with its ``--a_b`` spelling too (multi-word options take both)."""
    flags = [f"--{name}"] + ([f"--{name.replace('-', '_')}"] if "-" in name else [])
    parser.add_argument(*flags, **kwargs)


def _ignore_unknown(parser: argparse.ArgumentParser) -> None:
    _option(
        parser,
        "ignore-unknown",
        action="store_true",
        help="ignore non-sparsity keys (full training YAML)",
    )


def _add_verify(sub) -> None:
    verify = sub.add_parser(
        "verify", help="check a saved sparse checkpoint is N:M as its metadata says"
    )
    verify.add_argument("path", help="checkpoint directory (config.json + safetensors)")
    verify.add_argument("--json", action="store_true", help="print the result as JSON")
    verify.set_defaults(func=_verify)


def _add_push(sub) -> None:
    push = sub.add_parser("push", help="verify a sparse checkpoint, then upload it to the Hub")
    push.add_argument("path", help="checkpoint directory written by save_sparse_pretrained")
    push.add_argument("repo_id", help="Hub model repo, e.g. user/vit-b16-1of8")
    _option(push, "token", default=None, help="Hub token (default: the logged-in one)")
    _option(push, "private", action="store_true", default=None, help="create the repo private")
    _option(push, "revision", default=None, help="branch to push to")
    _option(push, "commit-message", default=None, help="commit message of the upload")
    _option(push, "create-pr", action="store_true", help="open a pull request instead of pushing")
    push.set_defaults(func=_push)


def _add_export(sub) -> None:
    export = sub.add_parser(
        "export", help="write the verified sparse model of a Trainer checkpoint-N"
    )
    export.add_argument("checkpoint", help="checkpoint-N folder written by NMSparseTrainer")
    export.add_argument("output_dir", metavar="OUT", help="directory of the sparse model")
    _option(export, "overwrite", action="store_true", help="write into a non-empty OUT")
    export.set_defaults(func=_export)


def _add_schedule(sub) -> None:
    schedule = sub.add_parser("schedule", help="print (and plot) the sparsity schedule of a config")
    schedule.add_argument(
        "config", help="YAML with the sparsity settings (ours or the seed's keys)"
    )
    _option(schedule, "total-steps", type=int, required=True, help="optimizer steps of the run")
    _option(
        schedule,
        "every",
        type=int,
        default=None,
        help="also list every K-th step (default: total/20)",
    )
    _option(schedule, "plot", default=None, help="write a PNG of the schedule to this path")
    _ignore_unknown(schedule)
    schedule.set_defaults(func=_schedule)


def _add_report(sub) -> None:
    report = sub.add_parser("report", help="which layers of a model the config makes sparse")
    report.add_argument(
        "config", help="YAML with the sparsity settings (a recipe config names its model)"
    )
    _option(
        report,
        "model-type",
        choices=sorted(_FAMILIES),
        default=None,
        help="default-size model of this family, for a config that names no model",
    )
    _option(report, "total-steps", type=int, default=1000, help="run length (default 1000)")
    _ignore_unknown(report)
    report.set_defaults(func=_report)


def _add_prune(sub) -> None:
    prune = sub.add_parser(
        "prune", help="one-shot N:M pruning of a pretrained model (magnitude, Wanda, SparseGPT)"
    )
    prune.add_argument("model", help="pretrained model: a local directory or a Hub id")
    prune.add_argument("output_dir", metavar="OUT", help="directory of the sparse checkpoint")
    _option(prune, "method", choices=["magnitude", "wanda", "sparsegpt"], default="magnitude")
    _option(
        prune,
        "calibration-file",
        default=None,
        help="calibration text: one sample per line, or JSON lines with a 'text' field (.jsonl)",
    )
    _option(prune, "calibration-samples", type=int, default=128, help="samples used (default 128)")
    _option(prune, "max-length", type=int, default=512, help="tokens per sample (default 512)")
    _option(prune, "batch-size", type=int, default=1, help="samples per forward (default 1)")
    _option(prune, "config", default=None, help="YAML with the sparsity settings")
    _option(prune, "n-keep", type=int, default=None, help="N kept in each group (FF, O)")
    _option(prune, "m", type=int, default=None, help="group length M (FF, O)")
    _option(prune, "n-keep-qkv", type=int, default=None, help="N for Q, K, V")
    _option(prune, "m-qkv", type=int, default=None, help="M for Q, K, V")
    _option(prune, "sparsity-loc", default=None, help="sparse locations, e.g. FF,QKV,O")
    _option(prune, "sparse-dim", default=None, help="row (default)")
    _option(prune, "device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if any)")
    _option(prune, "overwrite", action="store_true", help="write into a non-empty OUT")
    _ignore_unknown(prune)
    prune.set_defaults(func=_prune)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``nmsparse`` command."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="nmsparse", description="N:M sparsity tools (nmsparse_hf)."
    )
    parser.add_argument("--version", action="version", version=f"nmsparse_hf {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_verify(sub)
    _add_push(sub)
    _add_export(sub)
    _add_schedule(sub)
    _add_report(sub)
    _add_prune(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``nmsparse`` with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # the reader stopped early (``nmsparse schedule ... | head``)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
