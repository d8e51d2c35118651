"""Checks of a classification dataset's labels that both recipes (image and text) run before
training: an evaluation label that no training example has is a wrong label set, not a class."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from .arguments import DataArgumentsError

_SHOWN = 10  # labels named in a message before "... and N more"


def check_eval_labels(
    train_labels: Iterable[Any],
    eval_labels: Iterable[Any],
    split_name: str,
    names: Sequence[str] | None = None,
) -> None:
    """Raise `DataArgumentsError` when the ``split_name`` split has labels that no training
    example has.

    ``train_labels`` / ``eval_labels`` are the label values of the two splits (class ids or class
    names; repeats are fine, e.g. ``dataset.unique(column)`` or the whole column); values are
    compared as strings, as the text recipe maps a name to its id. ``names``, the class names
    indexed by class id (a `datasets.ClassLabel`'s), names integer ids in the message. A
    classifier cannot learn such a class: it would be an extra output never trained (image
    folders) or a failed lookup (text).
    """
    known = {str(value): value for value in train_labels}
    unseen = {str(value): value for value in eval_labels if str(value) not in known}
    if not unseen:
        return
    shown = _show([_named(unseen[key], names) for key in sorted(unseen)])
    trained = _show([_named(known[key], names) for key in sorted(known)])
    raise DataArgumentsError(
        f"{split_name} split: label(s) {shown} never occur in the training split (its labels: "
        f"{trained}); a classifier cannot learn them. Add training examples of them, remove them "
        f"from the {split_name} split, or evaluate on another split."
    )


def _named(value: Any, names: Sequence[str] | None) -> Any:
    """``names[value]`` for an integer class id within ``names``, else ``value``."""
    if names is not None and isinstance(value, int) and 0 <= value < len(names):
        return names[value]
    return value


def _show(values: Sequence[Any]) -> str:
    """A bounded list for a one-line message: the first `_SHOWN` values and how many more."""
    text = repr(list(values[:_SHOWN]))
    return text + (f" ... and {len(values) - _SHOWN} more" if len(values) > _SHOWN else "")
