"""The one map between a model's module names and the names its checkpoint files use.

transformers 5.x renamed the modules of several families (ViT ``vit.layers.0.mlp.fc1``, Swin
``...attention.q_proj``) while ``save_pretrained`` still writes the older names that every version
reads (``vit.encoder.layer.0.intermediate.dense``): before writing, it passes the state_dict
through ``transformers.core_model_loading.revert_weight_conversion``, which reads the model's
conversion mapping (``transformers/conversion_mapping.py``, or the one ``from_pretrained``
recorded on the model). Every name translation of this library goes through this module, and
this module asks that very function; nothing is guessed from name patterns:

* `saved_keys`: the state_dict keys a module's weight is written under (paired by tensor
  identity: a rename hands the same tensor object through);
* `on_disk_names`: module name -> name in the files, for the layers a checkpoint records
  (strict: a weight that is not plainly renamed is an error);
* `checkpoint_names`: the same map where it differs, for matching user patterns (lenient);
* `layers_for_model`: which of a checkpoint's two layer maps (on-disk or current names) a
  loaded model's modules carry;
* `stored_under_other_names`: whether a checkpoint's keys miss some of a model's own keys (so
  it must be read through ``from_pretrained``, which knows the renaming).

Importing this module does not import transformers.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import nn

from .errors import NMSparsityError

Revert = Callable[[nn.Module, dict], dict]


def save_time_conversion() -> Revert | None:
    """transformers' own save-time renaming (``revert_weight_conversion``, 5.x), or None where it
    does not exist (4.x saves the module names as they are)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return None
    return revert_weight_conversion


def saved_keys(model: nn.Module, names: Iterable[str], revert: Revert) -> dict[str, list[str]]:
    """``{module name: the state_dict keys its weight is saved under}`` after ``revert`` (the
    save-time key conversion, `save_time_conversion`).

    Tensors are paired by identity: a rename hands the same tensor object through, so nothing is
    guessed from names, shapes or values. A weight the conversion transforms rather than renames
    (a fuse/split converter) gets no key; a plain rename gets exactly one.
    """
    state = model.state_dict()
    saved = revert(model, dict(state))
    keys_of: dict[int, list[str]] = {}
    for key, tensor in saved.items():
        keys_of.setdefault(id(tensor), []).append(key)
    return {
        name: keys_of.get(id(state[f"{name}.weight"]), []) if f"{name}.weight" in state else []
        for name in names
    }


def on_disk_names(
    model: nn.Module, names: Iterable[str], save_original_format: bool = True
) -> dict[str, str]:
    """Map module names of ``model`` to the names its ``save_pretrained`` checkpoint uses.

    Exact by construction: the model's ``state_dict()`` is passed through the very function
    ``save_pretrained`` applies before writing (`save_time_conversion`, which reads the model's
    conversion mapping, including the one recorded by ``from_pretrained``), and each weight is
    found in the result by the **identity** of its tensor object (`saved_keys`). A weight that the
    conversion transforms rather than renames (a fuse/split converter) has no single name on disk
    and is an error.

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
    revert = save_time_conversion() if save_original_format else None
    if revert is None:
        return {n: n for n in names}
    out = {}
    for name, keys in saved_keys(model, names, revert).items():
        if len(keys) != 1 or not keys[0].endswith(".weight"):
            found = f"under {keys}" if keys else "transformed (not a plain rename)"
            raise NMSparsityError(
                f"{name}.weight: save_pretrained writes this weight {found}, so its N:M layout "
                f"cannot be recorded by name. Save with save_original_format=False (the current "
                f"names), or exclude this layer from sparsity."
            )
        out[name] = keys[0].removesuffix(".weight")
    return out


def checkpoint_names(model: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """``{current module name: name in the checkpoint files}`` for the given modules whose weight
    ``save_pretrained`` writes under another name (transformers 5.x reverts module renames such
    as ``vit.layers.0.mlp.fc1`` -> ``vit.encoder.layer.0.intermediate.dense``).

    Computed with `saved_keys` and transformers' own conversion, only when transformers is
    already imported and ``model`` is a ``PreTrainedModel``; otherwise, and for weights the
    conversion transforms rather than renames, nothing is returned.
    """
    transformers = sys.modules.get("transformers")
    if transformers is None or not isinstance(model, transformers.PreTrainedModel):
        return {}
    revert = save_time_conversion()
    if revert is None:
        return {}
    try:
        keys = saved_keys(model, names, revert)
    except Exception:  # older transformers, or a conversion this model cannot run: no aliases
        return {}
    return {
        name: found[0].removesuffix(".weight")
        for name, found in keys.items()
        if len(found) == 1 and found[0].endswith(".weight") and found[0] != f"{name}.weight"
    }


def layers_for_model(
    meta: Mapping[str, Any], module_names: Iterable[str]
) -> dict[str, list] | None:
    """The layer map of a checkpoint's ``nm_sparsity`` block (a JSON dict) keyed the way a loaded
    model names its modules.

    A checkpoint names its layers twice: ``layers`` (as saved on disk) and ``layers_current``
    (the saving model's module names); which one a loaded model carries depends on its
    transformers version. Returns the first of ``layers_current``, ``layers`` whose names are all
    in ``module_names``, else the first non-empty one (its missing names are then reported by the
    caller), or None when the block has neither.
    """
    names = set(module_names)
    candidates = [meta.get("layers_current"), meta.get("layers")]
    candidates = [c for c in candidates if isinstance(c, dict) and c]
    chosen = next((c for c in candidates if set(c) <= names), None)
    return chosen or (candidates[0] if candidates else None)


def stored_under_other_names(model: nn.Module, checkpoint_keys: Iterable[str]) -> bool:
    """Whether a checkpoint whose files hold ``checkpoint_keys`` lacks some of ``model``'s own
    state_dict keys, i.e. stores weights under other (older) names, so that loading it by key
    into ``model`` would leave those weights untouched (transformers issue 43701)."""
    return not set(model.state_dict()) <= set(checkpoint_keys)
