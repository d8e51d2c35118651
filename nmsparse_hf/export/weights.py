"""Which weight files a checkpoint directory loads from, resolved exactly as ``from_pretrained``
resolves them, and read with ``safetensors`` only.

``from_pretrained`` on a local directory takes, in this order: the file named by
``config.json``'s ``transformers_weights``; ``model.safetensors``; ``model.safetensors.index.json``
(and the shards its ``weight_map`` lists); then pickled ``pytorch_model.bin`` files. So a
directory holding both a single file and an index loads the single file, whatever the index says.
`WeightFiles` follows the same order, refuses every path that leaves the directory (``..``,
absolute paths, symlinks pointing outside) and every entry that is not a regular file (a FIFO or a
device would block or never end), never unpickles anything, and records every tensor name stored
in more than one of the files it loads (`duplicates`): which copy loads is then not what the
index says, so verify refuses it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import torch

from ..errors import NMCheckpointError
from .metadata import read_json

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def inside(folder: Path, name: str, what: str) -> Path:
    """``folder / name``, refusing a name that resolves outside ``folder`` (``..``, an absolute
    path, or a symlink pointing elsewhere)."""
    if not isinstance(name, str) or not name or os.path.isabs(name):
        raise NMCheckpointError(
            f"{folder}: {what} names {name!r}, which is not a file name inside the checkpoint."
        )
    path = folder / name
    root = folder.resolve()
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as exc:  # symlink loops
        raise NMCheckpointError(f"{path}: cannot resolve the path ({exc}).") from None
    if resolved != root and root not in resolved.parents:
        raise NMCheckpointError(
            f"{folder}: {what} points to {name!r}, outside the checkpoint directory. A sparse "
            f"checkpoint keeps its weights in its own directory; refusing to read elsewhere."
        )
    return path


def regular_file(folder: Path, name: str, what: str) -> Path:
    """`inside`, and the entry must be a regular file (``os.stat`` before anything opens it: a
    FIFO, socket or device in place of a checkpoint file would block or never end).

    Raises:
        NMCheckpointError: the path leaves ``folder``, does not exist, or is not a regular file.
    """
    path = inside(folder, name, what)
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise NMCheckpointError(
            f"{folder}: {what} names {name!r}, which cannot be read ({exc.strerror})."
        ) from None
    if not stat.S_ISREG(mode):
        raise NMCheckpointError(
            f"{path}: {what} is not a regular file (a FIFO, socket, device or directory); a "
            f"checkpoint holds plain files only, so it is not opened."
        )
    return path


class WeightFiles:
    """The tensors ``from_pretrained`` would load from a checkpoint directory.

    Attributes:
        files: the weight files, in load order (names relative to the directory).
        index: the index file, or ``None`` for a single file.
        file_of: tensor name -> the file it is read from.
        duplicates: tensor name -> every loaded file that stores it, for names stored in more
            than one file (``{}`` for a sound checkpoint).

    Raises:
        NMCheckpointError: no safetensors weights (or only pickled ones), a path outside the
            directory, an unreadable index or safetensors file.
    """

    def __init__(self, folder: str | os.PathLike):
        from safetensors import safe_open

        self._open = safe_open
        self.folder = Path(folder)
        self.index: str | None = None
        self.duplicates: dict[str, list[str]] = {}
        explicit = self._explicit()
        if explicit is not None:
            self._load(explicit, "config.json 'transformers_weights'")
        elif (self.folder / SAFE_WEIGHTS).is_file():
            self._load(SAFE_WEIGHTS, SAFE_WEIGHTS)
        elif (self.folder / SAFE_INDEX).is_file():
            self._load(SAFE_INDEX, SAFE_INDEX)
        else:
            pickled = [n for n in PICKLED_WEIGHTS if (self.folder / n).is_file()]
            found = (
                f" (only pickled {pickled[0]}, which is never unpickled here)" if pickled else ""
            )
            raise NMCheckpointError(
                f"{self.folder}: no {SAFE_WEIGHTS} or {SAFE_INDEX}{found}. Sparse checkpoints are "
                f"verified from safetensors files only; save with save_sparse_pretrained."
            )

    def _explicit(self) -> str | None:
        config = self.folder / "config.json"
        if not config.is_file():
            return None
        data = read_json(config, "model config")
        name = data.get("transformers_weights") if isinstance(data, dict) else None
        if name is not None and not (
            isinstance(name, str) and name.endswith((".safetensors", ".safetensors.index.json"))
        ):
            raise NMCheckpointError(
                f"{config}: transformers_weights = {name!r} is neither a .safetensors file nor a "
                f".safetensors.index.json index."
            )
        return name

    def _load(self, name: str, what: str) -> None:
        if not os.path.exists(inside(self.folder, name, what)):
            raise NMCheckpointError(f"{self.folder}: {what} names {name!r}, which does not exist.")
        path = regular_file(self.folder, name, what)
        if not name.endswith(".index.json"):
            self.files = [name]
            self.file_of = dict.fromkeys(self._keys(path), path)
            return
        self.index = name
        data = read_json(path, "safetensors index")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise NMCheckpointError(
                f"{path}: not a safetensors index (expected a 'weight_map' of tensor name -> "
                f"shard file name)."
            )
        shards = {
            v: regular_file(self.folder, v, f"{name}'s weight_map") for v in weight_map.values()
        }
        self.files = sorted(shards)
        self.file_of = {key: shards[shard] for key, shard in weight_map.items()}
        holders: dict[str, list[str]] = {}
        for shard in self.files:
            for key in self._keys(shards[shard]):
                holders.setdefault(key, []).append(shard)
        self.duplicates = {k: files for k, files in holders.items() if len(files) > 1}

    def _keys(self, file: Path) -> list[str]:
        try:
            with self._open(str(file), framework="pt") as handle:
                return list(handle.keys())
        except Exception as exc:  # safetensors raises its own error types (e.g. header too large)
            raise NMCheckpointError(f"{file}: unreadable safetensors file ({exc}).") from None

    def get(self, key: str) -> torch.Tensor | None:
        """The tensor stored under ``key``, or None when the checkpoint has no such tensor."""
        file = self.file_of.get(key)
        if file is None:
            return None
        try:
            with self._open(str(file), framework="pt") as handle:
                if key not in handle.keys():
                    return None
                return handle.get_tensor(key)
        except Exception as exc:
            raise NMCheckpointError(f"{file}: cannot read tensor {key!r} ({exc}).") from None
