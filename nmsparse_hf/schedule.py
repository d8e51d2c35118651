"""The sparsity schedule: a pure function from an optimizer step to the plan for that step.

Steps are 0-based optimizer steps: ``at(t)`` is the plan for the forward/backward passes that lead
to optimizer step ``t + 1`` (in the HF Trainer, ``state.global_step == t`` during them).

Phases (docs/METHOD.md §5), with ``T = total_steps``:

* ``sparse_start = round(dense_fraction * T)``, ``finetune_start = T - round(finetune_fraction * T)``
  (round half up);
* ``dense``    for ``0 <= t < sparse_start``;
* ``sparse``   for ``sparse_start <= t < finetune_start``;
* ``finetune`` for ``t >= finetune_start`` (steps past ``T`` stay in fine-tune).

In the sparse phase ``j = t - sparse_start``; MDGF's alpha is a function of ``j``; SDGF cuts the
sparse phase into K equal stages, stage ``i = floor(j * K / L)`` with ``L = finetune_start -
sparse_start``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

from .config import NMSparsityConfig
from .errors import NMSparsityConfigError

Pattern = tuple[int, int]


def stepwise_patterns(n: int, m: int) -> list[Pattern]:
    """SDGF-stepwise stages: (M-1):M, then M/2:M, M/4:M, ... while above N, then N:M.

    1:8 -> [7:8, 4:8, 2:8, 1:8]; 2:4 -> [3:4, 2:4]; 3:4 -> [3:4].
    """
    keeps = [m - 1]
    k = m // 2
    while k > n:
        if k < keeps[-1]:
            keeps.append(k)
        k //= 2
    if keeps[-1] != n:
        keeps.append(n)
    return [(k, m) for k in keeps]


def geometric_patterns(n: int, m: int, start_k: int = 8) -> list[Pattern]:
    """SDGF-geometric stages: (k·N):(k·M) for k = start_k, start_k/2, ..., 1 (constant density).

    1:8 with start_k 8 -> [8:64, 4:32, 2:16, 1:8].
    """
    out = []
    k = start_k
    while k >= 1:
        out.append((k * n, k * m))
        k //= 2
    return out


def stage_patterns(config: NMSparsityConfig, location: str) -> list[Pattern]:
    """The SDGF stage sequence for a location (just ``[target]`` without structure decay)."""
    n, m = config.target_pattern(location)
    if not config.structure_decay:
        return [(n, m)]
    if config.structure_decay_type == "sparsify":
        return stepwise_patterns(n, m)
    return geometric_patterns(n, m, config.structure_decay_start_k)


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


@dataclass(frozen=True)
class StepPlan:
    """What the sparsifier does at one optimizer step.

    Attributes:
        step: the 0-based optimizer step.
        phase: ``dense``, ``sparse`` or ``finetune``.
        alpha: the MDGF factor for pruned weights in the forward (0 = binary mask; 1 in dense).
        patterns: (n_keep, m) per configured location for this step (the stage pattern in SDGF).
        stage: the SDGF stage index (0 when there is a single stage; the last stage in fine-tune).
        j: steps since the sparse phase began (0 before it).
    """

    step: int
    phase: str
    alpha: float
    patterns: dict[str, Pattern] = field(default_factory=dict)
    stage: int = 0
    j: int = 0

    @property
    def masked(self) -> bool:
        """True when the forward uses masked weights (sparse or fine-tune phase)."""
        return self.phase != "dense"


class SparsitySchedule:
    """``SparsitySchedule(config, total_steps).at(step)`` -> `StepPlan`. Pure: no state changes.

    ``locations`` (default ``config.locations``) are those the plan gives patterns for; the
    sparsifier passes the locations its layers actually use (explicit targets may add Q/K/V/O).

    Raises `NMSparsityConfigError` when ``total_steps`` is not a positive integer, or when the
    sparse phase is too short to hold every SDGF stage (each stage needs at least one step).
    """

    def __init__(
        self,
        config: NMSparsityConfig,
        total_steps: int,
        locations: tuple[str, ...] | None = None,
    ):
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise NMSparsityConfigError(
                f"total_steps = {total_steps!r}: the schedule needs the total number of optimizer "
                f"steps as a positive integer (with streaming data, set max_steps)."
            )
        self.config = config
        self.total_steps = total_steps
        self.sparse_start = _round_half_up(config.dense_fraction * total_steps)
        self.finetune_start = total_steps - _round_half_up(config.finetune_fraction * total_steps)
        self.sparse_steps = self.finetune_start - self.sparse_start
        self.locations = tuple(config.locations if locations is None else locations)
        self.stages = {loc: stage_patterns(config, loc) for loc in self.locations}
        self.num_stages = max((len(s) for s in self.stages.values()), default=1)
        if config.enabled and self.sparse_steps < self.num_stages:
            raise NMSparsityConfigError(
                f"the sparse phase has {self.sparse_steps} optimizer step(s) (total_steps="
                f"{total_steps}, dense_fraction={config.dense_fraction}, finetune_fraction="
                f"{config.finetune_fraction}) but needs at least {self.num_stages} for its "
                f"{self.num_stages} SDGF stage(s). Train longer or shrink the dense/fine-tune "
                f"fractions."
            )

    def alpha(self, j: int) -> float:
        """The MDGF factor after ``j`` sparse steps: step -> 0, linear -> max(1 - βj, 0),
        exp -> exp(-βj). Always 0 for STE/SR-STE."""
        cfg = self.config
        if not cfg.mask_decay:
            return 0.0
        if cfg.decay_type == "linear":
            return max(1.0 - cfg.decay_coef * j, 0.0)
        return math.exp(-cfg.decay_coef * j)

    def phase(self, step: int) -> str:
        """``dense``, ``sparse`` or ``finetune`` for a 0-based optimizer step."""
        if not self.config.enabled or step < self.sparse_start:
            return "dense"
        if step < self.finetune_start:
            return "sparse"
        return "finetune"

    def stage_index(self, step: int, num_stages: int) -> int:
        """The SDGF stage of ``step`` for a sequence of ``num_stages`` patterns."""
        phase = self.phase(step)
        if phase == "dense":
            return 0
        if phase == "finetune":
            return num_stages - 1
        j = step - self.sparse_start
        return min(j * num_stages // self.sparse_steps, num_stages - 1)

    def at(self, step: int) -> StepPlan:
        """The plan for 0-based optimizer step ``step`` (a pure function of ``step``)."""
        if step < 0:
            raise NMSparsityConfigError(f"step = {step} must be >= 0.")
        phase = self.phase(step)
        if phase == "dense":
            return StepPlan(step=step, phase="dense", alpha=1.0, patterns={}, stage=0, j=0)
        j = step - self.sparse_start
        patterns = {}
        stage = 0
        for loc, seq in self.stages.items():
            i = self.stage_index(step, len(seq))
            patterns[loc] = seq[i]
            stage = max(stage, i)
        alpha = self.alpha(j) if phase == "sparse" else 0.0
        return StepPlan(step=step, phase=phase, alpha=alpha, patterns=patterns, stage=stage, j=j)

    def boundaries(self) -> dict[str, int]:
        """First step of each phase and of each SDGF stage (for docs, logs and plots)."""
        out = {"dense": 0, "sparse": self.sparse_start, "finetune": self.finetune_start}
        for loc, seq in self.stages.items():
            for i in range(1, len(seq)):
                first = self.sparse_start + math.ceil(i * self.sparse_steps / len(seq))
                out[f"{loc}:stage{i}"] = first
        return out

    def table(self, every: int | None = None) -> Iterator[StepPlan]:
        """Plans at every ``every``-th step plus each boundary and the last step, in step order
        (for printing and plotting). A generator: a table of 10^9 rows is never held in memory."""
        every = every or max(self.total_steps // 20, 1)
        marks = set(self.boundaries().values()) | {self.total_steps - 1}
        marks = sorted(s for s in marks if 0 <= s < self.total_steps)
        regular = 0  # the next multiple of `every`
        for mark in marks:
            while regular < mark:
                yield self.at(regular)
                regular += every
            yield self.at(mark)
            if regular == mark:
                regular += every
