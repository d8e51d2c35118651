"""The one path that writes a sparse checkpoint, and the verify that checks what loads.

A checkpoint written by `save_sparse_pretrained` is a plain Transformers checkpoint (config.json,
safetensors with exact zeros, the processor or tokenizer, a README.md model card) that loads with
``from_pretrained`` and no nmsparse_hf. Its ``config.json`` carries the ``nm_sparsity`` block
(`SparseCheckpointMetadata`). `NMSparseTrainer.save_model`, the recipes and the plain-loop example
all save through `save_sparse_pretrained`; `verify_checkpoint` checks a directory against its own
metadata, reading the weights ``from_pretrained`` would load (`WeightFiles`) and the layers the
recorded config targets in the recorded architecture (`architecture_problems`).

Saving is atomic (`export.atomic`): the files are written into a staging directory beside the
output, verified there, and moved into place; the save manifest (``.nmsparse_manifest.json``,
the sha256 of every file written) is the last file and marks the save finished
(`checkpoint_state`).

    sparsifier.finalize()
    save_sparse_pretrained(model, sparsifier, "out/vit-2of4", processing_class=processor)
    verify_checkpoint("out/vit-2of4").raise_if_failed()
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..config import LOCATIONS, NMSparsityConfig
from ..errors import NMCheckpointError, NMSparsityError, NMVerificationError
from ..one_shot import one_shot_record
from ..sparsifier import NMSparsifier, VerificationReport, check_blocks
from . import atomic
from .architecture import architecture_problems
from .card import render_model_card
from .metadata import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    LocationSummary,
    SparseCheckpointMetadata,
    load_sparse_metadata,
    location_order,
    on_disk_names,
    read_json,
)
from .weights import WeightFiles, regular_file

CheckpointState = Literal["finished", "incomplete", "missing"]


class NMIncompleteCheckpointError(NMCheckpointError):
    """The directory is an unfinished save (a save into it was interrupted): nothing in it is
    taken as a checkpoint."""


# ---------------------------------------------------------------------------------- state
def checkpoint_state(path: str | os.PathLike) -> CheckpointState:
    """Whether a sparse save into ``path`` finished, cheaply (no weight is read).

    * ``"finished"``: ``path`` holds ``config.json`` and the save manifest that
      `save_sparse_pretrained` writes last, after the saved files verified (a later save into
      ``path`` that was interrupted leaves this one in place, still finished);
    * ``"missing"``: nothing is there (no folder, or an empty one, and no save left anything
      beside it);
    * ``"incomplete"``: anything else: a save into ``path`` started and did not finish (its
      staging directory is left beside ``path``), or the folder holds files that no finished
      save marked (a half-copied folder, a checkpoint from elsewhere).

    `verify_checkpoint` refuses a folder whose save is known to be unfinished; a rerun that
    finds ``"finished"`` would replace a finished model.
    """
    folder = Path(path)
    if folder.is_dir() and (folder / "config.json").is_file() and _finished(folder):
        return "finished"
    if atomic.leftovers(folder):
        return "incomplete"
    if not os.path.lexists(folder) or (folder.is_dir() and not any(folder.iterdir())):
        return "missing"
    return "incomplete"


def _finished(folder: Path) -> bool:
    return (folder / MANIFEST).is_file() and "config.json" in read_manifest(folder)


def _refuse_unfinished(folder: Path) -> None:
    """Raise `NMIncompleteCheckpointError` when a save into ``folder`` is known to be
    unfinished: no finish marker, and either a save's staging directory beside it or ``folder``
    itself a staging directory."""
    if (folder / MANIFEST).is_file() and _finished(folder):
        return
    left = atomic.leftovers(folder)
    if not left and not atomic.is_staging(folder):
        return
    where = f" (left beside it: {', '.join(p.name for p in left)})" if left else ""
    raise NMIncompleteCheckpointError(
        f"{folder}: incomplete: a save into it did not finish{where}. Nothing in it is a "
        f"checkpoint; save again with save_sparse_pretrained."
    )


# ---------------------------------------------------------------------------------- verification
def verify_checkpoint(path: str | os.PathLike) -> VerificationReport:
    """Check a saved sparse checkpoint against its own metadata, reading only JSON and safetensors.

    The weights checked are those ``from_pretrained`` would load (`WeightFiles`: same file
    precedence, only regular files inside the directory, a tensor stored in two files refused).
    For every layer of the metadata, each block must be N:M at its recorded pattern along
    ``sparse_dim`` (`check_blocks`), and a layer's blocks must not overlap. Every top-level claim
    is cross-checked against the blocks and the weights (`claim_problems`): the patterns
    (``n_keep``/``m``, ``n_keep_qkv``/``m_qkv``, ``locations``, the training ``config``, the
    recipe name), the counts (``nonzeros``, ``numel``, ``achieved_sparsity``) and
    ``location_sparsity``. The recorded config and architecture decide which layers must be
    sparse and how their blocks lie (`architecture_problems`: every targeted layer recorded, its
    blocks covering exactly the rows the config makes sparse, ``fan_in_fan_out`` only on a
    Conv1D); when they cannot be read or built, that is a failure. Metadata disagreeing with the
    weights is a failure, never trusted. Zeros stored as -0.0 are counted and reported as a
    warning (``report.warnings()``), not a failure.

    Returns:
        The `VerificationReport` (``report.ok``; ``str(report)`` is a per-layer table).

    Raises:
        NMIncompleteCheckpointError: a save into the directory did not finish.
        NMCheckpointError: the input cannot be read (no or malformed config.json or metadata,
            no safetensors weights, a path leaving the directory, an entry that is not a regular
            file, an unreadable file).
    """
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    _refuse_unfinished(folder)
    return _verify_folder(folder)


def _verify_folder(folder: Path) -> VerificationReport:
    """`verify_checkpoint` of a folder not known to be unfinished (the save path calls it on
    its staging directory)."""
    if not os.path.lexists(folder / "config.json"):
        load_sparse_metadata(folder)  # raises the "no such file" error
    config = regular_file(folder, "config.json", "the model config")
    meta = load_sparse_metadata(config)
    files = WeightFiles(folder)
    report = VerificationReport()
    for key, shards in sorted(files.duplicates.items()):
        report.problems.append(
            f"{key}: stored in {len(shards)} weight files ({', '.join(shards)}); which copy "
            f"loads is not what the index says, so a tensor must be stored once"
        )
    for name, blocks in meta.layers.items():
        weight = files.get(f"{name}.weight")
        if weight is None:
            report.problems.append(
                f"{name}.weight: named in the metadata but not in the weights that load "
                f"({', '.join(files.files)})"
            )
            continue
        report.problems += overlap_problems(name, blocks)
        check_blocks(report, name, weight, [b.to_dict() for b in blocks], meta.sparse_dim)
    report.problems += claim_problems(meta, report)
    report.problems += architecture_problems(config, meta)
    return report


def overlap_problems(name: str, blocks: list) -> list[str]:
    """A layer's blocks must not overlap: a whole-weight block stands alone, row ranges are
    disjoint (``blocks``: `LayerBlock` records of one layer)."""
    if len(blocks) < 2:
        return []
    if any(b.rows is None for b in blocks):
        return [f"{name}: a block covering the whole weight is listed with other blocks"]
    spans = sorted(tuple(b.rows) for b in blocks)
    for (a0, a1), (b0, b1) in zip(spans, spans[1:], strict=False):
        if b0 < a1:
            return [f"{name}: metadata blocks overlap (rows {[a0, a1]} and {[b0, b1]})"]
    return []


def _expected_pattern(meta: SparseCheckpointMetadata, location: str) -> tuple[int, int]:
    return (meta.n_keep_qkv, meta.m_qkv) if location in ("Q", "K", "V") else (meta.n_keep, meta.m)


def _pattern_problems(meta: SparseCheckpointMetadata) -> list[str]:
    """Every claimed pattern is a sparse pattern, and blocks, locations and the top-level patterns
    say the same thing."""
    problems = []
    claims = {"n_keep:m": (meta.n_keep, meta.m), "n_keep_qkv:m_qkv": (meta.n_keep_qkv, meta.m_qkv)}
    claims.update({f"locations[{loc}]": p for loc, p in meta.locations.items()})
    claims.update(
        {f"{name} block {b.location}": b.pattern for name, bs in meta.layers.items() for b in bs}
    )
    for what, (n, m) in claims.items():
        if not 0 < n < m:
            problems.append(f"metadata {what} = {n}:{m} is not an N:M-sparse pattern (0 < N < M)")
    used = {b.location for bs in meta.layers.values() for b in bs}
    if set(meta.locations) != used:
        problems.append(
            f"metadata locations {sorted(meta.locations)} differ from the locations of the "
            f"layer blocks {sorted(used)}"
        )
    for loc, pattern in meta.locations.items():
        if loc not in LOCATIONS:
            problems.append(f"metadata location {loc!r} is not one of {list(LOCATIONS)}")
        elif pattern != _expected_pattern(meta, loc):
            problems.append(
                f"metadata locations[{loc}] = {pattern[0]}:{pattern[1]} but the top-level "
                f"pattern for {loc} is {'{}:{}'.format(*_expected_pattern(meta, loc))}"
            )
    for name, blocks in meta.layers.items():
        for b in blocks:
            claimed = meta.locations.get(b.location)
            if claimed is not None and b.pattern != claimed:
                problems.append(
                    f"{name}[{b.location}]: metadata pattern {b.n_keep}:{b.m} differs from "
                    f"location {b.location}'s pattern {claimed[0]}:{claimed[1]}"
                )
    return problems


def _config_problems(meta: SparseCheckpointMetadata) -> list[str]:
    """The training config recorded beside the claims must describe the same patterns."""
    if not meta.config:
        return []
    try:
        cfg = NMSparsityConfig.from_dict(meta.config)
    except NMSparsityError as exc:
        return [f"metadata config is not a valid sparsity config: {exc}"]
    problems = []
    pairs = {
        "n_keep": (cfg.n_keep, meta.n_keep),
        "m": (cfg.m, meta.m),
        "n_keep_qkv": (cfg.n_keep_qkv, meta.n_keep_qkv),
        "m_qkv": (cfg.m_qkv, meta.m_qkv),
        "sparse_dim": (cfg.sparse_dim, meta.sparse_dim),
        "recipe": (cfg.recipe_name, meta.recipe),
    }
    for key, (in_config, claimed) in pairs.items():
        if in_config != claimed:
            problems.append(f"metadata {key} = {claimed!r} but its config says {in_config!r}")
    if cfg.target_modules is None and not set(meta.locations) <= set(cfg.locations):
        problems.append(
            f"metadata locations {sorted(meta.locations)} are not all among the config's "
            f"locations {list(cfg.locations)}"
        )
    return problems


def _count_problems(meta: SparseCheckpointMetadata, report: VerificationReport) -> list[str]:
    """The recorded counts and per-location summaries must be those of the weights."""
    if not report.layers:
        return []
    nonzeros = sum(c.nonzeros for c in report.layers)
    numel = sum(c.numel for c in report.layers)
    problems = [
        f"metadata {key} = {claimed!r} but the targeted weights have {found}"
        for key, claimed, found in (
            ("nonzeros", meta.nonzeros, nonzeros),
            ("numel", meta.numel, numel),
        )
        if claimed != found
    ]
    actual = 1.0 - nonzeros / numel if numel else 0.0
    if abs(meta.achieved_sparsity - actual) > 0.5 / max(numel, 1):
        problems.append(
            f"metadata achieved_sparsity = {meta.achieved_sparsity!r} but the weights' sparsity "
            f"is {actual!r} ({nonzeros} non-zeros of {numel})"
        )
    found = location_summaries(report)
    if set(meta.location_sparsity) != set(found):
        problems.append(
            f"metadata location_sparsity covers {sorted(meta.location_sparsity)} but the blocks "
            f"cover {sorted(found)}"
        )
    for loc, summary in found.items():
        claimed = meta.location_sparsity.get(loc)
        if claimed is None:
            continue
        total = sum(c.numel for c in report.layers if c.location == loc)
        if (
            claimed.pattern != meta.locations.get(loc, summary.pattern)
            or claimed.blocks != summary.blocks
            or abs(claimed.sparsity - summary.sparsity) > 0.5 / max(total, 1)
        ):
            problems.append(
                f"metadata location_sparsity[{loc}] = {claimed.to_dict()} but the weights give "
                f"{summary.to_dict() | {'pattern': list(meta.locations.get(loc, ()))}}"
            )
    return problems


def _name_problems(meta: SparseCheckpointMetadata) -> list[str]:
    """``layers`` and ``layers_current`` must describe the same blocks, paired by
    ``current_names``."""
    stated = meta.stated_layers_current
    if set(meta.current_names) == set(meta.layers) and (
        stated is None or stated == meta.layers_current
    ):
        return []
    count = len(stated) if stated is not None else len(meta.current_names)
    return [
        f"metadata: 'layers' ({len(meta.layers)} layers, on-disk names) and 'layers_current' / "
        f"'current_names' ({count}, current names) do not describe the same blocks"
    ]


def claim_problems(meta: SparseCheckpointMetadata, report: VerificationReport) -> list[str]:
    """Every way the metadata's top-level claims disagree with its blocks or the weights
    (``report`` holds the block checks of the weights)."""
    return (
        _name_problems(meta)
        + _pattern_problems(meta)
        + _config_problems(meta)
        + _count_problems(meta, report)
    )


def location_summaries(report: VerificationReport) -> dict[str, LocationSummary]:
    """Per location of the checked blocks: the pattern, block count and sparsity."""
    acc: dict[str, list] = {}
    for check in report.layers:
        entry = acc.setdefault(check.location, [check.pattern, 0, 0, 0])
        entry[1] += 1
        entry[2] += check.nonzeros
        entry[3] += check.numel
    return {
        loc: LocationSummary(tuple(p), count, 1.0 - nz / total if total else 0.0)
        for loc, (p, count, nz, total) in sorted(acc.items(), key=lambda kv: location_order(kv[0]))
    }


# ---------------------------------------------------------------------------------- metadata
def build_metadata(
    model: nn.Module,
    sparsifier: NMSparsifier,
    state_dict: Mapping[str, torch.Tensor],
    save_original_format: bool = True,
) -> SparseCheckpointMetadata:
    """The metadata of ``model`` as it is about to be saved from ``state_dict`` (whole tensors,
    keyed like ``model.state_dict()``): the sparsifier's description, on-disk layer names, and the
    counts of the weights in ``state_dict``.

    Raises:
        NMVerificationError: a targeted weight in ``state_dict`` is not N:M.
    """
    base = sparsifier.metadata()
    disk = on_disk_names(model, base["layers"], save_original_format=save_original_format)
    report = VerificationReport()
    for name, blocks in base["layers"].items():
        weight = state_dict[f"{name}.weight"].detach()
        check_blocks(report, disk[name], weight, blocks, base["sparse_dim"])
    report.raise_if_failed()
    nonzeros = sum(c.nonzeros for c in report.layers)
    numel = sum(c.numel for c in report.layers)
    return SparseCheckpointMetadata.from_dict(
        {
            **base,
            "one_shot": one_shot_record(model),
            "format": f"{FORMAT_NAME}/{FORMAT_VERSION}",
            "layers": {disk[n]: blocks for n, blocks in base["layers"].items()},
            "current_names": {disk[n]: n for n in base["layers"]},
            "nonzeros": nonzeros,
            "numel": numel,
            "achieved_sparsity": 1.0 - nonzeros / numel if numel else 0.0,
            "location_sparsity": {
                loc: s.to_dict() for loc, s in location_summaries(report).items()
            },
        },
        source="save_sparse_pretrained",
    )


# ---------------------------------------------------------------------------------- saving
def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(folder: Path) -> dict[str, str]:
    """``{file name: sha256}`` recorded by the last `save_sparse_pretrained` into ``folder``."""
    try:
        files = read_json(folder / MANIFEST, "save manifest")["files"]
    except (NMCheckpointError, KeyError, TypeError):
        return {}
    if not isinstance(files, dict):
        return {}
    return {
        name: digest
        for name, digest in files.items()
        if isinstance(name, str) and "/" not in name and (folder / name).is_file()
    }


def _ours(folder: Path) -> dict[str, str]:
    """Files of ``folder`` written by a previous `save_sparse_pretrained` and unchanged since."""
    return {n: d for n, d in read_manifest(folder).items() if _sha256(folder / n) == d}


def _replaced_entries(folder: Path, overwrite: bool) -> list[str] | None:
    """What a save into ``folder`` replaces: None when the whole folder can be swapped (it does
    not exist, or holds only unchanged files of a previous save), else the names to set aside
    (the previous save's files, its manifest first), everything else staying in place. Refuse
    (unless ``overwrite``) when anything else is there, so nothing a user saved is lost."""
    if os.path.lexists(folder) and not folder.is_dir():
        raise NMSparsityError(f"output_dir = {str(folder)!r} is a file. Pass a directory.")
    if not folder.is_dir():
        return None
    ours = _ours(folder)
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in ours and p.name != MANIFEST)
    if foreign and not overwrite:
        raise NMSparsityError(
            f"output_dir = {str(folder)!r} holds files not written by a previous "
            f"save_sparse_pretrained (or changed since): {foreign[:5]}"
            f"{' ...' if len(foreign) > 5 else ''}. Choose an empty directory, or pass "
            f"overwrite=True to write into it (files with other names are left in place)."
        )
    if not foreign and not atomic.must_swap_files(folder):
        return None
    marker = [MANIFEST] if os.path.lexists(folder / MANIFEST) else []
    return marker + sorted(ours)


def _move_into_place(staged: Path, folder: Path, replaced: list[str] | None) -> None:
    """Swap the verified staging directory into place (`atomic.swap_dir`), or, when ``folder``
    keeps other entries, its files one by one with the manifest last (`atomic.swap_files`)."""
    if replaced is None:
        atomic.swap_dir(staged, folder)
        return
    names = sorted(p.name for p in staged.iterdir() if p.name != MANIFEST)
    same = [n for n in names if os.path.lexists(folder / n) and n not in replaced]
    atomic.swap_files(staged, folder, replaced + same, names + [MANIFEST])


def _write_manifest(folder: Path, fmt: str, digests: Mapping[str, str]) -> None:
    """Write the save manifest (``{file name: sha256}``): the finish marker, so it is written
    last, through a temporary name and an atomic rename."""
    manifest = {"format": fmt, "files": dict(sorted(digests.items()))}
    temporary = folder / f"{MANIFEST}.tmp"
    temporary.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, folder / MANIFEST)


def _full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state_dict with whole tensors. Under FSDP2 (DTensor parameters) this gathers
    each weight once, to CPU on rank 0 (a collective: every rank must call it)."""
    if not any(callable(getattr(p, "full_tensor", None)) for p in model.parameters()):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def save_sparse_pretrained(
    model: nn.Module,
    sparsifier: NMSparsifier,
    output_dir: str | os.PathLike,
    *,
    processing_class: Any = None,
    eval_results: Mapping[str, Any] | None = None,
    model_name: str | None = None,
    card: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    is_main_process: bool = True,
    **save_kwargs: Any,
) -> Path:
    """Save a finalized sparse model as a plain Transformers checkpoint with N:M metadata: the
    one path that writes a sparse checkpoint (the Trainer, the recipes and plain loops use it).

    Writes, through ``model.save_pretrained`` (default on-disk names, readable by every
    transformers version): ``config.json`` with the `SparseCheckpointMetadata` block as
    ``nm_sparsity`` (also set on ``model.config.nm_sparsity``), the safetensors weights with exact
    zeros, the processor or tokenizer (``processing_class.save_pretrained``) so that
    ``pipeline()`` loads the directory, and a ``README.md`` model card. The written files are then
    verified with `verify_checkpoint`, and each targeted weight on disk must equal the one saved.

    The save is atomic: everything is written into a staging directory beside ``output_dir``
    (``.<name>.nmsparse-tmp-<pid>``), verified there, and the save manifest (the sha256 of each
    file) is written last, as the finish marker (`checkpoint_state`). Only then does it move into
    place: the previous folder is renamed aside, the new one renamed in, the old one deleted;
    when ``output_dir`` keeps other files (``overwrite``), the previous save's files are set
    aside and the new ones moved in one by one, the manifest last. On any failure, and when the
    process is killed, the previous checkpoint stays in place, and a first save leaves nothing
    that `checkpoint_state` calls finished.

    Args:
        model: the model ``sparsifier`` is attached to, after ``sparsifier.finalize()``.
        sparsifier: the finalized `NMSparsifier`.
        output_dir: the checkpoint directory. It must be new, empty, or hold only unchanged files
            of a previous save by this function (they are replaced), unless ``overwrite``.
        processing_class: an image processor, tokenizer or processor to save beside the model.
        eval_results: metric name -> value, for the card.
        model_name: the card's title (default: the directory name).
        card: further model-card fields (see `write_model_card`), e.g. ``base_model``,
            ``datasets``, ``license``, ``tags``.
        overwrite: write into a directory that holds other files (same-named files are replaced,
            others are left in place).
        state_dict: whole tensors to save, keyed like ``model.state_dict()`` (the Trainer passes
            the one gathered under FSDP). Default: the model's own; under FSDP2 it is gathered
            here, once per weight, so then call this on every rank.
        is_main_process: only the main process writes (as in ``save_pretrained``).
        **save_kwargs: passed to ``save_pretrained`` (e.g. ``max_shard_size``).

    Returns:
        ``output_dir`` as a `Path`.

    Raises:
        NMSparsityError: the sparsifier is not finalized, the directory holds other files, or a
            targeted weight cannot be named on disk. NMVerificationError: a layer is not N:M, or
            the written checkpoint does not verify.
    """
    if not sparsifier.finalized:
        raise NMSparsityError(
            "save_sparse_pretrained: the sparsifier is not finalized, so the weights are still "
            "dense. Call sparsifier.finalize() after training, then save."
        )
    if save_kwargs.get("push_to_hub"):
        raise NMSparsityError(
            "save_sparse_pretrained: push_to_hub=True is not supported here. Save, then call "
            "push_sparse_to_hub(output_dir, repo_id)."
        )
    sparsifier.verify(strict=True)
    folder = Path(output_dir)
    gathered = state_dict is None and any(
        callable(getattr(p, "full_tensor", None)) for p in model.parameters()
    )
    state = _full_state_dict(model) if state_dict is None else state_dict
    if not is_main_process:
        return folder
    replaced = _replaced_entries(folder, overwrite)
    staged = atomic.staging_dir(folder)
    try:
        meta, report = _write_staged(
            model,
            sparsifier,
            state,
            staged,
            explicit=state_dict is not None or gathered,
            processing_class=processing_class,
            **save_kwargs,
        )
        name = model_name or folder.resolve().name
        _write_card(staged, meta, report, model, eval_results, name, card)
        written = {p.name: _sha256(p) for p in staged.iterdir() if p.is_file()}
        _write_manifest(staged, meta.format, written)  # the finish marker: last
        _move_into_place(staged, folder, replaced)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return folder


def _write_staged(
    model: nn.Module,
    sparsifier: NMSparsifier,
    state: Mapping[str, torch.Tensor],
    staged: Path,
    explicit: bool,
    processing_class: Any,
    **save_kwargs: Any,
) -> tuple[SparseCheckpointMetadata, VerificationReport]:
    """Write the model, its metadata and processor into ``staged`` and verify what was written
    (`_verify_folder`, and each targeted weight on disk equals the one saved)."""
    meta = build_metadata(
        model, sparsifier, state, save_original_format=save_kwargs.get("save_original_format", True)
    )
    model.config.nm_sparsity = meta.to_dict()
    given = {"state_dict": dict(state)} if explicit else {}
    model.save_pretrained(staged, **given, **save_kwargs)
    if processing_class is not None:
        processing_class.save_pretrained(staged)
    report = _verify_folder(staged)
    _check_written(staged, meta, state)
    report.raise_if_failed()
    return meta, report


def _write_card(
    staged: Path,
    meta: SparseCheckpointMetadata,
    report: VerificationReport,
    model: nn.Module,
    eval_results: Mapping[str, Any] | None,
    model_name: str,
    card: Mapping[str, Any] | None,
) -> None:
    write_model_card(
        staged,
        meta,
        report,
        eval_results=eval_results,
        model_name=model_name,
        model_type=getattr(model.config, "model_type", None),
        **dict(card or {}),
    )


def write_model_card(
    folder: str | os.PathLike,
    meta: SparseCheckpointMetadata,
    report: VerificationReport | None = None,
    eval_results: Mapping[str, Any] | None = None,
    model_name: str | None = None,
    model_type: str | None = None,
    **card: Any,
) -> Path:
    """Write ``README.md`` (`render_model_card`) into a saved checkpoint; verifies it first when no
    ``report`` is given. ``card`` holds `render_model_card`'s keyword-only arguments; without
    ``architectures`` they are read from the folder's ``config.json`` (for the pipeline tag).
    When the folder's save manifest lists the card, its digest is updated, so the card stays a
    file of that save. Returns the card's path."""
    folder = Path(folder)
    if report is None:
        report = verify_checkpoint(folder).raise_if_failed()
    if card.get("architectures") is None:
        card["architectures"] = _architectures(folder)
    text = render_model_card(
        meta,
        report,
        eval_results=eval_results,
        model_name=model_name or folder.resolve().name,
        model_type=model_type,
        **card,
    )
    path = folder / "README.md"
    path.write_text(text, encoding="utf-8")
    listed = read_manifest(folder)
    if "README.md" in listed:  # the card stays a file of that save
        _write_manifest(folder, meta.format, {**listed, "README.md": _sha256(path)})
    return path


def _architectures(folder: Path) -> list[str] | None:
    try:
        config = read_json(folder / "config.json", "model config")
    except NMCheckpointError:
        return None
    value = config.get("architectures") if isinstance(config, dict) else None
    return [a for a in value if isinstance(a, str)] if isinstance(value, list) else None


@torch.no_grad()
def _check_written(
    folder: Path, meta: SparseCheckpointMetadata, state: Mapping[str, torch.Tensor]
) -> None:
    """Every targeted weight on disk (by its on-disk name) equals the weight that was saved."""
    files = WeightFiles(folder)
    for disk, current in meta.current_names.items():
        stored = files.get(f"{disk}.weight")
        weight = state[f"{current}.weight"].detach().cpu()
        if stored is None or not torch.equal(stored, weight):
            raise NMVerificationError(
                f"{folder}: the saved '{disk}.weight' is not the model's {current}.weight. The "
                f"on-disk name mapping is wrong for this model; save with "
                f"save_original_format=False and report this model class to nmsparse_hf."
            )
