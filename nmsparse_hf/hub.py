"""Sparse checkpoints: save, describe, verify and push an N:M-sparse model (SPEC §5).

A checkpoint written by `save_sparse_pretrained` is a plain Transformers checkpoint (config.json,
safetensors with exact zeros, README.md) that loads with ``from_pretrained`` and no nmsparse_hf.
Its ``config.json`` carries an ``nm_sparsity`` block (`sparse_metadata`): patterns, group
dimension, locations, recipe, achieved sparsity and, per targeted layer, its blocks and patterns,
keyed twice:

* ``layers``: by the names the weights have **in the files** (``save_pretrained`` reverts the
  module renames of transformers 5.x, e.g. ``vit.layers.0.mlp.fc1`` is written as
  ``vit.encoder.layer.0.intermediate.dense``), so `verify_checkpoint` checks the raw safetensors;
* ``layers_current``: by the module names of the model that was saved, so `verify_nm` checks a
  model loaded back with plain ``from_pretrained``; ``current_names`` pairs the two
  (on-disk name -> current name).

    sparsifier.finalize()
    save_sparse_pretrained(model, sparsifier, "out/vit-2of4", eval_results={"top1": 0.71})
    verify_checkpoint("out/vit-2of4").raise_if_failed()
    push_sparse_to_hub("out/vit-2of4", "me/vit-2of4")
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import string
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import LOCATIONS, SPARSE_DIMS
from .errors import NMSparsityError, NMVerificationError
from .sparsifier import NMSparsifier, VerificationReport, _full, check_layer

CONFIG_KEY = "nm_sparsity"
FORMAT_PREFIX = "nmsparse_hf/"
MANIFEST = ".nmsparse_manifest.json"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
TAGS = ["nmsparse_hf", "n:m-sparsity", "image-classification", "sparse"]


# ---------------------------------------------------------------------------------- names on disk
def _revert_weight_conversion():
    """transformers' own save-time renaming (5.x), or None where it does not exist (4.x saves the
    module names as they are)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return None
    return revert_weight_conversion


def on_disk_names(
    model: nn.Module, names: Iterable[str], save_original_format: bool = True
) -> dict[str, str]:
    """Map module names of ``model`` to the names its ``save_pretrained`` checkpoint uses.

    Exact by construction: the model's ``state_dict()`` is passed through the very function
    ``save_pretrained`` applies before writing (``transformers.core_model_loading.
    revert_weight_conversion``, which reads the model's conversion mapping, including the one
    recorded by ``from_pretrained``), and each weight is found in the result by the **identity** of
    its tensor object. A rename hands the same tensor object through, so nothing is guessed from
    name patterns, shapes or values. A weight that the conversion transforms rather than renames
    (a fuse/split converter) has no single name on disk and is an error.

    Args:
        model: the model to be saved.
        names: module names (as in ``model.named_modules()``) whose ``weight`` is saved.
        save_original_format: the same argument of ``save_pretrained``; ``False`` writes the
            current names, so the mapping is the identity.

    Returns:
        ``{current module name: on-disk module name}``.

    Raises:
        NMSparsityError: a name has no ``weight`` in the state_dict, or its weight is not saved
            under a plain ``<name>.weight`` key.
    """
    names = list(names)
    state = model.state_dict()
    missing = [n for n in names if f"{n}.weight" not in state]
    if missing:
        raise NMSparsityError(
            f"{missing[0]!r}: no parameter '{missing[0]}.weight' in the state_dict of "
            f"{type(model).__name__} ({len(missing)} name(s) missing). Pass module names of this "
            f"model (as in model.named_modules())."
        )
    revert = _revert_weight_conversion() if save_original_format else None
    if revert is None:
        return {n: n for n in names}
    saved = revert(model, dict(state))
    keys_of: dict[int, list[str]] = {}
    for key, tensor in saved.items():
        keys_of.setdefault(id(tensor), []).append(key)
    out = {}
    for name in names:
        keys = keys_of.get(id(state[f"{name}.weight"]), [])
        if len(keys) != 1 or not keys[0].endswith(".weight"):
            found = f"under {keys}" if keys else "transformed (not a plain rename)"
            raise NMSparsityError(
                f"{name}.weight: save_pretrained writes this weight {found}, so its N:M layout "
                f"cannot be recorded by name. Save with save_original_format=False (the current "
                f"names), or exclude this layer from sparsity."
            )
        out[name] = keys[0].removesuffix(".weight")
    return out


# ---------------------------------------------------------------------------------- metadata
def _blocks(weight: torch.Tensor, blocks: list[Mapping[str, Any]]):
    """Yield (block spec, the part of ``weight`` it covers)."""
    for spec in blocks:
        rows = spec.get("rows")
        yield spec, (weight if not rows else weight[rows[0] : rows[1]])


def sparse_metadata(
    model: nn.Module, sparsifier: NMSparsifier, save_original_format: bool = True
) -> dict[str, Any]:
    """The ``nm_sparsity`` block of a sparse checkpoint (JSON-safe).

    `NMSparsifier.metadata` with ``layers`` keyed by on-disk names (`on_disk_names`), the same
    layers keyed by current module names in ``layers_current``, ``current_names`` (on-disk name
    -> current name), the exact counts behind
    ``achieved_sparsity`` (``nonzeros``, ``numel``: over the whole weight of every targeted layer)
    and ``location_sparsity`` (per location: pattern, number of blocks, sparsity of those blocks).
    """
    meta = sparsifier.metadata()
    current = meta["layers"]
    disk = on_disk_names(model, current, save_original_format=save_original_format)
    modules = dict(model.named_modules())
    nonzeros = numel = 0
    per_loc: dict[str, list[int]] = {}
    for name, blocks in current.items():
        weight = _full(modules[name].weight.detach())
        nonzeros += int((weight != 0).sum())
        numel += weight.numel()
        for spec, part in _blocks(weight, blocks):
            acc = per_loc.setdefault(spec["location"], [0, 0, 0])
            acc[0] += 1
            acc[1] += int((part != 0).sum())
            acc[2] += part.numel()
    meta["layers"] = {disk[name]: blocks for name, blocks in current.items()}
    meta["layers_current"] = current
    meta["current_names"] = {disk[name]: name for name in current}
    meta["nonzeros"] = nonzeros
    meta["numel"] = numel
    meta["location_sparsity"] = {
        loc: {
            "pattern": meta["locations"].get(loc),
            "blocks": count,
            "sparsity": 1.0 - nz / total if total else 0.0,
        }
        for loc, (count, nz, total) in sorted(per_loc.items(), key=lambda kv: _loc_order(kv[0]))
    }
    return meta


def _loc_order(location: str) -> tuple[int, str]:
    return (LOCATIONS.index(location) if location in LOCATIONS else len(LOCATIONS), location)


def _invalid(source: str, what: str) -> NMSparsityError:
    return NMSparsityError(
        f"{source}: invalid {CONFIG_KEY} metadata: {what}. The block is written by "
        f"nmsparse_hf.save_sparse_pretrained; re-save the checkpoint with it."
    )


def _validate_metadata(meta: Any, source: str) -> dict[str, Any]:
    """Check the structure (types) of an ``nm_sparsity`` block; values are checked against the
    weights by `verify_checkpoint`."""
    if not isinstance(meta, dict):
        raise _invalid(source, f"expected a JSON object, got {type(meta).__name__}")
    fmt = meta.get("format")
    if not isinstance(fmt, str) or not fmt.startswith(FORMAT_PREFIX):
        raise _invalid(source, f"format = {fmt!r}, expected '{FORMAT_PREFIX}<version>'")
    if meta.get("sparse_dim") not in SPARSE_DIMS:
        raise _invalid(
            source, f"sparse_dim = {meta.get('sparse_dim')!r}, expected one of {SPARSE_DIMS}"
        )
    for key in ("layers", "layers_current"):
        layers = meta.get(key)
        if key == "layers_current" and layers is None:
            continue
        if not isinstance(layers, dict) or not layers:
            raise _invalid(source, f"{key!r} must map layer names to their blocks, got {layers!r}")
        for name, blocks in layers.items():
            if not isinstance(blocks, list) or not blocks:
                raise _invalid(source, f"{key}[{name!r}] = {blocks!r} is not a list of blocks")
            for spec in blocks:
                ok = (
                    isinstance(spec, dict)
                    and isinstance(spec.get("location"), str)
                    and all(
                        isinstance(spec.get(k), int) and not isinstance(spec.get(k), bool)
                        for k in ("n_keep", "m")
                    )
                    and (
                        spec.get("rows") is None
                        or (
                            isinstance(spec["rows"], list)
                            and len(spec["rows"]) == 2
                            and all(isinstance(r, int) for r in spec["rows"])
                        )
                    )
                )
                if not ok:
                    raise _invalid(
                        source,
                        f"{key}[{name!r}] has block {spec!r}; a block is "
                        '{"location": str, "rows": null or [start, stop], '
                        '"n_keep": int, "m": int}',
                    )
    pairs = meta.get("current_names")
    if pairs is not None and not (
        isinstance(pairs, dict) and all(isinstance(v, str) for v in pairs.values())
    ):
        raise _invalid(source, f"current_names = {pairs!r} must map on-disk to current names")
    if not isinstance(meta.get("locations"), dict):
        raise _invalid(source, f"locations = {meta.get('locations')!r} is not an object")
    return meta


def load_sparse_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``nm_sparsity`` block of a checkpoint directory (or of its ``config.json``).

    Reads ``config.json`` as JSON only: no code from the checkpoint runs, nothing is unpickled.

    Raises:
        NMSparsityError: no config.json, invalid JSON, no ``nm_sparsity`` block (the checkpoint
            was not saved by `save_sparse_pretrained`), or a block of the wrong structure.
    """
    path = Path(path)
    config = path / "config.json" if path.is_dir() else path
    if not config.is_file():
        raise NMSparsityError(
            f"{config}: no such file. Pass a checkpoint directory saved by "
            f"save_sparse_pretrained (it holds config.json)."
        )
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NMSparsityError(f"{config}: not valid JSON ({exc}).") from None
    if not isinstance(data, dict) or CONFIG_KEY not in data:
        raise NMSparsityError(
            f"{config}: no {CONFIG_KEY!r} block, so nothing says which layers are N:M. Save the "
            f"model with nmsparse_hf.save_sparse_pretrained."
        )
    return _validate_metadata(data[CONFIG_KEY], str(config))


# ---------------------------------------------------------------------------------- verification
class _SafetensorsFiles:
    """Tensors of a checkpoint directory, single-file or sharded, read with ``safetensors`` only."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self._open = safe_open
        index = folder / SAFE_INDEX
        single = folder / SAFE_WEIGHTS
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
                raise NMSparsityError(f"{index}: not a safetensors index ({exc!r}).") from None
            self.file_of = {k: folder / v for k, v in weight_map.items()}
        elif single.is_file():
            self.file_of = dict.fromkeys(self._keys(single), single)
        else:
            raise NMSparsityError(
                f"{folder}: no {SAFE_WEIGHTS} or {SAFE_INDEX}. verify_checkpoint reads safetensors "
                f"checkpoints only (never pickled .bin files)."
            )

    def _keys(self, file: Path) -> list[str]:
        try:
            with self._open(str(file), framework="pt") as handle:
                return list(handle.keys())
        except Exception as exc:  # safetensors raises its own error types
            raise NMSparsityError(f"{file}: unreadable safetensors file ({exc}).") from None

    def get(self, key: str) -> torch.Tensor | None:
        """The tensor stored under ``key``, or None when the checkpoint has no such tensor."""
        file = self.file_of.get(key)
        if file is None:
            return None
        try:
            with self._open(str(file), framework="pt") as handle:
                return handle.get_tensor(key)
        except Exception as exc:
            raise NMSparsityError(f"{file}: cannot read tensor {key!r} ({exc}).") from None


def verify_checkpoint(path: str | os.PathLike) -> VerificationReport:
    """Check a saved sparse checkpoint against its own metadata, reading only JSON and safetensors.

    For every layer in the metadata's ``layers`` (on-disk names): its ``<name>.weight`` exists, and
    each block is N:M at its recorded pattern along ``sparse_dim`` (`check_layer`). Also
    problems: a block whose pattern differs from its location's pattern in ``locations``; a
    ``layers_current`` that does not describe the same blocks (paired by ``current_names``); a
    weight whose shape does not fit its M or its rows; and achieved sparsity (``nonzeros``,
    ``numel``, ``achieved_sparsity``) that differs from the weights. Metadata disagreeing with
    the weights is a failure, never trusted.

    Returns:
        The `VerificationReport` (``report.ok``; ``str(report)`` is a per-layer table).

    Raises:
        NMSparsityError: the input cannot be read (no/invalid config.json or metadata block, no
            safetensors weights, an unreadable file).
    """
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    meta = load_sparse_metadata(folder)
    files = _SafetensorsFiles(folder)
    dim = meta["sparse_dim"]
    report = VerificationReport()
    locations = meta["locations"]
    layers = meta["layers"]
    _check_name_maps(meta, report)
    nonzeros = numel = 0
    for name, blocks in layers.items():
        weight = files.get(f"{name}.weight")
        if weight is None:
            report.problems.append(
                f"layer {name!r} named in the metadata has no tensor '{name}.weight' in the "
                f"checkpoint"
            )
            continue
        nonzeros += int((weight != 0).sum())
        numel += weight.numel()
        for spec, part in _blocks(weight, blocks):
            loc, pattern = spec["location"], (spec["n_keep"], spec["m"])
            label = name + ("" if not spec.get("rows") else f"[{loc}]")
            expected = locations.get(loc)
            if expected is None or tuple(expected) != pattern:
                report.problems.append(
                    f"{label}: metadata pattern {pattern[0]}:{pattern[1]} differs from location "
                    f"{loc}'s pattern {expected!r}"
                )
            rows = spec.get("rows")
            if rows and not 0 <= rows[0] < rows[1] <= weight.shape[0]:
                report.problems.append(
                    f"{label}: metadata rows {rows} do not fit the weight's shape "
                    f"{tuple(weight.shape)}"
                )
                continue
            try:
                report.layers.append(check_layer(label, part, loc, pattern, dim))
            except NMSparsityError as exc:
                report.problems.append(f"{label}: metadata does not match the weights: {exc}")
    _check_achieved(meta, nonzeros, numel, report)
    return report


def _check_name_maps(meta: Mapping[str, Any], report: VerificationReport) -> None:
    """``layers`` and ``layers_current`` must describe the same blocks, paired by
    ``current_names`` (config.json is written with sorted keys, so order pairs nothing)."""
    layers, current = meta["layers"], meta.get("layers_current")
    if current is None:
        return
    pairs = meta.get("current_names")
    if isinstance(pairs, dict):
        same = set(pairs) == set(layers) and all(
            current.get(pairs[disk]) == blocks for disk, blocks in layers.items()
        )
        same = same and len(current) == len(layers)
    else:

        def key(blocks):
            return json.dumps(blocks, sort_keys=True)

        same = sorted(map(key, layers.values())) == sorted(map(key, current.values()))
    if not same:
        report.problems.append(
            f"metadata: 'layers' ({len(layers)} layers, on-disk names) and 'layers_current' "
            f"({len(current)}, current names) do not describe the same blocks"
        )


def _check_achieved(meta: Mapping[str, Any], nonzeros: int, numel: int, report) -> None:
    """Compare the recorded achieved sparsity (and its counts) with the weights' own."""
    if not numel:
        return
    actual = 1.0 - nonzeros / numel
    for key, found in (("nonzeros", nonzeros), ("numel", numel)):
        if key in meta and meta[key] != found:
            report.problems.append(
                f"metadata {key} = {meta[key]!r} but the targeted weights have {found}"
            )
    recorded = meta.get("achieved_sparsity")
    if not isinstance(recorded, int | float) or isinstance(recorded, bool):
        report.problems.append(f"metadata achieved_sparsity = {recorded!r} is not a number")
    elif math.isnan(recorded) or abs(recorded - actual) > 0.5 / numel:
        report.problems.append(
            f"metadata achieved_sparsity = {recorded!r} but the weights' sparsity is {actual!r} "
            f"({nonzeros} non-zeros of {numel})"
        )


# ---------------------------------------------------------------------------------- saving
def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest(folder: Path) -> dict[str, str]:
    """``{file name: sha256}`` recorded by the last `save_sparse_pretrained` into ``folder``."""
    try:
        files = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
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
    return {n: d for n, d in _manifest(folder).items() if _sha256(folder / n) == d}


def _prepare_dir(folder: Path, overwrite: bool) -> None:
    """Create ``folder``, or clear our own unchanged files from a previous save. Refuse (unless
    ``overwrite``) when anything else is there, so nothing a user saved is lost."""
    if folder.exists() and not folder.is_dir():
        raise NMSparsityError(f"output_dir = {str(folder)!r} is a file. Pass a directory.")
    folder.mkdir(parents=True, exist_ok=True)
    ours = _ours(folder)
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in ours and p.name != MANIFEST)
    if foreign and not overwrite:
        raise NMSparsityError(
            f"output_dir = {str(folder)!r} holds files not written by a previous "
            f"save_sparse_pretrained (or changed since): {foreign[:5]}"
            f"{' ...' if len(foreign) > 5 else ''}. Choose an empty directory, or pass "
            f"overwrite=True to write into it (files with other names are left in place)."
        )
    for name in ours:
        (folder / name).unlink()
    (folder / MANIFEST).unlink(missing_ok=True)


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()
    }


def save_sparse_pretrained(
    model: nn.Module,
    sparsifier: NMSparsifier,
    output_dir: str | os.PathLike,
    eval_results: Mapping[str, Any] | None = None,
    model_name: str | None = None,
    overwrite: bool = False,
    **save_kwargs: Any,
) -> Path:
    """Save a finalized sparse model as a plain Transformers checkpoint with N:M metadata.

    Writes, through ``model.save_pretrained`` (default on-disk names, readable by every
    transformers version): ``config.json`` with the `sparse_metadata` block as ``nm_sparsity``
    (also set on ``model.config.nm_sparsity``, which plain ``from_pretrained`` keeps as a config
    attribute), the safetensors weights with exact zeros, and a ``README.md`` model card (YAML
    front matter, sparsity per location and per layer, recipe, ``eval_results``). The saved files
    are verified with `verify_checkpoint`, and each targeted weight on disk must equal the model's.

    Args:
        model: the model ``sparsifier`` is attached to, after ``sparsifier.finalize()``.
        sparsifier: the finalized `NMSparsifier`.
        output_dir: the checkpoint directory. It must be new, empty, or hold only unchanged files
            of a previous save by this function (they are replaced), unless ``overwrite``.
        eval_results: metric name -> value, for the card's evaluation table.
        model_name: the card's title (default: the directory name).
        overwrite: write into a directory that holds other files (same-named files are replaced,
            others are left in place).
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
    _prepare_dir(folder, overwrite)
    before = _snapshot(folder)
    meta = sparse_metadata(
        model, sparsifier, save_original_format=save_kwargs.get("save_original_format", True)
    )
    model.config.nm_sparsity = meta
    model.save_pretrained(folder, **save_kwargs)
    report = verify_checkpoint(folder)
    _check_written(folder, model, meta)
    report.raise_if_failed()
    write_model_card(
        folder, meta, report, eval_results, model_name, getattr(model.config, "model_type", None)
    )
    after = _snapshot(folder)
    written = sorted(
        name for name, stat in after.items() if before.get(name) != stat or name == "README.md"
    )
    manifest = {"format": meta["format"], "files": {n: _sha256(folder / n) for n in written}}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return folder


@torch.no_grad()
def _check_written(folder: Path, model: nn.Module, meta: Mapping[str, Any]) -> None:
    """Every targeted weight on disk (by its on-disk name) equals the model's weight exactly."""
    files = _SafetensorsFiles(folder)
    modules = dict(model.named_modules())
    for disk, current in meta["current_names"].items():
        stored = files.get(f"{disk}.weight")
        weight = _full(modules[current].weight.detach()).cpu()
        if stored is None or not torch.equal(stored, weight):
            raise NMVerificationError(
                f"{folder}: the saved '{disk}.weight' is not the model's {current}.weight. The "
                f"on-disk name mapping is wrong for this model; save with "
                f"save_original_format=False and report this model class to nmsparse_hf."
            )


# ---------------------------------------------------------------------------------- model card
def write_model_card(
    folder: str | os.PathLike,
    meta: Mapping[str, Any],
    report: VerificationReport | None = None,
    eval_results: Mapping[str, Any] | None = None,
    model_name: str | None = None,
    model_type: str | None = None,
) -> Path:
    """Write ``README.md`` (`render_model_card`) into a saved checkpoint; verifies it first when no
    ``report`` is given. Returns the card's path."""
    folder = Path(folder)
    if report is None:
        report = verify_checkpoint(folder).raise_if_failed()
    card = render_model_card(
        meta,
        report,
        eval_results=eval_results,
        model_name=model_name or folder.resolve().name,
        model_type=model_type,
    )
    path = folder / "README.md"
    path.write_text(card, encoding="utf-8")
    return path


def _cell(value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:g}"
    elif isinstance(value, list | tuple):
        value = ", ".join(map(str, value))
    return str(value).replace("|", "\\|").replace("\n", " ")


def render_model_card(
    meta: Mapping[str, Any],
    report: VerificationReport,
    eval_results: Mapping[str, Any] | None = None,
    model_name: str = "N:M-sparse model",
    model_type: str | None = None,
) -> str:
    """The README.md of a sparse checkpoint, from ``templates/model_card.md``.

    ``meta`` is the `sparse_metadata` block, ``report`` the verification of the saved weights
    (one row per layer block, with on-disk names).
    """
    tags = TAGS + [t for t in (model_type, str(meta["recipe"]).lower()) if t]
    locs = meta.get("location_sparsity", {})
    location_rows = [
        f"| {loc} | {info['pattern'][0]}:{info['pattern'][1]} | {info['blocks']} | "
        f"{info['sparsity']:.4f} |"
        for loc, info in locs.items()
    ]
    layer_rows = [
        f"| `{c.name}` | {c.location} | {c.pattern[0]}:{c.pattern[1]} | "
        f"{'x'.join(map(str, c.shape))} | {c.sparsity:.4f} |"
        for c in report.layers
    ]
    recipe_rows = [
        f"| {_cell(k)} | {_cell(v)} |" for k, v in meta.get("config", {}).items() if v is not None
    ]
    if eval_results:
        eval_section = "| metric | value |\n|---|---|\n" + "\n".join(
            f"| {_cell(k)} | {_cell(v)} |" for k, v in eval_results.items()
        )
    else:
        eval_section = "No evaluation results were recorded."
    dim_words = (
        "input dimension of each weight (`row`)"
        if meta["sparse_dim"] == "row"
        else "output dimension of each weight (`col`)"
    )
    template = resources.files("nmsparse_hf").joinpath("templates/model_card.md").read_text("utf-8")
    return string.Template(template).substitute(
        tags="\n".join(f"- {json.dumps(t)}" for t in dict.fromkeys(tags)),
        model_name=model_name,
        recipe=meta["recipe"],
        dim_words=dim_words,
        sparse_dim=meta["sparse_dim"],
        achieved=f"{meta['achieved_sparsity']:.4f}",
        nonzeros=meta.get("nonzeros", "?"),
        numel=meta.get("numel", "?"),
        location_rows="\n".join(location_rows),
        num_layers=len(report.layers),
        layer_rows="\n".join(layer_rows),
        recipe_rows="\n".join(recipe_rows),
        eval_section=eval_section,
        repo_hint=model_name if model_name.count("/") == 1 else "path/to/checkpoint",
        library_version=meta.get("library_version", "?"),
        format=meta["format"],
    )


# ---------------------------------------------------------------------------------- Hub
def push_sparse_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    api: Any = None,
):
    """Upload a directory written by `save_sparse_pretrained` to the Hugging Face Hub.

    Verifies the checkpoint first (a failing one is not pushed), creates the model repo if needed
    (``exist_ok``) and uploads exactly the files of the save (its manifest; other files in the
    directory are not uploaded; files of the save edited since, such as the card, are uploaded as
    they are now) with ``HfApi.upload_folder``.

    Returns:
        What ``upload_folder`` returns (a ``CommitInfo``).

    Raises:
        NMVerificationError: the checkpoint does not verify. NMSparsityError: the directory was
            not written by `save_sparse_pretrained`.
    """
    folder = Path(folder)
    verify_checkpoint(folder).raise_if_failed()
    files = _manifest(folder)
    if "config.json" not in files:
        raise NMSparsityError(
            f"{folder}: no {MANIFEST} listing config.json, so this directory was not written by "
            f"save_sparse_pretrained. Save the model with it, then push that directory."
        )
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        allow_patterns=[glob.escape(name) for name in sorted(files)],
        commit_message=commit_message or "Upload N:M-sparse model (nmsparse_hf)",
        revision=revision,
        create_pr=create_pr,
    )
