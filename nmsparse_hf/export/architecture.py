"""What the recorded config and architecture of a checkpoint say its sparse layers must be.

`verify_checkpoint` does not take the metadata's word for which layers are sparse or how their
blocks lie: the architecture ``config.json`` records is built on the meta device (no weights, no
code from the checkpoint: only classes of the installed transformers), the recorded sparsity
config selects its targets (`find_targets`, as training did), and each target's on-disk name and
blocks follow (`on_disk_names`; rows of a fused projection; ``fan_in_fan_out`` only for GPT-2's
``Conv1D``). A checkpoint whose config or architecture cannot be read or built here fails: its
metadata could otherwise hide a dense layer by not naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import NMSparsityConfig
from ..errors import NMSparsityError
from ..names import on_disk_names
from .metadata import LayerBlock, SparseCheckpointMetadata, read_json


@dataclass(frozen=True)
class ExpectedLayer:
    """A layer the recorded config targets in the recorded architecture."""

    current: str
    disk: str
    cls: str
    blocks: tuple[tuple[str, tuple[int, int] | None, bool], ...]
    rows: int  # output rows of the weight as a Linear lays it out


class LayoutUnknown(Exception):
    """The recorded config or architecture cannot be read or built here (the reason)."""


def _model(config_path: Path) -> Any:
    data = read_json(config_path, "model config")
    if not isinstance(data, dict):
        raise LayoutUnknown("config.json is not a JSON object")
    import transformers
    from transformers import CONFIG_MAPPING

    model_type = data.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise LayoutUnknown(f"model_type {model_type!r} is not known to this transformers")
    names = data.get("architectures") or []
    classes = [getattr(transformers, a, None) for a in names if isinstance(a, str)]
    cls = next((c for c in classes if isinstance(c, type)), None)
    if cls is None:
        raise LayoutUnknown(
            f"architectures {names!r} name no class of this transformers (code from a "
            f"checkpoint is never run)"
        )
    try:
        config = CONFIG_MAPPING[model_type].from_dict(data)
        with torch.device("meta"):
            return cls(config)
    except Exception as exc:  # noqa: BLE001 - whatever the class raises, it cannot be built here
        raise LayoutUnknown(f"{cls.__name__} cannot be built here ({exc})") from None


def expected_layers(config_path: Path, meta: SparseCheckpointMetadata) -> list[ExpectedLayer]:
    """The layers the recorded sparsity config targets in the architecture of ``config_path``.

    Raises:
        LayoutUnknown: no recorded sparsity config, or the architecture cannot be built.
    """
    if not meta.config:
        raise LayoutUnknown("the metadata records no sparsity config")
    try:
        config = NMSparsityConfig.from_dict(meta.config)
    except NMSparsityError as exc:
        raise LayoutUnknown(f"the recorded sparsity config is invalid ({exc})") from None
    model = _model(config_path)
    from ..targets import find_targets

    try:
        targets, _ = find_targets(model, config)
        saved_original = set(meta.layers) != set(meta.current_names.values())
        disk = on_disk_names(model, [t.name for t in targets], save_original_format=saved_original)
    except NMSparsityError as exc:
        raise LayoutUnknown(f"its targets cannot be resolved ({exc})") from None
    return [
        ExpectedLayer(
            current=t.name,
            disk=disk[t.name],
            cls=type(t.module).__name__,
            blocks=tuple((b.location, b.rows, t.fan_in_fan_out) for b in t.blocks),
            rows=t.shape[0],
        )
        for t in targets
    ]


def _rows_text(blocks: list[tuple[str, tuple[int, int] | None, bool]], total: int) -> str:
    return ", ".join(f"{loc} rows {list(rows) if rows else [0, total]}" for loc, rows, _ in blocks)


def layer_problem(layer: ExpectedLayer, recorded: list[LayerBlock]) -> str | None:
    """One line when ``recorded`` (the metadata's blocks of ``layer``) are not the blocks the
    recorded config gives it: other locations or row ranges (a block covering one row of an
    otherwise dense layer), or ``fan_in_fan_out`` on a layer that is not a Conv1D."""
    got = [(b.location, tuple(b.rows) if b.rows else None, b.fan_in_fan_out) for b in recorded]
    want = list(layer.blocks)
    if sorted(got, key=repr) == sorted(want, key=repr):
        return None
    flags = {f for _, _, f in got}
    if flags != {f for _, _, f in want}:
        axis = "stored [in, out]" if want[0][2] else "stored [out, in]"
        return (
            f"{layer.disk}: metadata says fan_in_fan_out = {sorted(flags)} but the recorded "
            f"architecture makes it a {layer.cls} ({axis}, fan_in_fan_out = {want[0][2]}); its "
            f"groups would be checked along the wrong axis"
        )
    return (
        f"{layer.disk}: metadata blocks cover {_rows_text(got, layer.rows)} but the recorded "
        f"config makes {_rows_text(want, layer.rows)} of its {layer.rows} rows sparse"
    )


def architecture_problems(config_path: Path, meta: SparseCheckpointMetadata) -> list[str]:
    """Every way the metadata disagrees with what the recorded config targets in the recorded
    architecture: a targeted layer left out (one line for all), a layer under another on-disk
    name, blocks that differ (`layer_problem`). A config or architecture that cannot be read or
    built is itself a problem."""
    try:
        expected = expected_layers(config_path, meta)
    except LayoutUnknown as exc:
        return [
            f"coverage cannot be checked: {exc}. Without the recorded config and architecture "
            f"nothing shows which layers must be sparse, so a dense layer could be left out of "
            f"the metadata"
        ]
    by_current = meta.layers_current
    missing, problems = [], []
    for layer in expected:
        recorded = by_current.get(layer.current)
        if recorded is None:
            missing.append(layer.current)
            continue
        stored = [d for d, c in meta.current_names.items() if c == layer.current]
        if stored and layer.disk not in stored:
            problems.append(
                f"{stored[0]}: metadata pairs it with module {layer.current}, which this "
                f"architecture saves as {layer.disk}"
            )
        problem = layer_problem(layer, recorded)
        if problem:
            problems.append(problem)
    if missing:
        problems.insert(
            0,
            f"metadata omits {len(missing)} layer(s) its config targets in this architecture "
            f"({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}): their N:M layout "
            f"is not recorded, so it cannot be trusted",
        )
    return problems
