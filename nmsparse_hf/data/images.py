"""Reading images safely: decode with the file named on failure (`decode_image`), a fast check
of local image files before training (`find_bad_images`), and 16-bit and float images brought to
the 8-bit range the transforms expect (`to_8bit`)."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from .arguments import DataArgumentsError

# A JPEG ends with the EOI marker; a file cut short lacks it (checked in its last bytes, since
# some writers pad after EOI).
_JPEG_EOI = b"\xff\xd9"
_TAIL_BYTES = 4096

# Single-channel modes deeper than 8 bits -> the factor to the 0..255 range of mode "L": PIL reads
# 16-bit PNGs and TIFFs as "I;16"/"I;16B" (or "I"), 0..65535; float TIFFs as "F", taken to hold
# 0..1 as float images usually do. `Image.convert("RGB")` clips such values at 255 instead.
HIGH_DEPTH_SCALE = {
    "I;16": 1 / 257,
    "I;16L": 1 / 257,
    "I;16B": 1 / 257,
    "I;16N": 1 / 257,
    "I": 1 / 257,
    "F": 255.0,
}


class BadImageError(DataArgumentsError):
    """An image cannot be read: the message names its file (or example) and what to do."""


def _unreadable() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "not a readable image", PIL's decompression-bomb refusal (an image
    of more than twice ``PIL.Image.MAX_IMAGE_PIXELS`` pixels) included."""
    from PIL import Image

    return (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def to_8bit(image):
    """``image`` in an 8-bit mode: a 16-bit image (modes ``I;16*`` and ``I``, 0..65535) is divided
    by 257, a float image (mode ``F``, taken as 0..1) multiplied by 255, both rounded, clipped to
    0..255 (NaN becomes 0) and returned in mode ``L``; any other image is returned unchanged."""
    from PIL import Image

    scale = HIGH_DEPTH_SCALE.get(image.mode)
    if scale is None:
        return image
    values = np.nan_to_num(np.asarray(image, dtype=np.float64) * scale, posinf=255.0)
    return Image.fromarray(np.round(np.clip(values, 0.0, 255.0)).astype(np.uint8), mode="L")


def describe(value: Any, where: str = "") -> str:
    """A human name for an image value: its path when known, else ``where``."""
    if isinstance(value, Mapping) and value.get("path"):
        return str(value["path"])
    path = getattr(value, "filename", None)
    return str(path) if path else (where or "an in-memory image")


def decode_image(value: Any, where: str = ""):
    """Decode ``value`` into a fully loaded RGB-convertible `PIL.Image`.

    ``value`` is a `PIL.Image`, a ``{"bytes", "path"}`` dict (a `datasets.Image(decode=False)`
    column), raw bytes or a path. Raises `BadImageError` naming the file (or ``where``, e.g. the
    example index) when the data is not a readable image, is truncated or is larger than PIL's
    decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``).
    """
    from PIL import Image

    try:
        if isinstance(value, Image.Image):
            value.load()
            return value
        if isinstance(value, Mapping):
            data, path = value.get("bytes"), value.get("path")
            image = Image.open(io.BytesIO(data) if data is not None else path)
        elif isinstance(value, bytes | bytearray):
            image = Image.open(io.BytesIO(value))
        else:
            image = Image.open(value)
        image.load()
        return image
    except _unreadable() as err:
        raise BadImageError(
            f"bad image {describe(value, where)}: {type(err).__name__}: {err}. Replace or delete "
            "the file, or set bad_images='skip' to leave unreadable images out."
        ) from err


def check_image_file(path: str) -> str | None:
    """``None`` if ``path`` looks like a readable image, else the reason.

    Fast: parses the header, checks that a JPEG still ends with its end marker and fully decodes
    only the files that fail that check (most truncated files). An image over PIL's
    decompression-bomb limit is reported too.
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            image_format = image.format
        if image_format == "JPEG":
            size = os.path.getsize(path)
            with open(path, "rb") as fh:
                fh.seek(max(0, size - _TAIL_BYTES))
                if _JPEG_EOI in fh.read():
                    return None
        elif image_format != "PNG":
            return None
        with Image.open(path) as image:  # PNG CRCs and suspicious JPEGs: decode fully
            image.load()
        return None
    except _unreadable() as err:
        return f"{type(err).__name__}: {err}"


def find_bad_images(paths: Sequence[str], workers: int = 8) -> dict[str, str]:
    """``{path: reason}`` for the files of ``paths`` that are not readable images (see
    `check_image_file`); the files are read by ``workers`` threads."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        reasons = list(pool.map(check_image_file, paths))
    return {p: r for p, r in zip(paths, reasons, strict=True) if r is not None}


def image_paths(dataset, image_column: str) -> list[str | None] | None:
    """The file path of every row of a map-style dataset's image column (``None`` for a row whose
    bytes are stored in the dataset), or ``None`` when no image is a local file (Hub parquet
    bytes, in-memory images). Reads only the column's paths, through Arrow: no image is loaded."""
    import datasets
    import pyarrow.compute as pc

    if isinstance(dataset, datasets.IterableDataset):
        return None
    if not isinstance(dataset.features.get(image_column), datasets.Image):
        return None
    paths: list[str | None] = []
    for batch in dataset.with_format("arrow").iter(batch_size=65536):
        column = batch[image_column]
        local = pc.is_null(pc.struct_field(column, "bytes")).to_pylist()
        names = pc.struct_field(column, "path").to_pylist()
        paths += [name if is_local else None for name, is_local in zip(names, local, strict=True)]
    return paths if any(paths) else None


def format_bad_images(bad: Mapping[str, str], limit: int = 20) -> str:
    """One line per bad file (at most ``limit``), and how many more."""
    lines = [f"  {path}: {reason}" for path, reason in list(bad.items())[:limit]]
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit} more")
    return "\n".join(lines)
