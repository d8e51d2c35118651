"""`NMSparsifier`: attaches N:M masking to the targeted layers of any ``nn.Module``.

Attaching changes no parameter and no state_dict key: each targeted Linear/Conv2d gets a plain
Python attribute ``_nm_sparse`` (its per-step settings) and an instance-level ``forward`` that runs
the layer with the effective weight (`autograd.SparseLinear` for a Linear, `autograd.EffectiveWeight`
for a Conv2d). The optimizer keeps updating the dense weights; ``finalize()`` bakes the target masks into them. The sparsifier knows nothing about
the Trainer: call ``update(step)`` before each optimizer step's forward passes (0-based steps).

    sparsifier = NMSparsifier(model, config, total_steps=len(loader) * epochs)
    for step, batch in enumerate(batches):
        sparsifier.update(step)
        loss = model(**batch).loss; loss.backward(); optimizer.step(); optimizer.zero_grad()
    sparsifier.finalize(); sparsifier.verify()

On a PEFT LoRA model the targets are the wrapped base layers (`targets.find_targets`), and each
LoRA layer around one gets an instance-level ``forward`` and ``get_delta_weight`` that mask the
adapter's delta ``scaling * B @ A`` with the base layer's mask, so that the merged weight
(``merge_and_unload()``) is N:M exactly where the base is. Nothing of PEFT is imported here.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .autograd import effective_weight, sparse_linear
from .config import NMSparsityConfig
from .errors import NMSparsityError, NMTargetError, NMVerificationError
from .masks import (
    check_divisible,
    compiled_nm_mask,
    compiled_nm_masks,
    count_nonzeros,
    nm_group_nonzeros,
    nm_mask,
)
from .names import layers_for_model
from .schedule import Pattern, SparsitySchedule, StepPlan
from .targets import SkippedLayer, TargetLayer, find_targets

ATTR = "_nm_sparse"
# stands in for the run length until the Trainer knows max_steps (validates fractions early)
_PROVISIONAL_STEPS = 1_000_000


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2 keeps weights sharded on dim 0 at rest), else itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def _shard(target: TargetLayer) -> torch.Tensor:
    """The weight of ``target`` as this rank holds it between steps (the local shard under FSDP2).

    Row-grouped masks are right on a dim-0 shard, but the row blocks of a fused qkv are global row
    ranges: rather than mask the wrong rows of a shard, refuse.
    """
    weight = target.module.weight
    if callable(getattr(weight, "to_local", None)) and any(b.rows for b in target.blocks):
        raise NMTargetError(
            f"{target.name}: a fused qkv layer split into Q/K/V row blocks cannot be masked on an "
            f"FSDP2 shard. Train it without FSDP2, or use a model with separate q/k/v "
            f"projections (HF ViT/Swin)."
        )
    if target.fan_in_fan_out and callable(getattr(weight, "to_local", None)):
        raise NMTargetError(
            f"{target.name}: a Conv1D weight is stored [in, out], so an FSDP2 shard (dim 0) cuts "
            f"its N:M groups. Train it without FSDP2, or exclude it (exclude_modules)."
        )
    return _local(weight)


def _laid_out(target: TargetLayer) -> torch.Tensor:
    """`_shard` laid out as a Linear's ``[out, in, ...]``: a Conv1D's stored ``[in, out]`` weight
    as its transposed view (in-place edits of the view edit the parameter)."""
    weight = _shard(target)
    return weight.t() if target.fan_in_fan_out else weight


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathers a DTensor (a collective: call it on every rank), else itself."""
    gather = getattr(tensor, "full_tensor", None)
    return gather() if callable(gather) else tensor


def _mask_key(weight: torch.Tensor) -> tuple | None:
    """What identifies the values of ``weight`` for the mask cache of one optimizer step (see
    `LayerSparsity.mask`): its storage address and layout, and autograd's version counter, which
    every in-place change bumps. None, and no caching, for tensor subclasses (DTensor, fake and
    functional tensors), inference tensors and while ``torch.compile`` traces."""
    if torch.compiler.is_compiling() or type(weight) not in (torch.Tensor, nn.Parameter):
        return None
    if weight.is_inference():  # no version counter
        return None
    return (
        weight.untyped_storage().data_ptr(),
        weight.storage_offset(),
        weight._version,
        tuple(weight.shape),
        weight.stride(),
        weight.dtype,
        weight.device,
    )


def _fully_sharded(model: nn.Module) -> bool:
    """True when FSDP manages ``model``: between steps its layers hold shards, or unsharded
    tensors that the next forward refills with new values without bumping their version counter,
    so no mask can be computed ahead of that forward."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6: FSDP2 lives elsewhere, and is a subclass check of its own
        FSDPModule = FullyShardedDataParallel  # noqa: N806
    return any(isinstance(m, FSDPModule | FullyShardedDataParallel) for m in model.modules())


class LayerSparsity:
    """The sparsity state of one layer: which blocks, their patterns now, alpha, lambda.

    Lives on the module as ``module._nm_sparse`` (not a submodule, so never in the state_dict).
    """

    def __init__(self, target: TargetLayer, dim: str, stage_maps: list[dict[Pattern, Pattern]]):
        self.name = target.name
        self.kind = target.kind
        self.fan_in_fan_out = target.fan_in_fan_out
        self.blocks = target.blocks
        self.dim = dim
        self.stage_maps = stage_maps
        self.patterns: list[Pattern | None] = [None] * len(self.blocks)
        # each stage map is in stage order; its last entry is the target pattern
        self.target_patterns: list[Pattern] = [list(m.values())[-1] for m in stage_maps]
        self.active = False
        self.final = False
        self.alpha: float | torch.Tensor = 0.0
        self.srste_lambda = 0.0
        self.freeze_pruned = False
        self.frozen_mask: torch.Tensor | None = None
        # (key, mask) of this step's mask; `NMSparsifier.update` clears it
        self.cached_mask: tuple[tuple, torch.Tensor] | None = None
        # this step's mask as `NMSparsifier.update` computed it (None where it cannot: a sharded
        # weight, whose mask is computed inside forward); what a compiled forward reads
        self.step_mask: torch.Tensor | None = None
        # its 0/1 bytes (``step_mask.view(torch.uint8)``, made eagerly): what a compiled forward
        # takes as the graph input (inductor's CPU code loads bytes as a vector, bools one by one)
        self.step_bytes: torch.Tensor | None = None
        # the mask function: `nm_mask`, or `compiled_nm_mask` when the model runs compiled
        self.kernel = nm_mask

    def mask(self, weight: torch.Tensor, patterns: list[Pattern | None] | None = None):
        """The keep-mask of ``weight`` under ``patterns`` (default: this step's); True where a block
        is dense.

        This step's mask is computed once and reused while ``weight`` is the same tensor with the
        same values: the gradient-accumulation micro-steps (and evaluations) of one optimizer
        step share it. The cache is keyed by the weight's storage, layout and version counter
        (`_mask_key`) and cleared when `NMSparsifier.update` moves to a new step, so a new step, an in-place
        change (optimizer step, ``load_state_dict``, ``finalize``) or a replaced tensor
        (``param.data = ...``, ``.to()``) recomputes it; docs/METHOD.md §4 "Cadence"."""
        if patterns is not None:
            return self._compute_mask(weight, patterns)
        held = self._held_mask(weight)
        if held is not None:
            return held
        if torch.compiler.is_compiling() and self.step_mask is not None:
            # traced: the mask `NMSparsifier.update` computed eagerly for this step enters the
            # graph as an input, so a compiled forward never recomputes it
            return self.step_mask
        key = self._step_key(weight)
        if key is not None and self.cached_mask is not None and self.cached_mask[0] == key:
            return self.cached_mask[1]
        mask = self._compute_mask(weight, self.patterns)
        self.cached_mask = None if key is None else (key, mask)
        return mask

    def forward_mask(self, weight: torch.Tensor) -> torch.Tensor:
        """`mask` as the sparse forward takes it: while `torch.compile` traces, the 0/1 bytes of
        this step's mask (``step_bytes``) where `NMSparsifier.update` computed one, so that the
        graph's input is a uint8 tensor (W ⊙ m and SR-STE's decay, compiled for ViT-S's 24 FF
        weights: about half the time they take with a bool input, docs/BENCHMARKS.md); the bool
        mask otherwise. `autograd.SparseLinear` and `EffectiveWeight` take either."""
        if torch.compiler.is_compiling() and self.step_bytes is not None:
            return self.step_bytes
        return self.mask(weight)

    def _held_mask(self, weight: torch.Tensor) -> torch.Tensor | None:
        """A held mask (finetune_mask="frozen", mask_source="weights") is this step's mask;
        under FSDP2 it is held per shard and the whole weight's mask is computed instead."""
        held = self.frozen_mask
        if self.freeze_pruned and held is not None and held.shape == weight.shape:
            return held
        return None

    def _step_key(self, weight: torch.Tensor) -> tuple | None:
        key = _mask_key(weight)
        return None if key is None else (key, tuple(self.patterns))

    def pending_mask(self, weight: torch.Tensor) -> tuple[tuple, Pattern] | None:
        """``(cache key, pattern)`` when this step's mask of ``weight`` is one kernel call over
        the whole weight that `mask` would compute now (not cached, not held, one block), else
        None: what `NMSparsifier.update` computes for several layers in one call."""
        if self._held_mask(weight) is not None:
            return None
        if len(self.blocks) != 1 or self.blocks[0].rows is not None:
            return None
        key = self._step_key(weight)
        if key is None or (self.cached_mask is not None and self.cached_mask[0] == key):
            return None
        return key, self.patterns[0]

    def _compute_mask(self, weight: torch.Tensor, patterns: list[Pattern | None]) -> torch.Tensor:
        if len(self.blocks) == 1 and self.blocks[0].rows is None:
            n, m = patterns[0]
            return self.kernel(weight, n, m, self.dim)
        full = torch.ones_like(weight, dtype=torch.bool)
        for block, pattern in zip(self.blocks, patterns, strict=True):
            if pattern is not None:
                rows = block.rows or (0, weight.shape[0])
                full[rows[0] : rows[1]] = self.kernel(block.part(weight), *pattern, self.dim)
        return full

    @property
    def masked(self) -> bool:
        """True while the forward uses a mask (sparse or fine-tune phase, not yet finalized)."""
        return self.active and not self.final

    def delta_mask(self, weight: torch.Tensor) -> tuple[torch.Tensor, float | torch.Tensor] | None:
        """The mask and alpha that a LoRA delta on this layer follows now (``weight`` laid out
        ``[out, in]``): this step's, in the masked phases; the baked pattern (the non-zeros of
        the finalized weight) once final; None (the delta stays dense) in the dense phase."""
        if self.masked:
            return self.mask(weight), self.alpha
        if self.final:
            return weight != 0, 0.0
        return None

    def effective(self, weight: torch.Tensor) -> torch.Tensor:
        """W̃ for this step (docs/METHOD.md §4), or ``weight`` itself outside the masked phases."""
        if not self.masked:
            return weight
        return effective_weight(
            weight, self.forward_mask(weight), self.alpha, self.srste_lambda, self.freeze_pruned
        )

    def linear(
        self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """``F.linear(input, self.effective(weight), bias)``, fused (`autograd.SparseLinear`) in
        the masked phases so that backward keeps the bool mask instead of W̃."""
        if not self.masked:
            return F.linear(input, weight, bias)
        return sparse_linear(
            input,
            weight,
            bias,
            self.forward_mask(weight),
            self.alpha,
            self.srste_lambda,
            self.freeze_pruned,
        )


def _linear_forward(self: nn.Linear, input: torch.Tensor) -> torch.Tensor:
    return getattr(self, ATTR).linear(input, self.weight, self.bias)


def _conv_forward(self: nn.Conv2d, input: torch.Tensor) -> torch.Tensor:
    return self._conv_forward(input, getattr(self, ATTR).effective(self.weight), self.bias)


def _conv1d_forward(self: nn.Module, input: torch.Tensor) -> torch.Tensor:
    """transformers' Conv1D (``x @ W + b``, W stored ``[in, out]``): in the masked phases, the
    Linear path on the transposed view ``W.t()`` (``[out, in]``), so the mask, the fused backward
    and the gradient (routed back through the view) are exactly a Linear's; otherwise the
    class's own forward."""
    state = getattr(self, ATTR)
    if not state.masked:
        return type(self).forward(self, input)
    return state.linear(input, self.weight.t(), self.bias)


_FORWARDS = {"linear": _linear_forward, "conv1d": _conv1d_forward, "conv": _conv_forward}


# ---------------------------------------------------------------------------------- PEFT LoRA
def _masked_delta(
    delta: torch.Tensor, mask: torch.Tensor, alpha: float | torch.Tensor
) -> torch.Tensor:
    """``delta ⊙ (mask + alpha·(1 − mask))`` by autograd (+0.0 where pruned with alpha = 0)."""
    if not isinstance(alpha, torch.Tensor) and alpha == 0:
        return delta.masked_fill(~mask, 0)
    return torch.where(mask, delta, delta * alpha)


def _lora_base(lora: nn.Module) -> tuple[LayerSparsity, torch.Tensor]:
    """The sparsity state of the base layer a LoRA layer wraps, and its weight laid out
    ``[out, in]`` (the same view its own forward masks, so the mask cache is shared)."""
    base = lora.get_base_layer()
    state = getattr(base, ATTR)
    return state, (base.weight.t() if state.fan_in_fan_out else base.weight)


def _check_lora(lora: nn.Module, name: str, adapter: str | None = None) -> None:
    """Refuse what the masked delta does not cover: LoRA variants (DoRA and others) and LoRA on
    a Conv2d; ``adapter`` None checks every adapter of the layer."""
    names = list(lora.lora_A) if adapter is None else [adapter]
    for key in names:
        variant = getattr(lora, "lora_variant", {}).get(key)
        if variant is not None or getattr(lora, "use_dora", {}).get(key, False):
            kind = type(variant).__name__ if variant is not None else "DoRA"
            raise NMTargetError(
                f"{name}: LoRA adapter {key!r} uses the variant {kind} (e.g. use_dora=True), "
                f"whose merged weight nmsparse_hf cannot keep N:M. Use plain LoRA "
                f"(use_dora=False), or leave the layer dense (exclude_modules={[name]!r})."
            )
    if names and not isinstance(lora.lora_A[names[0]], nn.Linear):
        raise NMTargetError(
            f"{name}: LoRA on a {type(lora.get_base_layer()).__name__} layer is not supported "
            f"with N:M masking. Leave it out of the LoRA target_modules, or exclude it here "
            f"(exclude_modules={[name]!r})."
        )


def _lora_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT's LoRA forward with each active adapter's delta masked like the base layer:
    ``base_layer(x) + dropout(x) @ ((scaling · B @ A) ⊙ mask)ᵀ (+ scaling · B.bias)``, with the
    mask of `LayerSparsity.delta_mask`. Gradients reach A and B through autograd (zero where the
    mask prunes). Outside the masked phases and while disabled or merged, PEFT's own forward."""
    state, weight = _lora_base(self)
    spec = state.delta_mask(weight.detach())
    if spec is None or self.disable_adapters or self.merged:
        return type(self).forward(self, x, *args, **kwargs)
    if kwargs.get("adapter_names") is not None:
        raise NMSparsityError(
            f"{state.name}: per-sample adapter_names (mixed-batch LoRA inference) is not "
            f"supported while N:M masks are attached. Call finalize() and merge_and_unload(), or "
            f"run one adapter at a time."
        )
    self._check_forward_args(x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    result_dtype = result.dtype
    mask, alpha = spec
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        _check_lora(self, state.name, name)
        lora_a, lora_b, scaling = self.lora_A[name], self.lora_B[name], self.scaling[name]
        delta = _masked_delta((lora_b.weight @ lora_a.weight) * scaling, mask, alpha)
        bias = None if lora_b.bias is None else lora_b.bias * scaling
        x_a = self._cast_input_dtype(x, lora_a.weight.dtype)
        result = result + F.linear(self.lora_dropout[name](x_a), delta, bias)
    return result.to(result_dtype)


def _lora_delta_weight(self: nn.Module, adapter: str) -> torch.Tensor:
    """PEFT's ``get_delta_weight`` (what ``merge`` / ``merge_and_unload`` add to the base weight)
    masked as `_lora_forward` masks it, so that merging keeps the base layer N:M."""
    delta = type(self).get_delta_weight(self, adapter)
    state, weight = _lora_base(self)
    spec = state.delta_mask(weight.detach())
    if spec is None:
        return delta
    mask, alpha = spec
    mask = mask.t() if state.fan_in_fan_out else mask  # PEFT's delta is laid out as stored
    return _masked_delta(delta, mask.to(delta.device), alpha)


@dataclass
class LayerCheck:
    """One row of a verification: a layer (block), its target pattern and what was found."""

    name: str
    location: str
    pattern: Pattern
    shape: tuple[int, ...]
    nonzeros: int
    violations: int
    max_nonzeros: int
    negative_zeros: int = 0

    @property
    def numel(self) -> int:
        """Entries of the block."""
        return math.prod(self.shape)

    @property
    def sparsity(self) -> float:
        """Fraction of exact zeros in the block."""
        return 1.0 - self.nonzeros / self.numel if self.numel else 0.0

    @property
    def ok(self) -> bool:
        return self.violations == 0


@dataclass
class VerificationReport:
    """Result of `verify_nm` / `NMSparsifier.verify`: one `LayerCheck` per targeted block."""

    layers: list[LayerCheck] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.layers) and not self.problems and all(c.ok for c in self.layers)

    @property
    def negative_zeros(self) -> int:
        """Zeros stored as -0.0 over all layers: N:M all the same (-0.0 == 0), but tools that
        read bit patterns (2:4 compressors) count them as non-zeros."""
        return sum(c.negative_zeros for c in self.layers)

    def warnings(self) -> list[str]:
        """Findings that do not fail the verification (today: negative zeros)."""
        bad = [c for c in self.layers if c.negative_zeros]
        if not bad:
            return []
        names = ", ".join(f"{c.name} ({c.negative_zeros})" for c in bad[:3])
        return [
            f"{self.negative_zeros} zero weight(s) are stored as -0.0 in {len(bad)} layer "
            f"block(s): {names}{' ...' if len(bad) > 3 else ''}. Tools that read bit patterns "
            f"(2:4 compressors) count -0.0 as a non-zero. Rewrite them as +0.0 "
            f"(w.masked_fill_(w == 0, 0)); nmsparse_hf's finalize writes +0.0."
        ]

    def raise_if_failed(self) -> VerificationReport:
        """Raise `NMVerificationError` listing the failing layers; return self when all pass."""
        if not self.ok:
            bad = [c for c in self.layers if not c.ok]
            lines = [
                f"{c.name} [{c.location}] is not {c.pattern[0]}:{c.pattern[1]}: {c.violations} "
                f"group(s) hold more than {c.pattern[0]} non-zeros (max {c.max_nonzeros})"
                for c in bad[:10]
            ]
            lines += self.problems
            if not self.layers:
                lines.append("no targeted layer to verify")
            raise NMVerificationError(
                "N:M verification failed:\n  "
                + "\n  ".join(lines)
                + "\nFinalize the model (NMSparsifier.finalize()) before saving, and do not edit "
                "the weights of a sparse checkpoint."
            )
        return self

    def __str__(self) -> str:
        rows = [("layer", "loc", "N:M", "shape", "sparsity", "bad groups", "status")]
        for c in self.layers:
            rows.append(
                (
                    c.name,
                    c.location,
                    f"{c.pattern[0]}:{c.pattern[1]}",
                    "x".join(map(str, c.shape)),
                    f"{c.sparsity:.4f}",
                    str(c.violations),
                    "ok" if c.ok else "FAIL",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        text = "\n".join(
            "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows
        )
        summary = f"{sum(c.ok for c in self.layers)}/{len(self.layers)} layers N:M-compliant"
        extra = "".join(f"\nproblem: {p}" for p in self.problems)
        extra += "".join(f"\nwarning: {w}" for w in self.warnings())
        return f"{text}\n{summary}{extra}"


def check_layer(
    name: str, weight: torch.Tensor, location: str, pattern: Pattern, dim: str
) -> LayerCheck:
    """Verify one weight (or block) against its N:M pattern: the only place that counts the
    non-zeros of a sparse weight (for verification, metadata and reports alike), and its zeros
    stored as -0.0 (``negative_zeros``: a warning, not a failure)."""
    counts = nm_group_nonzeros(weight, pattern[1], dim)
    negative = 0
    if weight.is_floating_point():
        negative = int((torch.signbit(weight) & (weight == 0)).sum())
    return LayerCheck(
        name=name,
        location=location,
        pattern=tuple(pattern),
        shape=tuple(weight.shape),
        nonzeros=int(counts.sum()),  # the groups cover every entry
        violations=int((counts > pattern[0]).sum()),
        max_nonzeros=int(counts.max()) if counts.numel() else 0,
        negative_zeros=negative,
    )


def block_specs(target: TargetLayer | LayerSparsity, patterns: list[Pattern]) -> list[dict]:
    """The JSON form of a target's blocks at ``patterns`` (as checkpoint metadata records them):
    ``{"location", "rows", "n_keep", "m"}`` dicts, plus ``"fan_in_fan_out": True`` for a Conv1D
    (stored weight ``[in, out]``; its ``rows`` are rows of the transposed, ``[out, in]``, weight).
    """
    extra = {"fan_in_fan_out": True} if target.fan_in_fan_out else {}
    return [
        {
            "location": b.location,
            "rows": list(b.rows) if b.rows else None,
            "n_keep": p[0],
            "m": p[1],
            **extra,
        }
        for b, p in zip(target.blocks, patterns, strict=True)
    ]


def check_blocks(
    report: VerificationReport, name: str, weight: torch.Tensor, blocks: list, dim: str
) -> None:
    """The one verification loop: check each block of one layer's ``weight`` against its
    pattern and add a `LayerCheck` (or a problem) to ``report``.

    ``blocks`` are dicts ``{"location", "rows", "n_keep", "m"[, "fan_in_fan_out"]}``:
    ``rows`` selects rows of the weight as the layer computes with it (``[out, in]``);
    ``fan_in_fan_out`` says the stored weight is ``[in, out]`` (GPT-2's Conv1D), so it is
    transposed first. A block that does not fit the weight is a problem, never an exception.
    """
    for spec in blocks:
        rows, loc = spec.get("rows"), spec["location"]
        pattern = (int(spec["n_keep"]), int(spec["m"]))
        label = name + ("" if not rows else f"[{loc}]")
        if weight.dim() < 2:
            report.problems.append(
                f"{label}: the weight has shape {tuple(weight.shape)}, not a layer's weight"
            )
            continue
        part = weight.t() if spec.get("fan_in_fan_out") and weight.dim() == 2 else weight
        if rows and not 0 <= rows[0] < rows[1] <= part.shape[0]:
            report.problems.append(
                f"{label}: metadata rows {list(rows)} do not fit the weight's shape "
                f"{tuple(weight.shape)}"
            )
            continue
        part = part[rows[0] : rows[1]] if rows else part
        try:
            report.layers.append(check_layer(label, part, loc, pattern, dim))
        except NMSparsityError as exc:
            report.problems.append(f"{label}: metadata does not match the weights: {exc}")


class NMSparsifier:
    """N:M sparsity for a model: attach, follow the schedule step by step, finalize, verify.

    Args:
        model: any ``nn.Module``; attach before wrapping it in DDP/FSDP/``torch.compile``.
        config: the `NMSparsityConfig`.
        total_steps: the total number of optimizer steps of the run (phases are fractions of it),
            or None to give it later with `set_total_steps` (the Trainer does, from max_steps).
        compile_masks: compute each step's masks in `update` with `compiled_nm_mask` (the same
            masks, by one inductor kernel per layer shape and pattern) instead of the eager
            kernel: for a model that runs under ``torch.compile``. The Trainer's callback sets it
            when ``TrainingArguments.torch_compile`` compiles with inductor (the default backend).
            May be changed between steps.

    Raises at construction (before any training step): `NMTargetError` for an unknown model family
    without patterns, a location or pattern matching no layer, or a layer whose grouped dimension
    M (of the target or of any SDGF stage) does not divide; `NMSparsityConfigError` for a schedule
    that cannot fit.
    """

    def __init__(
        self,
        model: nn.Module,
        config: NMSparsityConfig,
        total_steps: int | None,
        *,
        compile_masks: bool = False,
    ):
        self.model = model
        self.config = config
        self.total_steps = total_steps
        self.compile_masks = compile_masks
        # validates total_steps and the phase fractions now; rebuilt with the used locations below
        self.schedule = SparsitySchedule(
            config, _PROVISIONAL_STEPS if total_steps is None else total_steps
        )
        self.targets: list[TargetLayer] = []
        self.skipped: list[SkippedLayer] = []
        self.layers: dict[str, LayerSparsity] = {}
        self.locations: tuple[str, ...] = ()
        self.plan: StepPlan | None = None
        self._last_masks: dict[str, torch.Tensor] = {}
        self._mask_step: int | None = None  # the step whose masks the layers hold
        if not config.enabled:
            return
        self.targets, self.skipped = find_targets(model, config)
        self.locations = tuple(dict.fromkeys(b.location for t in self.targets for b in t.blocks))
        self.schedule = SparsitySchedule(
            config,
            _PROVISIONAL_STEPS if total_steps is None else total_steps,
            locations=self.locations,
        )
        stage_maps = self._validate_shapes()
        for target in self.targets:
            if hasattr(target.module, ATTR):
                raise NMTargetError(
                    f"{target.name}: already has an NMSparsifier attached. Call detach() on the "
                    f"old one first."
                )
            if target.adapter is not None:
                _check_lora(target.adapter, target.name)
        held = self._weight_patterns() if config.mask_source == "weights" else {}
        for target in self.targets:
            state = LayerSparsity(target, config.sparse_dim, stage_maps[target.name])
            if target.name in held:  # held from step 0, as a frozen fine-tune holds its mask
                state.frozen_mask, state.freeze_pruned = held[target.name], True
            setattr(target.module, ATTR, state)
            target.module.forward = types.MethodType(_FORWARDS[target.kind], target.module)
            if target.adapter is not None:
                lora = target.adapter
                lora.forward = types.MethodType(_lora_forward, lora)
                lora.get_delta_weight = types.MethodType(_lora_delta_weight, lora)
            self.layers[target.name] = state
        if total_steps is not None:
            self.update(0)

    def set_total_steps(self, total_steps: int) -> None:
        """Set (or change) the run length, e.g. once the Trainer knows ``max_steps``.

        Raises `NMSparsityConfigError` if the sparse phase becomes too short for the SDGF stages.
        """
        self.schedule = SparsitySchedule(self.config, total_steps, locations=self.locations or None)
        self.total_steps = total_steps

    @property
    def finalized(self) -> bool:
        """True once `finalize` has baked the target masks into the weights."""
        return bool(self.layers) and all(s.final for s in self.layers.values())

    # ------------------------------------------------------------------ setup
    def _validate_shapes(self) -> dict[str, list[dict[Pattern, Pattern]]]:
        """Check every stage pattern fits every block; build per-block stage substitutions."""
        errors: list[str] = []
        maps: dict[str, list[dict[Pattern, Pattern]]] = {}
        for target in self.targets:
            shape = target.shape
            maps[target.name] = []
            for block in target.blocks:
                bshape = (
                    shape if block.rows is None else (block.rows[1] - block.rows[0],) + shape[1:]
                )
                label = target.name + ("" if block.rows is None else f" [{block.location} rows]")
                seq = self.schedule.stages[block.location]
                fits = [self._fits(bshape, p[1]) for p in seq]
                if not fits[-1]:
                    errors.append(self._shape_error(label, bshape, seq[-1][1]))
                    continue
                subst: dict[Pattern, Pattern] = {}
                for i, pattern in enumerate(seq):
                    if fits[i]:
                        subst[pattern] = pattern
                    elif self.config.structure_decay_fallback:
                        subst[pattern] = next(seq[k] for k in range(i, len(seq)) if fits[k])
                    else:
                        errors.append(
                            self._shape_error(label, bshape, pattern[1])
                            + f" (SDGF stage {pattern[0]}:{pattern[1]}; or set "
                            f"structure_decay_fallback=True to skip stages that do not fit)"
                        )
                maps[target.name].append(subst)
        if errors:
            more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
            raise NMTargetError(
                "layers cannot take the configured N:M pattern:\n  "
                + "\n  ".join(errors[:10])
                + more
            )
        # the target pattern is the last key of each stage map; keep the sequence order
        for target in self.targets:
            for k, block in enumerate(target.blocks):
                seq = self.schedule.stages[block.location]
                maps[target.name][k] = {p: maps[target.name][k][p] for p in seq}
        return maps

    @torch.no_grad()
    def _weight_patterns(self) -> dict[str, torch.Tensor]:
        """``mask_source="weights"``: each target's mask is its weight's non-zero pattern (laid
        out ``[out, in]``), which must already be N:M at every block's target pattern."""
        errors: list[str] = []
        masks: dict[str, torch.Tensor] = {}
        for target in self.targets:
            weight = _laid_out(target).detach()
            masks[target.name] = weight != 0
            for block in target.blocks:
                pattern = self.config.target_pattern(block.location)
                part = block.part(weight)
                check = check_layer(
                    target.name, part, block.location, pattern, self.config.sparse_dim
                )
                if not check.ok:
                    groups = check.numel // pattern[1]
                    errors.append(
                        f"{target.name}"
                        + ("" if block.rows is None else f" [{block.location} rows]")
                        + f": {check.violations} of {groups} groups hold more than {pattern[0]}"
                        f" non-zeros (up to {check.max_nonzeros}; target {pattern[0]}:"
                        f"{pattern[1]}, {block.location})"
                    )
        if errors:
            more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
            raise NMTargetError(
                "mask_source='weights' holds each targeted weight's non-zero pattern, so it must "
                "already be N:M:\n  "
                + "\n  ".join(errors[:10])
                + more
                + "\nPrune the model to the target pattern first (one-shot pruning: magnitude, "
                "Wanda or SparseGPT), or use mask_source='magnitude' to train the pattern."
            )
        return masks

    def _fits(self, shape: tuple[int, ...], m: int) -> bool:
        try:
            check_divisible(shape, m, self.config.sparse_dim)
        except NMSparsityError:
            return False
        return True

    def _shape_error(self, label: str, shape: tuple[int, ...], m: int) -> str:
        try:
            check_divisible(shape, m, self.config.sparse_dim, name=label)
        except NMSparsityError as exc:
            return str(exc)
        return label

    # ------------------------------------------------------------------ per step
    def update(self, step: int) -> StepPlan:
        """Apply the plan of 0-based optimizer step ``step`` to every layer and return it.

        Pure in the step (resuming at ``t`` gives the plan of an uninterrupted run at ``t``), except
        for ``finetune_mask="frozen"``: entering fine-tune fixes each layer's mask and zeroes its
        pruned weights, and every later call zeroes them again (optimizers such as Adam move
        weights whose gradient is zero). ``mask_source="weights"`` holds the mask fixed at
        attach the same way from step 0.
        """
        if self.total_steps is None:
            raise NMSparsityError(
                "NMSparsifier.update: the run length is not set. Pass total_steps to the "
                "constructor or call set_total_steps(n) first."
            )
        plan = self.schedule.at(step)
        self.plan = plan
        cfg = self.config
        lam = cfg.srste_lambda if cfg.sparsity_type == "srste" else 0.0
        frozen = cfg.mask_source == "weights" or (
            plan.phase == "finetune" and cfg.finetune_mask == "frozen"
        )
        alpha: float | torch.Tensor = plan.alpha
        new_step = step != self._mask_step
        self._mask_step = step
        for state in self.layers.values():
            if new_step:  # one mask per optimizer step, recomputed from W now
                state.cached_mask = None
            state.active = plan.masked
            state.srste_lambda = lam if plan.masked else 0.0
            state.freeze_pruned = frozen
            state.kernel = compiled_nm_mask if self.compile_masks else nm_mask
            state.patterns = [
                state.stage_maps[i][plan.patterns[b.location]] if plan.masked else None
                for i, b in enumerate(state.blocks)
            ]
            if cfg.mask_decay and plan.phase == "sparse":
                # a 0-d tensor, updated in place, so torch.compile does not recompile each step
                if not isinstance(state.alpha, torch.Tensor):
                    state.alpha = torch.tensor(alpha, dtype=torch.float32)
                state.alpha.fill_(alpha)
            else:
                state.alpha = 0.0
        if frozen:
            self._apply_frozen_masks()
        self._prepare_step_masks()
        return plan

    @torch.no_grad()
    def _prepare_step_masks(self) -> None:
        """Compute this step's mask of every masked layer now, outside any compiled graph: eager
        forwards find it in the mask cache, compiled ones read it as a graph input
        (``LayerSparsity.step_mask``) instead of recomputing it in every forward. Under FSDP it
        computes nothing: the forward computes the mask where the weight is whole.
        The Trainer's ``on_step_end`` and the next ``on_step_begin`` update to the same step: the
        second call finds the masks cached and computes nothing."""
        sharded = _fully_sharded(self.model)
        pending: list[tuple[LayerSparsity, torch.Tensor]] = []
        for target in self.targets:
            state = self.layers[target.name]
            weight = target.module.weight
            if not state.masked or sharded or _mask_key(weight) is None:
                state.step_mask = state.step_bytes = None
                continue
            pending.append((state, weight.t() if target.fan_in_fan_out else weight))
        if self.compile_masks:
            self._compile_step_masks(pending)
        for state, weight in pending:
            state.step_mask = state.mask(weight)
            state.step_bytes = state.step_mask.view(torch.uint8)

    def _compile_step_masks(self, pending: list[tuple[LayerSparsity, torch.Tensor]]) -> None:
        """Compute the masks `LayerSparsity.mask` would compute one by one with one
        `compiled_nm_masks` call per weight shape, dtype and pattern, and cache them."""
        groups: dict[tuple, list[tuple[LayerSparsity, tuple, torch.Tensor]]] = {}
        for state, weight in pending:
            todo = state.pending_mask(weight)
            if todo is not None:
                key, pattern = todo
                group = (tuple(weight.shape), weight.dtype, weight.device, pattern, state.dim)
                groups.setdefault(group, []).append((state, key, weight))
        for (*_, (n, m), dim), members in groups.items():
            masks = compiled_nm_masks([weight for *_, weight in members], n, m, dim)
            for (state, key, _), mask in zip(members, masks, strict=True):
                state.cached_mask = (key, mask)

    @torch.no_grad()
    def _apply_frozen_masks(self) -> None:
        for target in self.targets:
            state = self.layers[target.name]
            weight = _laid_out(target)
            if state.frozen_mask is None or state.frozen_mask.shape != weight.shape:
                # fixed now (or per shard once FSDP2 sharded the weight the mask was taken from)
                state.frozen_mask = (
                    weight != 0
                    if self.config.mask_source == "weights"
                    else state.mask(weight, state.target_patterns)
                )
            # the model may have moved since the mask was fixed (e.g. to the GPU): it follows
            state.frozen_mask = state.frozen_mask.to(weight.device)
            weight.masked_fill_(~state.frozen_mask, 0)

    # ------------------------------------------------------------------ end of training
    @torch.no_grad()
    def finalize(self) -> VerificationReport:
        """Bake the target masks into the weights (W ← W ⊙ Φ(W; target), or the held mask of
        ``finetune_mask="frozen"`` / ``mask_source="weights"``), switch every layer to its plain
        forward, and return the verification. Pruned entries become +0.0 (never -0.0, which
        bit-pattern readers count as non-zero); kept ones keep their bits. Idempotent."""
        for target in self.targets:
            state = self.layers[target.name]
            weight = _laid_out(target)
            held = state.frozen_mask
            if not (state.freeze_pruned and held is not None and held.shape == weight.shape):
                held = state.mask(weight, state.target_patterns)
            weight.masked_fill_(~held.to(weight.device), 0)
            state.final = True
            state.active = False
            state.cached_mask = None
        return self.verify()

    def verify(self, strict: bool = True) -> VerificationReport:
        """Check every targeted block is N:M-compliant at its target pattern (on this rank's
        shard under FSDP2: row groups never span shards).

        Returns the `VerificationReport`; with ``strict`` raises `NMVerificationError` on failure.
        """
        report = VerificationReport()
        for target in self.targets:
            state = self.layers[target.name]
            blocks = block_specs(target, state.target_patterns)
            check_blocks(report, target.name, _shard(target).detach(), blocks, state.dim)
        if not self.targets and self.config.enabled:
            report.problems.append("no layer is targeted")
        if strict:
            report.raise_if_failed()
        return report

    def detach(self) -> None:
        """Remove the sparse forwards; the model is a plain model again (weights as they are)."""
        for target in self.targets:
            module = target.module
            if getattr(module, ATTR, None) is self.layers.get(target.name):
                del module.forward
                delattr(module, ATTR)
                if target.adapter is not None:
                    del target.adapter.forward, target.adapter.get_delta_weight
        self.layers = {}

    # ------------------------------------------------------------------ reporting
    @torch.no_grad()
    def stats(self) -> dict[str, float]:
        """Per-location realised sparsity of the effective weights and mask flip rate since the
        previous call (the fraction of mask entries that changed), for logging."""
        out: dict[str, float] = {}
        plan = self.plan
        if plan is None or not self.layers:
            return out
        zeros: dict[str, list[float]] = {}
        flips: dict[str, list[float]] = {}
        for target in self.targets:
            state = self.layers[target.name]
            weight = _laid_out(target).detach()
            if state.final:
                masks = [(b, b.part(weight) != 0) for b in target.blocks]
                eff = weight
            elif state.active:
                full = state.mask(weight)
                masks = [(b, b.part(full)) for b in target.blocks]
                eff = state.effective(weight)
            else:
                masks, eff = [], weight
            for block in target.blocks:
                part = block.part(eff)
                zeros.setdefault(block.location, [0.0, 0.0])
                zeros[block.location][0] += part.numel() - count_nonzeros(part)
                zeros[block.location][1] += part.numel()
            for block, mask in masks:
                key = f"{target.name}:{block.location}"
                prev = self._last_masks.get(key)
                if prev is not None and prev.shape == mask.shape:
                    flips.setdefault(block.location, [0.0, 0.0])
                    flips[block.location][0] += float((prev != mask).sum())
                    flips[block.location][1] += mask.numel()
                self._last_masks[key] = mask.clone()
        for loc, (z, total) in zeros.items():
            out[f"sparsity/{loc}"] = z / max(total, 1)
        for loc, (f, total) in flips.items():
            out[f"mask_flip_rate/{loc}"] = f / max(total, 1)
        return out

    def report(self) -> str:
        """A table of targeted layers (location, pattern now and at the end) and skipped layers
        with the reason."""
        plan = self.plan
        lines = [
            f"nmsparse_hf: {self.config.recipe_name}, dim={self.config.sparse_dim}, "
            f"phase={plan.phase if plan else '-'} step={plan.step if plan else '-'}"
        ]
        lines.append(f"targeted ({sum(len(t.blocks) for t in self.targets)} blocks):")
        for target in self.targets:
            state = self.layers[target.name]
            for i, block in enumerate(target.blocks):
                now = state.patterns[i]
                tgt = state.target_patterns[i]
                rows = "" if block.rows is None else f" rows {block.rows[0]}:{block.rows[1]}"
                lines.append(
                    f"  {target.name}{rows}  {block.location}  "
                    f"target {tgt[0]}:{tgt[1]}  now {'dense' if now is None else f'{now[0]}:{now[1]}'}"
                )
        lines.append(f"skipped ({len(self.skipped)}):")
        for skip in self.skipped:
            lines.append(
                f"  {skip.name}  {skip.kind} {'x'.join(map(str, skip.shape))}  {skip.reason}"
            )
        return "\n".join(lines)

    def metadata(self) -> dict:
        """What a sparse checkpoint records about the method (docs/METHOD.md, "Checkpoint
        format"): patterns, dim, locations, recipe, config and, per targeted layer (current module
        names), its blocks at their target patterns. Reads no weight, so it needs no collective
        under FSDP; the export adds the counts from the weights it writes."""
        from . import __version__

        cfg = self.config
        layers = {t.name: block_specs(t, self.layers[t.name].target_patterns) for t in self.targets}
        used = sorted({b.location for t in self.targets for b in t.blocks})
        return {
            "library_version": __version__,
            "n_keep": cfg.n_keep,
            "m": cfg.m,
            "n_keep_qkv": cfg.n_keep_qkv,
            "m_qkv": cfg.m_qkv,
            "sparse_dim": cfg.sparse_dim,
            "locations": {loc: list(cfg.target_pattern(loc)) for loc in used},
            "recipe": cfg.recipe_name,
            "config": cfg.to_dict(),
            "layers": layers,
        }


def verify_nm(
    model: nn.Module, layers: dict | None = None, sparse_dim: str | None = None, strict: bool = True
) -> VerificationReport:
    """Verify that a model's sparse layers are N:M-compliant.

    Which layers: ``layers`` (the ``"layers"`` mapping of `NMSparsifier.metadata`), else the layers
    of an attached sparsifier, else the ``nm_sparsity`` metadata in ``model.config``. A named layer
    missing from the model, or metadata that does not match the weights' shape, is a problem.

    Returns the `VerificationReport`; with ``strict`` raises `NMVerificationError` on failure.
    """
    modules = dict(model.named_modules())
    meta = getattr(getattr(model, "config", None), "nm_sparsity", None)
    if layers is None:
        attached = {n: getattr(m, ATTR) for n, m in modules.items() if hasattr(m, ATTR)}
        if attached:
            layers = {n: block_specs(s, s.target_patterns) for n, s in attached.items()}
            sparse_dim = sparse_dim or next(iter(attached.values())).dim
        elif isinstance(meta, dict):
            layers = layers_for_model(meta, modules)  # on-disk or current names
            sparse_dim = sparse_dim or meta.get("sparse_dim", "row")
    if not layers:
        raise NMVerificationError(
            f"{type(model).__name__}: nothing says which layers should be N:M (no attached "
            f"NMSparsifier, no nm_sparsity metadata in its config). Pass layers=..., or load a "
            f"checkpoint saved by nmsparse_hf."
        )
    sparse_dim = sparse_dim or "row"
    report = VerificationReport()
    for name, blocks in layers.items():
        weight = getattr(modules.get(name), "weight", None)
        if not isinstance(weight, torch.Tensor):
            report.problems.append(f"layer {name!r} named in the metadata is not in the model")
            continue
        check_blocks(report, name, _local(weight).detach(), blocks, sparse_dim)
    if strict:
        report.raise_if_failed()
    return report
