"""The ``nm_sparsity`` block of a sparse checkpoint: one typed record, written and read as JSON.

`SparseCheckpointMetadata` is what a sparse checkpoint says about itself (docs/METHOD.md,
"Checkpoint format"): the target patterns, the group dimension, the recipe, the exact counts
behind the achieved sparsity and, per targeted layer, its blocks (`LayerBlock`). Layers are keyed
by the names their weights have **in the files** (``save_pretrained`` reverts the module renames
of transformers 5.x, e.g. ``vit.layers.0.mlp.fc1`` is written as
``vit.encoder.layer.0.intermediate.dense``); ``current_names`` pairs each with the module name of
the model that was saved, so a model loaded back with plain ``from_pretrained`` can be checked
too (`layers_current`).

Reading is JSON only: no code from a checkpoint runs, nothing is unpickled. `from_dict` is the one
validator: any structural defect (a wrong type, a missing field, a format this version cannot
read) raises `NMCheckpointError` naming the field; whether the claims agree with each other and
with the weights is `verify_checkpoint`'s job.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import LOCATIONS, SPARSE_DIMS
from ..errors import NMCheckpointError
from ..names import on_disk_names  # noqa: F401 - the one name map, re-exported here

CONFIG_KEY = "nm_sparsity"
FORMAT_NAME = "nmsparse_hf"
FORMAT_VERSION = 1
MANIFEST = ".nmsparse_manifest.json"
MAX_JSON_BYTES = 64 << 20  # a config.json larger than this is not a model config


# ---------------------------------------------------------------------------------- JSON input
def read_json(path: Path, what: str) -> Any:
    """Parse a small JSON file, mapping every way it can be unreadable to `NMCheckpointError`
    (missing, not a regular file, too large, not UTF-8, invalid or absurdly nested JSON). The
    entry is checked with ``os.stat`` before it is opened: a FIFO or device would block."""
    try:
        info = path.stat()
    except OSError as exc:
        raise NMCheckpointError(f"{path}: cannot read the {what} ({exc.strerror}).") from None
    if not stat.S_ISREG(info.st_mode):
        raise NMCheckpointError(
            f"{path}: the {what} is not a regular file (a FIFO, socket, device or directory); "
            f"it is not opened."
        )
    size = info.st_size
    if size > MAX_JSON_BYTES:
        raise NMCheckpointError(
            f"{path}: the {what} is {size} bytes, over the {MAX_JSON_BYTES} bytes any model "
            f"config needs; this is not a checkpoint nmsparse_hf wrote."
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise NMCheckpointError(f"{path}: cannot read the {what} ({exc.strerror}).") from None
    except UnicodeDecodeError:
        raise NMCheckpointError(f"{path}: the {what} is not UTF-8 text.") from None
    except json.JSONDecodeError as exc:
        raise NMCheckpointError(
            f"{path}: the {what} is not valid JSON (line {exc.lineno}, column {exc.colno}: "
            f"{exc.msg})."
        ) from None
    except RecursionError:
        raise NMCheckpointError(
            f"{path}: the {what} is JSON nested too deeply to read (no model config is)."
        ) from None


# ---------------------------------------------------------------------------------- typed fields
def _fail(source: str, what: str) -> NMCheckpointError:
    return NMCheckpointError(
        f"{source}: invalid {CONFIG_KEY} metadata: {what}. The block is written by "
        f"nmsparse_hf.save_sparse_pretrained; re-save the checkpoint with it."
    )


def _int(value: Any, name: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(source, f"{name} = {value!r} is not an integer")
    return value


def _number(value: Any, name: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise _fail(source, f"{name} = {value!r} is not a number")
    return float(value)


def _str(value: Any, name: str, source: str) -> str:
    if not isinstance(value, str):
        raise _fail(source, f"{name} = {value!r} is not a string")
    return value


def _mapping(value: Any, name: str, source: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _fail(source, f"{name} = {value!r} is not a JSON object")
    return value


def _pattern(value: Any, name: str, source: str) -> tuple[int, int]:
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise _fail(source, f"{name} = {value!r} is not a pattern [n_keep, m]")
    return (_int(value[0], f"{name}[0]", source), _int(value[1], f"{name}[1]", source))


@dataclass(frozen=True)
class LayerBlock:
    """One N:M-sparse block of a layer's weight.

    Attributes:
        location: ``FF``, ``Q``, ``K``, ``V``, ``O`` or ``C``.
        n_keep, m: the block's pattern (N weights kept in every group of M).
        rows: ``(start, stop)`` rows of the weight as the layer computes with it (a fused qkv
            split into Q/K/V), or ``None`` for the whole weight.
        fan_in_fan_out: the stored weight is ``[in, out]`` (GPT-2's ``Conv1D``), the transpose of
            a Linear's ``[out, in]``; groups still run along the input dimension, which is
            then the stored tensor's first axis.
    """

    location: str
    n_keep: int
    m: int
    rows: tuple[int, int] | None = None
    fan_in_fan_out: bool = False

    @property
    def pattern(self) -> tuple[int, int]:
        """``(n_keep, m)``."""
        return (self.n_keep, self.m)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``fan_in_fan_out`` only when true)."""
        out: dict[str, Any] = {
            "location": self.location,
            "rows": list(self.rows) if self.rows else None,
            "n_keep": self.n_keep,
            "m": self.m,
        }
        if self.fan_in_fan_out:
            out["fan_in_fan_out"] = True
        return out

    @classmethod
    def from_dict(cls, data: Any, source: str) -> LayerBlock:
        """Read a block, checking every field's type; raises `NMCheckpointError`."""
        spec = _mapping(data, "a block", source)
        rows = spec.get("rows")
        if rows is not None:
            rows = _pattern(rows, "rows", source)
        flag = spec.get("fan_in_fan_out", False)
        if not isinstance(flag, bool):
            raise _fail(source, f"fan_in_fan_out = {flag!r} is not true or false")
        return cls(
            location=_str(spec.get("location"), "location", source),
            n_keep=_int(spec.get("n_keep"), "n_keep", source),
            m=_int(spec.get("m"), "m", source),
            rows=rows,
            fan_in_fan_out=flag,
        )


@dataclass(frozen=True)
class LocationSummary:
    """Per location: its pattern, how many blocks it has and their sparsity."""

    pattern: tuple[int, int]
    blocks: int
    sparsity: float

    def to_dict(self) -> dict[str, Any]:
        return {"pattern": list(self.pattern), "blocks": self.blocks, "sparsity": self.sparsity}

    @classmethod
    def from_dict(cls, data: Any, source: str) -> LocationSummary:
        spec = _mapping(data, "a location_sparsity entry", source)
        return cls(
            pattern=_pattern(spec.get("pattern"), "location_sparsity pattern", source),
            blocks=_int(spec.get("blocks"), "location_sparsity blocks", source),
            sparsity=_number(spec.get("sparsity"), "location_sparsity sparsity", source),
        )


def location_order(location: str) -> tuple[int, str]:
    """Sort key: the order of `LOCATIONS`, unknown names last."""
    return (LOCATIONS.index(location) if location in LOCATIONS else len(LOCATIONS), location)


@dataclass
class SparseCheckpointMetadata:
    """The ``nm_sparsity`` block of a sparse checkpoint's ``config.json``.

    Attributes:
        n_keep, m, n_keep_qkv, m_qkv: the target patterns (FF/O/C and Q/K/V).
        sparse_dim: ``row`` (groups along a weight's input dimension) or ``col``.
        locations: location -> its target pattern, for the locations that have layers.
        recipe: the recipe's short name (``MDGF-exp``, ``SR-STE`` ...).
        config: the `NMSparsityConfig` the model was trained with (``to_dict``).
        layers: on-disk layer name -> its blocks.
        current_names: on-disk layer name -> module name in the saving model.
        nonzeros, numel: non-zero and total entries of all targeted blocks.
        achieved_sparsity: ``1 - nonzeros / numel``.
        location_sparsity: per location, its pattern, block count and sparsity.
        library_version: the nmsparse_hf version that wrote the checkpoint.
        format_version: the version of this record's layout (`FORMAT_VERSION`).
        one_shot: how the weights were first pruned, when the model started from
            `nmsparse_hf.one_shot`: ``method`` (magnitude, wanda, sparsegpt), calibration
            ``samples`` and ``tokens``, and whether sparse ``trained`` followed; None otherwise.
    """

    n_keep: int
    m: int
    n_keep_qkv: int
    m_qkv: int
    sparse_dim: str
    locations: dict[str, tuple[int, int]]
    recipe: str
    config: dict[str, Any]
    layers: dict[str, list[LayerBlock]]
    current_names: dict[str, str]
    nonzeros: int
    numel: int
    achieved_sparsity: float
    location_sparsity: dict[str, LocationSummary] = field(default_factory=dict)
    library_version: str = ""
    format_version: int = FORMAT_VERSION
    one_shot: dict[str, Any] | None = None
    # the ``layers_current`` a file states (derived data: verify compares it with `layers_current`)
    stated_layers_current: dict[str, list[LayerBlock]] | None = field(
        default=None, repr=False, compare=False
    )

    @property
    def format(self) -> str:
        """``"nmsparse_hf/<version>"``, the string stored under ``format``."""
        return f"{FORMAT_NAME}/{self.format_version}"

    @property
    def layers_current(self) -> dict[str, list[LayerBlock]]:
        """The layers keyed by the saving model's module names."""
        return {self.current_names.get(disk, disk): blocks for disk, blocks in self.layers.items()}

    def to_dict(self) -> dict[str, Any]:
        """The JSON-safe block written to ``config.json`` (`from_dict` reads it back)."""
        return {
            "format": self.format,
            "library_version": self.library_version,
            "n_keep": self.n_keep,
            "m": self.m,
            "n_keep_qkv": self.n_keep_qkv,
            "m_qkv": self.m_qkv,
            "sparse_dim": self.sparse_dim,
            "locations": {loc: list(p) for loc, p in self.locations.items()},
            "recipe": self.recipe,
            "config": dict(self.config),
            "layers": {n: [b.to_dict() for b in bs] for n, bs in self.layers.items()},
            "layers_current": {
                n: [b.to_dict() for b in bs] for n, bs in self.layers_current.items()
            },
            "current_names": dict(self.current_names),
            "nonzeros": self.nonzeros,
            "numel": self.numel,
            "achieved_sparsity": self.achieved_sparsity,
            "location_sparsity": {k: v.to_dict() for k, v in self.location_sparsity.items()},
            **({"one_shot": dict(self.one_shot)} if self.one_shot is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = CONFIG_KEY) -> SparseCheckpointMetadata:
        """Read and type-check a block; raises `NMCheckpointError` naming the first bad field.

        Whether the fields agree with each other (``layers_current`` with ``layers`` under
        ``current_names``, the patterns, the counts) is checked by `verify_checkpoint`.
        """
        meta = _mapping(data, CONFIG_KEY, source)
        version = _format_version(meta.get("format"), source)
        dim = meta.get("sparse_dim")
        if dim not in SPARSE_DIMS:
            raise _fail(source, f"sparse_dim = {dim!r}, expected one of {list(SPARSE_DIMS)}")
        layers = _layers(meta.get("layers"), "layers", source)
        names = _mapping(meta.get("current_names", {n: n for n in layers}), "current_names", source)
        current_names = {
            _str(k, "current_names key", source): _str(v, k, source) for k, v in names.items()
        }
        out = cls(
            n_keep=_int(meta.get("n_keep"), "n_keep", source),
            m=_int(meta.get("m"), "m", source),
            n_keep_qkv=_int(meta.get("n_keep_qkv", meta.get("n_keep")), "n_keep_qkv", source),
            m_qkv=_int(meta.get("m_qkv", meta.get("m")), "m_qkv", source),
            sparse_dim=dim,
            locations={
                _str(loc, "locations key", source): _pattern(p, f"locations[{loc!r}]", source)
                for loc, p in _mapping(meta.get("locations"), "locations", source).items()
            },
            recipe=_str(meta.get("recipe"), "recipe", source),
            config=dict(_mapping(meta.get("config", {}), "config", source)),
            layers=layers,
            current_names=current_names,
            nonzeros=_int(meta.get("nonzeros"), "nonzeros", source),
            numel=_int(meta.get("numel"), "numel", source),
            achieved_sparsity=_number(meta.get("achieved_sparsity"), "achieved_sparsity", source),
            location_sparsity={
                _str(loc, "location_sparsity key", source): LocationSummary.from_dict(v, source)
                for loc, v in _mapping(
                    meta.get("location_sparsity", {}), "location_sparsity", source
                ).items()
            },
            library_version=str(meta.get("library_version", "")),
            format_version=version,
            one_shot=_one_shot(meta.get("one_shot"), source),
        )
        if "layers_current" in meta:
            out.stated_layers_current = _layers(meta["layers_current"], "layers_current", source)
        return out


def _one_shot(value: Any, source: str) -> dict[str, Any] | None:
    """The ``one_shot`` record, type-checked (absent: None)."""
    if value is None:
        return None
    record = _mapping(value, "one_shot", source)
    trained = record.get("trained")
    if not isinstance(trained, bool):
        raise _fail(source, f"one_shot trained = {trained!r} is not true or false")
    return {
        "method": _str(record.get("method"), "one_shot method", source),
        "samples": _int(record.get("samples"), "one_shot samples", source),
        "tokens": _int(record.get("tokens"), "one_shot tokens", source),
        "trained": trained,
    }


def _format_version(value: Any, source: str) -> int:
    prefix = f"{FORMAT_NAME}/"
    if not isinstance(value, str) or not value.startswith(prefix):
        raise _fail(source, f"format = {value!r}, expected '{prefix}<version>'")
    tail = value[len(prefix) :]
    if not tail.isdigit():
        raise _fail(source, f"format = {value!r}, expected '{prefix}<version>'")
    version = int(tail)
    if version > FORMAT_VERSION:
        raise NMCheckpointError(
            f"{source}: {CONFIG_KEY} format {value!r} was written by a newer nmsparse_hf (this "
            f"one reads up to {prefix}{FORMAT_VERSION}). Upgrade: pip install -U nmsparse_hf."
        )
    return version


def _layers(value: Any, name: str, source: str) -> dict[str, list[LayerBlock]]:
    layers = value if isinstance(value, Mapping) else None
    if not layers:
        raise _fail(source, f"{name!r} must map layer names to their blocks, got {value!r}")
    out = {}
    for layer, blocks in layers.items():
        if not isinstance(blocks, list) or not blocks:
            raise _fail(source, f"{name}[{layer!r}] = {blocks!r} is not a list of blocks")
        out[_str(layer, f"{name} key", source)] = [
            LayerBlock.from_dict(b, f"{source}: {name}[{layer!r}] has block {b!r}") for b in blocks
        ]
    return out


def load_sparse_metadata(path: str | os.PathLike) -> SparseCheckpointMetadata:
    """The ``nm_sparsity`` block of a checkpoint directory (or of its ``config.json``).

    Raises:
        NMCheckpointError: no or unreadable config.json, no ``nm_sparsity`` block (the
            checkpoint was not saved by `save_sparse_pretrained`), or a malformed block.
    """
    path = Path(path)
    config = path / "config.json" if path.is_dir() else path
    if not os.path.lexists(config):
        raise NMCheckpointError(
            f"{config}: no such file. Pass a checkpoint directory saved by "
            f"save_sparse_pretrained (it holds config.json)."
        )
    data = read_json(config, "model config")
    if not isinstance(data, dict) or CONFIG_KEY not in data:
        raise NMCheckpointError(
            f"{config}: no {CONFIG_KEY!r} block, so nothing says which layers are N:M. Save the "
            f"model with nmsparse_hf.save_sparse_pretrained."
        )
    return SparseCheckpointMetadata.from_dict(data[CONFIG_KEY], str(config))
