"""One-shot N:M pruning of a pretrained model: magnitude, Wanda and SparseGPT.

`one_shot` makes the layers an `NMSparsityConfig` targets (found by `find_targets`, exactly as
`NMSparsifier` finds them: presets, ``target_modules``, GPT-2's Conv1D, fused Q/K/V row blocks)
exactly N:M along their input dimension, in place, with every pruned weight written as ``+0.0``:

* ``magnitude``: keep the N largest |W| of each group (`nm_mask`, the mask training bakes in);
* ``wanda`` (Sun et al. 2023): keep the N largest scores |W_ij|·‖X_j‖₂ of each group, X the layer's
  inputs over the calibration tokens;
* ``sparsegpt`` (Frantar & Alistarh 2023): with H = 2XᵀX/n (damped by a fraction of its mean
  diagonal) and U the upper Cholesky factor of H⁻¹, sweep the columns in blocks of 128; at the
  start of each group prune the M−N entries with the smallest w²/U_jj², and spread each pruned
  weight's error over the later columns.

Like the reference implementations, the calibration data flows block by block through the repeated
transformer blocks (the deepest ``nn.ModuleList`` of same-class modules that hold targets): the
inputs of a list's blocks are recorded in one forward of the model, then for each block its
targeted layers' statistics come from one forward of the *unpruned* block on the outputs of the
already *pruned* blocks before it; the block is pruned and run again to give the next block its
inputs. Tokens whose ``attention_mask`` is 0 are left out of every statistic. Targets outside every
block list get their statistics from full forwards of the pruned model. See docs/PRETRAINED.md.

    config = NMSparsityConfig(n_keep=2, m=4, locations="FF,QKV,O")
    report = one_shot(model, config, "sparsegpt",
                      calibration=[tokenizer(text, return_tensors="pt") for text in texts])
    print(report)
    sparsifier = finalized_sparsifier(model, config)  # for save_sparse_pretrained(...)

Knows no Trainer; imports no transformers.
"""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import NMSparsityConfig
from .errors import NMSparsityConfigError, NMSparsityError, NMTargetError
from .masks import check_divisible, count_nonzeros, nm_mask
from .sparsifier import ATTR, NMSparsifier, block_specs, verify_nm
from .targets import SkippedLayer, SparseBlock, TargetLayer, find_targets

METHODS = ("magnitude", "wanda", "sparsegpt")
"""The one-shot pruning methods `one_shot` knows."""

_Pattern = tuple[int, int]


# ---------------------------------------------------------------------------------- report
@dataclass
class OneShotBlock:
    """One row of a `OneShotReport`: a layer block after pruning.

    ``error`` is ‖(W − Ŵ)X‖²_F summed over the calibration tokens the layer saw (W the weights
    before pruning, Ŵ after, X its inputs; padded tokens left out), ``relative_error`` that divided
    by ‖WX‖²_F. Both are None without calibration or with ``reconstruction_error=False``.
    """

    name: str
    location: str
    rows: tuple[int, int] | None
    pattern: _Pattern
    shape: tuple[int, ...]
    kept_fraction: float
    error: float | None = None
    relative_error: float | None = None


@dataclass
class OneShotReport:
    """What `one_shot` did: the method, the calibration it used and one `OneShotBlock` per
    layer block.

    ``layers`` is the ``{module name: block specs}`` mapping that `verify_nm` takes (the
    ``"layers"`` of `NMSparsifier.metadata`): ``verify_nm(model, layers=report.layers,
    sparse_dim=report.sparse_dim)`` checks the pruned model. ``samples`` counts calibration
    sequences, ``tokens`` the unpadded tokens the first block saw. ``str(report)`` is a table.
    """

    method: str
    sparse_dim: str
    samples: int = 0
    tokens: int = 0
    blocks: list[OneShotBlock] = field(default_factory=list)
    layers: dict[str, list[dict]] = field(default_factory=dict)
    skipped: list[SkippedLayer] = field(default_factory=list)

    @property
    def kept_fraction(self) -> float:
        """Non-zero fraction over all targeted blocks."""
        total = sum(math.prod(b.shape) for b in self.blocks)
        kept = sum(b.kept_fraction * math.prod(b.shape) for b in self.blocks)
        return kept / total if total else 0.0

    def __str__(self) -> str:
        rows = [("layer", "loc", "N:M", "shape", "kept", "rel. error")]
        for b in self.blocks:
            label = b.name if b.rows is None else f"{b.name}[{b.rows[0]}:{b.rows[1]}]"
            error = "-" if b.relative_error is None else f"{b.relative_error:.4g}"
            rows.append(
                (
                    label,
                    b.location,
                    f"{b.pattern[0]}:{b.pattern[1]}",
                    "x".join(map(str, b.shape)),
                    f"{b.kept_fraction:.4f}",
                    error,
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        table = "\n".join(
            "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows
        )
        calib = f", {self.samples} samples, {self.tokens} tokens" if self.samples else ""
        return (
            f"{table}\none-shot {self.method}{calib}: {len(self.blocks)} layer blocks, "
            f"kept {self.kept_fraction:.4f}, dim={self.sparse_dim}"
        )


# ---------------------------------------------------------------------------------- statistics
MASK_KEYS = ("attention_mask", "decoder_attention_mask")


class _Calibration:
    """The calibration batches on the model's device; which batch runs now and, per batch, the
    token mask of the hidden states of the block list being pruned."""

    def __init__(self, batches: list[dict[str, Any]]):
        self.batches = batches
        self.index = 0
        self.list_masks: list[torch.Tensor | None] = [None] * len(batches)

    def set_list(self, name: str, hidden: list[torch.Tensor] | None) -> None:
        """The token masks of a block list's hidden states: its batch's ``attention_mask``, or
        for a decoder's list (``decoder`` in its name) ``decoder_attention_mask``, else all ones.
        None outside the block lists."""
        key = MASK_KEYS[1] if "decoder" in name.split(".") else MASK_KEYS[0]
        for b, batch in enumerate(self.batches):
            if hidden is None:
                self.list_masks[b] = None
                continue
            tokens = hidden[b].shape[:-1]
            mask = batch.get(key)
            fits = isinstance(mask, torch.Tensor) and mask.shape == tokens
            self.list_masks[b] = mask.bool() if fits else hidden[b].new_ones(tokens, dtype=bool)

    def rows(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The layer input ``x`` ``[..., in]`` as ``[tokens, in]`` without the padded tokens: the
        mask is the one (of the list's and the batch's masks) whose shape is ``x``'s leading
        dimensions; an input no mask lines up with counts whole."""
        batch = self.batches[self.index]
        masks = [self.list_masks[self.index]] + [batch.get(k) for k in MASK_KEYS]
        fitting = [
            m.bool()
            for m in masks
            if isinstance(m, torch.Tensor) and tuple(m.shape) == tuple(x.shape[:-1])
        ]
        if any(not torch.equal(fitting[0], m) for m in fitting[1:]):
            raise NMSparsityError(
                f"{name}: its input of shape {tuple(x.shape)} lines up with two different token "
                f"masks (encoder and decoder sequences of the same length), so its padded "
                f"tokens cannot be told apart. Give the decoder inputs another length, or "
                f"calibration batches without padding."
            )
        return x[fitting[0]] if fitting else x.reshape(-1, x.shape[-1])


class _LayerStats:
    """Input statistics of one targeted layer over the calibration tokens: the token count, the
    squared norm of each input feature (Wanda) and the Gram matrix XᵀX (SparseGPT, errors)."""

    def __init__(self, name: str, calib: _Calibration, gram: bool):
        self.name = name
        self.calib = calib
        self.want_gram = gram
        self.tokens = 0
        self.sumsq: torch.Tensor | None = None
        self.gram: torch.Tensor | None = None

    def hook(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        x = self.calib.rows(self.name, inputs[0].detach()).float()
        if self.sumsq is None:
            self.sumsq = torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device)
            if self.want_gram:
                self.gram = torch.zeros(x.shape[-1], x.shape[-1], device=x.device)
        self.tokens += x.shape[0]
        self.sumsq += x.pow(2).sum(0, dtype=torch.float64)
        if self.gram is not None:
            self.gram.addmm_(x.t(), x)


# ---------------------------------------------------------------------------------- methods
def _laid_out(target: TargetLayer) -> torch.Tensor:
    """The weight as a Linear lays it out (``[out, in, ...]``): a view of the parameter."""
    weight = target.module.weight.detach()
    return weight.t() if target.fan_in_fan_out else weight


@torch.no_grad()
def _write(part: torch.Tensor, values: torch.Tensor, keep: torch.Tensor) -> None:
    """``part`` <- ``values`` where ``keep``, else +0.0; a kept value that is (or rounds to) zero
    is written as +0.0 too, so no zero carries a sign bit."""
    new = torch.where(keep, values.to(part.dtype), 0)
    part.copy_(new.masked_fill_(new == 0, 0))


def _wanda_keep(part: torch.Tensor, stats: _LayerStats, pattern: _Pattern) -> torch.Tensor:
    """Keep the top N of |W_ij|·‖X_j‖₂ in each group of M along the input dimension."""
    score = part.double().abs() * stats.sumsq.sqrt()
    return nm_mask(score, *pattern, "row")


def _hessian_factor(stats: _LayerStats, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dead): U the upper Cholesky factor of (H + λI)⁻¹ with H = 2XᵀX/n and λ = ``damping``
    times the mean diagonal; ``dead`` the input features that were always zero (their H_ii is
    set to 1 and their weights are pruned, as in the reference)."""
    h = stats.gram * (2.0 / stats.tokens)
    diag = h.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    diag += damping * diag.mean()
    try:
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
        return torch.linalg.cholesky(inverse, upper=True), dead
    except torch.linalg.LinAlgError as exc:
        raise NMSparsityError(
            f"{stats.name}: the damped Hessian of its {stats.tokens} calibration tokens is not "
            f"positive definite ({exc}). Pass more calibration samples or a larger damping "
            f"(damping={damping})."
        ) from None


def _sparsegpt_sweep(
    w: torch.Tensor, u: torch.Tensor, pattern: _Pattern, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT's column sweep over ``w`` ``[rows, in]`` (float32, changed in place) with ``u``
    the upper Cholesky factor of H⁻¹. Returns (Ŵ, keep): at the first column of each group of M
    the N entries with the largest w²/U_jj² are kept (ties: lower index, as `nm_mask`), the others
    pruned; each pruned weight's error (w − q)/U_jj is subtracted along row j of U from the later
    columns of the block, and the block's errors from the columns after it."""
    n, m = pattern
    cols = w.shape[1]
    q = torch.zeros_like(w)
    keep = torch.zeros_like(w, dtype=torch.bool)
    step = m * math.ceil(blocksize / m)  # groups never straddle two blocks
    for i1 in range(0, cols, step):
        i2 = min(i1 + step, cols)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        d = u1.diagonal()
        err = torch.zeros_like(w1)
        for i in range(i2 - i1):
            if i % m == 0:
                score = w1[:, i : i + m].pow(2) / d[i : i + m].pow(2)
                keep[:, i1 + i : i1 + i + m] = nm_mask(score, n, m, "row")
            col = w1[:, i]
            kept = torch.where(keep[:, i1 + i], col, 0)
            q[:, i1 + i] = kept
            err[:, i] = (col - kept) / d[i]
            w1[:, i:] -= err[:, i : i + 1] * u1[i : i + 1, i:]
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return q, keep


def _sparsegpt_layer(
    weight: torch.Tensor,
    target: TargetLayer,
    patterns: list[_Pattern],
    stats: _LayerStats,
    damping: float,
    blocksize: int,
) -> None:
    """Prune every block of one layer with SparseGPT: rows of one pattern are swept together
    (rows are independent given H; a fused layer's rows share its H)."""
    u, dead = _hessian_factor(stats, damping)
    by_pattern: dict[_Pattern, list[int]] = {}
    for block, pattern in zip(target.blocks, patterns, strict=True):
        start, stop = block.rows or (0, weight.shape[0])
        by_pattern.setdefault(pattern, []).extend(range(start, stop))
    for pattern, row_list in by_pattern.items():
        rows = torch.tensor(row_list, device=weight.device)
        w = weight.index_select(0, rows).float()
        w[:, dead] = 0
        q, keep = _sparsegpt_sweep(w, u, pattern, blocksize)
        new = torch.where(keep, q.to(weight.dtype), 0)
        new.masked_fill_(new == 0, 0)
        weight.index_copy_(0, rows, new)


def _block_row(
    target: TargetLayer,
    block: SparseBlock,
    pattern: _Pattern,
    before: torch.Tensor | None,
    stats: _LayerStats | None,
) -> OneShotBlock:
    part = block.part(_laid_out(target))
    error = relative = None
    if before is not None and stats is not None and stats.gram is not None:
        old = block.part(before)
        delta = old - part.float()
        error = float(((delta @ stats.gram) * delta).sum())
        base = float(((old @ stats.gram) * old).sum())
        relative = error / base if base > 0 else 0.0
    return OneShotBlock(
        name=target.name,
        location=block.location,
        rows=block.rows,
        pattern=pattern,
        shape=tuple(part.shape),
        kept_fraction=count_nonzeros(part) / part.numel() if part.numel() else 0.0,
        error=error,
        relative_error=relative,
    )


@dataclass
class _Options:
    method: str
    config: NMSparsityConfig
    damping: float
    blocksize: int
    errors: bool


@torch.no_grad()
def _prune_layer(
    target: TargetLayer, stats: _LayerStats | None, opts: _Options
) -> list[OneShotBlock]:
    """Prune one targeted layer in place with ``opts.method``; return its report rows."""
    weight = _laid_out(target)
    patterns = [opts.config.target_pattern(b.location) for b in target.blocks]
    with_error = opts.errors and stats is not None and stats.gram is not None
    before = weight.float().clone() if with_error else None
    if opts.method == "sparsegpt":
        _sparsegpt_layer(weight, target, patterns, stats, opts.damping, opts.blocksize)
    else:
        for block, pattern in zip(target.blocks, patterns, strict=True):
            part = block.part(weight)
            if opts.method == "wanda":
                keep = _wanda_keep(part, stats, pattern)
            else:
                keep = nm_mask(part, *pattern, opts.config.sparse_dim)
            _write(part, part, keep)
    return [
        _block_row(target, b, p, before, stats)
        for b, p in zip(target.blocks, patterns, strict=True)
    ]


# ---------------------------------------------------------------------------------- checks
def _check_method(method: str, config: NMSparsityConfig, calibration: Any) -> None:
    if method not in METHODS:
        raise NMSparsityConfigError(
            f"method = {method!r} is not a one-shot method; use one of {', '.join(METHODS)}."
        )
    if not config.enabled:
        raise NMSparsityConfigError(
            "sparsity_type = 'dense': one-shot pruning needs a sparse config (n_keep, m, "
            "locations). Set sparsity_type='structure_nm'."
        )
    if method == "magnitude":
        return
    if calibration is None:
        raise NMSparsityConfigError(
            f"method = {method!r} needs calibration data: pass calibration=[{{'input_ids': ..., "
            f"'attention_mask': ...}}, ...] (model-input dicts), or use method='magnitude'."
        )
    if config.sparse_dim != "row":
        raise NMSparsityConfigError(
            f"sparse_dim = {config.sparse_dim!r} with method = {method!r}: {method} prunes "
            f"groups along a layer's input dimension (its statistics are per input feature). "
            f"Use sparse_dim='row', or method='magnitude'."
        )


def _check_targets(targets: list[TargetLayer], opts: _Options) -> None:
    """Every block must take its pattern; weights must be whole, and no sparsifier attached."""
    errors = []
    for target in targets:
        weight = target.module.weight
        if callable(getattr(weight, "to_local", None)):
            raise NMTargetError(
                f"{target.name}: its weight is a sharded DTensor. Run one_shot on the whole "
                f"model before wrapping it with FSDP."
            )
        if hasattr(target.module, ATTR):
            raise NMTargetError(
                f"{target.name}: an NMSparsifier is attached. Call its detach() before one_shot."
            )
        if target.kind == "conv" and opts.method != "magnitude":
            raise NMTargetError(
                f"{target.name}: a Conv2d layer cannot be pruned with {opts.method} here (its "
                f"statistics are those of a Linear). Exclude it (exclude_modules) or use "
                f"method='magnitude'."
            )
        for block in target.blocks:
            shape = tuple(block.part(_laid_out(target)).shape)
            label = target.name + ("" if block.rows is None else f" [{block.location} rows]")
            try:
                check_divisible(
                    shape,
                    opts.config.target_pattern(block.location)[1],
                    opts.config.sparse_dim,
                    name=label,
                )
            except NMSparsityError as exc:
                errors.append(str(exc))
    if errors:
        raise NMTargetError(
            "layers cannot take the configured N:M pattern:\n  " + "\n  ".join(errors[:10])
        )


def _calibration_batches(calibration: Iterable, device: torch.device) -> list[dict[str, Any]]:
    """The calibration batches as dicts on ``device`` (read once; a generator is fine)."""
    if isinstance(calibration, Mapping):
        raise NMSparsityConfigError(
            "calibration is a single dict: pass an iterable of model-input dicts, e.g. [batch]."
        )
    batches = []
    for i, item in enumerate(calibration):
        if not isinstance(item, Mapping):
            raise NMSparsityConfigError(
                f"calibration[{i}] is a {type(item).__name__}, not a dict of model inputs "
                f"(e.g. {{'input_ids': ..., 'attention_mask': ...}} or {{'pixel_values': ...}})."
            )
        batches.append(
            {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in item.items()}
        )
    if not batches:
        raise NMSparsityConfigError("calibration is empty: give at least one batch.")
    return batches


# ---------------------------------------------------------------------------------- blocks
def block_lists(model: nn.Module, targets: list[TargetLayer]) -> list[tuple[str, nn.ModuleList]]:
    """The repeated blocks of ``model`` that hold targets: every ``nn.ModuleList`` whose children
    are all of one class and hold a target, keeping only the deepest (a Swin stage list gives way
    to each stage's block list). In module order, which is the order a forward runs them in for
    the models of transformers (an encoder's blocks before a decoder's)."""
    wanted = {id(t.module) for t in targets}
    found = []
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module)
            and len({type(child) for child in module}) == 1
            and any(id(m) in wanted for m in module.modules())
        ):
            found.append((name, module))
    names = [name for name, _ in found]
    return [
        (name, module)
        for name, module in found
        if not any(other != name and other.startswith(f"{name}.") for other in names)
    ]


class _StopForward(Exception):
    """Raised by a recording hook to end the model's forward early."""


def _forward(model: nn.Module, batch: Mapping[str, Any]) -> Any:
    """``model(**batch)``, with ``use_cache=False`` where the forward takes it (a decoder stack
    may keep its own config, so the model's config alone does not turn the cache off)."""
    takes = "use_cache" in inspect.signature(model.forward).parameters
    return model(**batch, **({"use_cache": False} if takes and "use_cache" not in batch else {}))


def _no_cache(value: Any) -> Any:
    """None for a KV-cache object (a block rerun must compute, not reuse, keys and values)."""
    return None if type(value).__name__.endswith("Cache") else value


@dataclass
class _Call:
    """The positional and keyword arguments of one block call; the hidden states are in
    ``args[0]`` or ``kwargs['hidden_states']``."""

    args: tuple
    kwargs: dict

    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def with_hidden(self, hidden: torch.Tensor | None) -> _Call:
        if self.args:
            return _Call((hidden, *self.args[1:]), self.kwargs)
        return _Call(self.args, {**self.kwargs, "hidden_states": hidden})


def _record_calls(
    model: nn.Module, name: str, blocks: nn.ModuleList, calib: _Calibration
) -> list[list[_Call]]:
    """``calls[b][i]``: the arguments block ``i`` of ``blocks`` gets on calibration batch ``b``,
    from one forward of the model that stops before the last block runs. Only block 0 keeps its
    hidden states; the other blocks keep their other arguments (masks, position embeddings,
    relative position biases), which may differ from block to block."""
    calls: list[list[_Call]] = []

    def recorder(i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            call = _Call(
                tuple(_no_cache(a) for a in args), {k: _no_cache(v) for k, v in kwargs.items()}
            )
            if not call.args and not isinstance(call.kwargs.get("hidden_states"), torch.Tensor):
                raise NMTargetError(
                    f"{name}.{i}: its hidden states are neither its first argument nor a "
                    f"'hidden_states' keyword, so it cannot be run block by block."
                )
            calls[-1].append(call if i == 0 else call.with_hidden(None))
            if i == len(blocks) - 1:
                raise _StopForward

        return hook

    handles = [
        block.register_forward_pre_hook(recorder(i), with_kwargs=True)
        for i, block in enumerate(blocks)
    ]
    try:
        for index, batch in enumerate(calib.batches):
            calib.index = index
            calls.append([])
            try:
                _forward(model, batch)
            except _StopForward:
                pass
            if len(calls[-1]) != len(blocks):
                raise NMTargetError(
                    f"{name}: the model's forward on calibration batch {index} ran "
                    f"{len(calls[-1])} of its {len(blocks)} blocks. Give inputs that run them "
                    f"(an encoder-decoder needs decoder_input_ids or labels)."
                )
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _block_output(name: str, out: Any, like: torch.Tensor) -> torch.Tensor:
    hidden = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(hidden, torch.Tensor) or hidden.shape != like.shape:
        shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise NMTargetError(
            f"{name}: a block returned {shape} for hidden states of shape {tuple(like.shape)}, so "
            f"its list is not a chain of blocks one_shot can run one at a time. Name the layers "
            f"with target_modules outside it, or prune with method='magnitude'."
        )
    return hidden


def _hooked_stats(
    targets: list[TargetLayer], calib: _Calibration, opts: _Options
) -> tuple[dict[str, _LayerStats], list]:
    """Statistics hooks on the Linear/Conv1D ``targets`` (a Conv2d, pruned by magnitude, has
    none: its report row has no error)."""
    gram = opts.method == "sparsegpt" or opts.errors
    hooked = [t for t in targets if t.kind != "conv"]
    stats = {t.name: _LayerStats(t.name, calib, gram) for t in hooked}
    handles = [t.module.register_forward_hook(stats[t.name].hook) for t in hooked]
    return stats, handles


def _prune_with_stats(
    targets: list[TargetLayer], stats: dict[str, _LayerStats], opts: _Options
) -> list[OneShotBlock]:
    rows: list[OneShotBlock] = []
    for target in targets:
        layer_stats = stats.get(target.name)
        if layer_stats is not None and layer_stats.tokens == 0:
            raise NMSparsityError(
                f"{target.name}: no calibration token reached this layer (all padded, or the "
                f"forward does not run it). Give calibration inputs that run it."
            )
        rows += _prune_layer(target, layer_stats, opts)
    return rows


def _run_list(
    model: nn.Module,
    name: str,
    blocks: nn.ModuleList,
    targets: list[TargetLayer],
    calib: _Calibration,
    opts: _Options,
    progress,
) -> tuple[list[OneShotBlock], int]:
    """Prune the targets of one block list, block by block; return the rows and the number of
    tokens its first block saw."""
    calls = _record_calls(model, name, blocks, calib)
    hidden = [c[0].hidden() for c in calls]
    calib.set_list(name, hidden)
    rows: list[OneShotBlock] = []
    tokens = 0
    for i, block in enumerate(blocks):
        inside = {id(m) for m in block.modules()}
        block_targets = [t for t in targets if id(t.module) in inside]
        stats, handles = _hooked_stats(block_targets, calib, opts)
        try:
            for b, batch_calls in enumerate(calls if stats else []):  # unpruned: statistics
                calib.index = b
                call = batch_calls[i].with_hidden(hidden[b])
                block(*call.args, **call.kwargs)
        finally:
            for handle in handles:
                handle.remove()
        if not tokens and stats:
            tokens = next(iter(stats.values())).tokens
        rows += _prune_with_stats(block_targets, stats, opts)
        progress.update(1)
        if i + 1 == len(blocks):
            break  # a next list, or the targets outside, start from a forward of the whole model
        for b, batch_calls in enumerate(calls):  # the pruned block: the next block's inputs
            call = batch_calls[i].with_hidden(hidden[b])
            hidden[b] = _block_output(f"{name}.{i}", block(*call.args, **call.kwargs), hidden[b])
    return rows, tokens


def _run_outside(
    model: nn.Module, targets: list[TargetLayer], calib: _Calibration, opts: _Options
) -> list[OneShotBlock]:
    """Targets outside every block list: statistics from full forwards of the pruned model."""
    stats, handles = _hooked_stats(targets, calib, opts)
    try:
        for index, batch in enumerate(calib.batches):
            calib.index = index
            _forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return _prune_with_stats(targets, stats, opts)


# ---------------------------------------------------------------------------------- entry
class _ModelState:
    """Evaluation mode and no KV cache while calibrating; restored afterwards."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.training = model.training
        self.config = getattr(model, "config", None)
        self.use_cache = getattr(self.config, "use_cache", None)

    def __enter__(self) -> None:
        self.model.eval()
        if self.use_cache is not None:
            self.config.use_cache = False

    def __exit__(self, *exc) -> None:
        self.model.train(self.training)
        if self.use_cache is not None:
            self.config.use_cache = self.use_cache


def _progress_bar(total: int, method: str, progress: bool | None):
    from tqdm.auto import tqdm

    disable = not sys.stderr.isatty() if progress is None else not progress
    return tqdm(total=total, desc=f"one-shot {method}", unit="block", disable=disable)


@torch.no_grad()
def _calibrated(
    model: nn.Module,
    targets: list[TargetLayer],
    batches: list[dict[str, Any]],
    opts: _Options,
    progress: bool | None,
) -> tuple[list[OneShotBlock], int]:
    calib = _Calibration(batches)
    lists = block_lists(model, targets)
    in_lists = {id(m) for _, blocks in lists for m in blocks.modules()}
    outside = [t for t in targets if id(t.module) not in in_lists]
    rows: list[OneShotBlock] = []
    tokens = 0
    total = sum(len(blocks) for _, blocks in lists) + bool(outside)
    with _ModelState(model), _progress_bar(total, opts.method, progress) as bar:
        for name, blocks in lists:
            list_rows, list_tokens = _run_list(model, name, blocks, targets, calib, opts, bar)
            rows += list_rows
            tokens = tokens or list_tokens
        if outside:
            calib.set_list("", None)
            rows += _run_outside(model, outside, calib, opts)
            bar.update(1)
    order = {t.name: k for k, t in enumerate(targets)}
    return sorted(rows, key=lambda r: order[r.name]), tokens


def one_shot(
    model: nn.Module,
    config: NMSparsityConfig,
    method: str = "magnitude",
    calibration: Iterable[Mapping[str, Any]] | None = None,
    *,
    damping: float = 0.01,
    blocksize: int = 128,
    reconstruction_error: bool = True,
    progress: bool | None = None,
) -> OneShotReport:
    """Prune ``model``'s targeted layers in place to exactly N:M, in one shot (no training).

    Args:
        model: any ``nn.Module`` (a ``PreTrainedModel`` for the presets); its device is that of its
            parameters, where every calibration tensor is moved.
        config: the `NMSparsityConfig`: patterns (``config.target_pattern(location)`` per block),
            ``sparse_dim``, ``locations`` / ``target_modules`` / ``exclude_modules``.
        method: ``magnitude``, ``wanda`` or ``sparsegpt`` (module docstring, docs/PRETRAINED.md).
        calibration: an iterable of model-input dicts (``model(**batch)`` runs each), read once;
            required for ``wanda`` and ``sparsegpt``. With ``magnitude`` it only serves the
            reconstruction errors of the report. Tokens with ``attention_mask`` 0 (or
            ``decoder_attention_mask`` 0 in a decoder's blocks) are left out.
        damping: SparseGPT's damping, a fraction of the Hessian's mean diagonal (default 1%).
        blocksize: SparseGPT's column block (rounded up to a multiple of M).
        reconstruction_error: also accumulate XᵀX for each layer (one ``[in, in]`` float32 matrix
            per layer of the block being pruned) to report ‖(W − Ŵ)X‖² (`OneShotBlock`).
        progress: show a tqdm bar over blocks (default: when stderr is a terminal).

    Returns:
        The `OneShotReport`. Every targeted block is N:M-compliant along ``config.sparse_dim``
        (checked with `verify_nm` before returning), every zero written is +0.0, biases and
        untargeted layers are untouched.

    Raises:
        NMSparsityConfigError: an unknown method, a dense config, no (or malformed) calibration
            for wanda/sparsegpt, ``sparse_dim='col'`` with wanda/sparsegpt.
        NMTargetError: as `find_targets`, plus a block that M does not divide, a Conv2d target
            with wanda/sparsegpt, an attached `NMSparsifier`, a sharded (FSDP) weight.
        NMSparsityError: a layer no calibration token reached, a Hessian that stays singular.
    """
    _check_method(method, config, calibration)
    targets, skipped = find_targets(model, config)
    opts = _Options(method, config, damping, blocksize, reconstruction_error)
    _check_targets(targets, opts)
    report = OneShotReport(method=method, sparse_dim=config.sparse_dim, skipped=skipped)
    if calibration is None or (method == "magnitude" and not reconstruction_error):
        with torch.no_grad():
            report.blocks = [row for t in targets for row in _prune_layer(t, None, opts)]
    else:
        device = next(model.parameters()).device
        batches = _calibration_batches(calibration, device)
        report.samples = sum(_batch_size(b) for b in batches)
        report.blocks, report.tokens = _calibrated(model, targets, batches, opts, progress)
    report.layers = {
        t.name: block_specs(t, [config.target_pattern(b.location) for b in t.blocks])
        for t in targets
    }
    verify_nm(model, layers=report.layers, sparse_dim=config.sparse_dim)
    _record_start(model, report)
    return report


ONE_SHOT_KEY = "nm_one_shot"
"""The ``model.config`` attribute (and ``config.json`` key) that records a one-shot start."""


def _record_start(model: nn.Module, report: OneShotReport) -> None:
    """Record how the weights were pruned in ``model.config`` (a Transformers config), so that
    every later save of the model, a Trainer checkpoint included, carries it in config.json and
    the sparse export copies it into its metadata (``one_shot``). ``trained`` turns true when
    sparse training starts on the model (`mark_trained`)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return  # a plain module: the report is the record
    setattr(
        config,
        ONE_SHOT_KEY,
        {
            "method": report.method,
            "samples": report.samples,
            "tokens": report.tokens,
            "trained": False,
        },
    )


def one_shot_record(model: nn.Module) -> dict[str, Any] | None:
    """The one-shot record of ``model`` (`_record_start`; through wrappers such as PEFT's, whose
    ``config`` is the base model's), or None when it did not start from `one_shot`."""
    record = getattr(getattr(model, "config", None), ONE_SHOT_KEY, None)
    return dict(record) if isinstance(record, dict) else None


def mark_trained(model: nn.Module) -> None:
    """Note in ``model``'s one-shot record (if any) that sparse training ran after the pruning."""
    record = one_shot_record(model)
    if record is not None and not record.get("trained"):
        setattr(model.config, ONE_SHOT_KEY, {**record, "trained": True})


def _batch_size(batch: Mapping[str, Any]) -> int:
    first = next((v for v in batch.values() if isinstance(v, torch.Tensor) and v.dim()), None)
    return int(first.shape[0]) if first is not None else 1


def finalized_sparsifier(model: nn.Module, config: NMSparsityConfig) -> NMSparsifier:
    """An `NMSparsifier` attached to a model `one_shot` pruned with ``config`` and finalized: what
    `nmsparse_hf.save_sparse_pretrained` takes to write the verified sparse checkpoint.

    Finalizing an N:M weight whose zeros are +0.0 changes no bit (the N:M mask keeps every
    non-zero). Call ``detach()`` on it after saving to give the layers their plain forward back.

    Raises:
        NMVerificationError: a targeted layer is not N:M (the model was not pruned with ``config``).
    """
    sparsifier = NMSparsifier(model, config, total_steps=None)
    try:
        sparsifier.verify(strict=True)
    except NMSparsityError:
        sparsifier.detach()
        raise
    sparsifier.finalize()
    return sparsifier
