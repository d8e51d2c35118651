"""Train-step time and memory of each N:M recipe relative to dense, and against the paper authors'
algorithm, on a ViT-S/16-shaped model.

One process builds ``ViTForImageClassification`` from a ``ViTConfig`` (ViT-S/16-224 by default,
``--vit-b`` for ViT-B/16), one copy per variant (same initial weights) with its own AdamW, and runs
the variants round-robin: step k of every variant runs before step k+1 of any, so load from other
processes hits all variants alike, and in a new random order each round, so that no variant
always runs right after another (whose caches or allocations it would inherit). A train step is
``sparsifier.update(step)`` + forward + loss + backward + ``optimizer.step()`` + ``zero_grad``;
the sparsifier is in its sparse phase (masks on FF, ``--pattern``, row) from the first step.
``--progress P`` starts the timed steps at fraction P of the schedule (of 100,000 steps), where
SDGF runs a later, sparser stage and MDGF a smaller alpha; the patterns in use are printed.

Variants:

* ``dense`` and the library's recipes ``STE``, ``SR-STE``, ``MDGF-lin``, ``MDGF-exp``, ``SDGF``
  (stepwise) and ``SDGF-geo`` (geometric).
* ``dense-again``: a second dense copy, timed like the others. Its "overhead" is the noise floor
  of the run (an A/A test): an overhead within its spread is not resolved by that run.
* ``authors``: the paper authors' algorithm as its description gives it, written here as a
  baseline: in every forward of every targeted layer, an ``argsort`` of |W| per group of M, the
  M-N smallest set to 0 in a float mask (``scatter``), ``F.linear`` on W * mask, and a
  straight-through gradient (the gradient at W * mask is written to W).
  ``authors-SR-STE`` adds the SR-STE term lambda (1 - mask) W to that gradient (lambda = 2e-4).
  Same layers as the library's (the FF preset), same pattern.

Per round k, each variant's step time is divided by dense's step time of the same round; the table
gives the median ratio and its interquartile range over the rounds, the overhead (ratio - 1) in
percent, and for each library recipe its overhead divided by the ``authors`` overhead
(``authors-SR-STE``'s for ``SR-STE`` when both run: the same algorithm on each side; the median
over rounds of ours over the median of theirs; the range is the 5-95% interval of the same
statistic over 2000 bootstrap resamples of the rounds). Targets: overhead <= 3% over dense, and
<= 1/3 of the authors' overhead.

Memory (counted in the warm-up steps, which are not timed: the counting hook costs time):
torch's CPU allocations are invisible to ``tracemalloc`` and process RSS barely moves when
the allocator reuses freed pages, so the script counts what training actually holds per step:
the bytes of the tensors autograd saves for backward (``saved_tensors_hooks``, unique storages,
parameters excluded since they exist anyway) -- the activation memory, which is where a sparse
forward adds anything -- and, as a second figure, that plus the fixed training state (parameters,
gradients, two AdamW moments).

``--compile`` runs every variant (dense included) through ``torch.compile`` (inductor), as
``TrainingArguments(torch_compile=True)`` would (the sparsifiers with ``compile_masks``, as the
Trainer sets it); the warm-up steps then include compilation, and the memory columns are left out
(autograd's saved-tensor hooks do not see inside a compiled graph).

``--profile RECIPE`` adds, after the timed rounds, one ``torch.profiler`` step of dense and of
RECIPE, and prints the operators whose self CPU time grew the most from dense to RECIPE (where
the extra passes of a sparse step go), then each step's top operators.

    python bench/step_overhead.py --batch 8 --repeats 10 --pattern 1:8
    python bench/step_overhead.py --batch 8 --repeats 5 --compile --warmup 2
    python bench/step_overhead.py --batch 8 --repeats 3 --profile SR-STE --recipes STE SR-STE
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import json
import random
import statistics
import time
import types

import torch
import torch._dynamo
import torch.nn.functional as F
from transformers import ViTConfig, ViTForImageClassification

from nmsparse_hf.config import NMSparsityConfig
from nmsparse_hf.sparsifier import ATTR, NMSparsifier
from nmsparse_hf.targets import find_targets

RECIPES: dict[str, dict | None] = {
    "dense": None,
    "STE": {"sparsity_type": "structure_nm", "decay_type": "step"},
    "SR-STE": {"sparsity_type": "srste"},
    "MDGF-lin": {"sparsity_type": "structure_nm", "decay_type": "linear", "decay_coef": 1e-6},
    "MDGF-exp": {"sparsity_type": "structure_nm", "decay_type": "exp", "decay_coef": 1e-3},
    "SDGF": {"structure_decay": True, "structure_decay_type": "sparsify"},
    "SDGF-geo": {
        "structure_decay": True,
        "structure_decay_type": "fine",
        "structure_decay_fallback": True,
    },
}
# the authors' algorithm (baseline variants): the SR-STE lambda of each
AUTHORS: dict[str, float] = {"authors": 0.0, "authors-SR-STE": 2e-4}
# a second dense copy timed like the others: its "overhead" is the run's noise floor (an A/A test)
CONTROL = "dense-again"
VARIANTS = [*RECIPES, CONTROL, *AUTHORS]
TOTAL_STEPS = 100_000  # the schedule's length (``--progress`` is a fraction of it)


# profiler range names (`--profile`)
LABELS = {
    "nm_mask": "nmsparse: mask",
    "_masked": "nmsparse: W~ (forward, backward)",
    "_straight_through": "nmsparse: gradient to W terms",
}
AUTHORS_LABEL = "authors: argsort mask + W*mask"


class PassClock:
    """Wall time spent inside the sparse passes of a step (the mask, building W~, the gradient
    terms; for the authors' baseline, its masked-weight Function), summed over the step:
    ``with PASS_CLOCK:`` around each pass. Nested uses count once."""

    def __init__(self):
        self.seconds = 0.0
        self._depth = 0
        self._start = 0.0

    def __enter__(self):
        if self._depth == 0:
            self._start = time.perf_counter()
        self._depth += 1

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            self.seconds += time.perf_counter() - self._start

    def take(self) -> float:
        """The seconds counted since the last call (and start over)."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds


PASS_CLOCK = PassClock()


class ArgsortMasked(torch.autograd.Function):
    """The authors' masked weight: argsort of |W| per row group of M in every forward, the M-N
    smallest zeroed in a float mask, straight-through gradient (+ lambda (1 - mask) W)."""

    @staticmethod
    def forward(ctx, weight, n: int, m: int, srste_lambda: float):
        with PASS_CLOCK:
            with torch.profiler.record_function(AUTHORS_LABEL):
                groups = weight.detach().abs().reshape(-1, m)
                pruned = torch.argsort(groups, dim=1)[:, : m - n]
                mask = torch.ones_like(groups).scatter_(1, pruned, 0.0).reshape(weight.shape)
            ctx.srste_lambda = srste_lambda
            if srste_lambda:
                ctx.save_for_backward(weight, mask)
            return weight * mask

    @staticmethod
    def backward(ctx, grad):
        if ctx.srste_lambda:
            with PASS_CLOCK:
                weight, mask = ctx.saved_tensors
                grad = grad + ctx.srste_lambda * (1 - mask) * weight
        return grad, None, None, None


def _authors_linear_forward(self: torch.nn.Linear, input: torch.Tensor) -> torch.Tensor:
    n, m, lam = self._authors_nm
    return F.linear(input, ArgsortMasked.apply(self.weight, n, m, lam), self.bias)


def attach_authors(model: torch.nn.Module, n: int, m: int, srste_lambda: float) -> int:
    """Patch the authors' masked forward into the FF Linears the library would target; returns
    how many layers."""
    config = NMSparsityConfig(n_keep=n, m=m, sparse_dim="row", locations="FF")
    targets, _ = find_targets(model, config)
    for target in targets:
        target.module._authors_nm = (n, m, srste_lambda)
        target.module.forward = types.MethodType(_authors_linear_forward, target.module)
    return len(targets)


def _unfused_linear_forward(self: torch.nn.Linear, input: torch.Tensor) -> torch.Tensor:
    """``--unfused``: the sparse Linear as it was before `autograd.SparseLinear`, ``F.linear`` on
    W~ from `EffectiveWeight`, which saves W~ (a new fp32 tensor per layer) for backward."""
    return F.linear(input, getattr(self, ATTR).effective(self.weight), self.bias)


# hidden, depth, heads, MLP; "tiny" is for smoke runs
WIDTHS = {"vit-s": (384, 12, 6, 1536), "vit-b": (768, 12, 12, 3072), "tiny": (64, 1, 2, 128)}


def build_model(
    vit_b: bool, layers: int | None, image: int, width: str | None = None
) -> ViTForImageClassification:
    """A randomly initialised ViT-S/16 (or ViT-B/16, or ``width``) classifier, seed 0."""
    hidden, depth, heads, mlp = WIDTHS[width or ("vit-b" if vit_b else "vit-s")]
    config = ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=layers or depth,
        num_attention_heads=heads,
        intermediate_size=mlp,
        image_size=image,
        patch_size=16,
        num_labels=1000,
        # set, not inferred on the first loss call (which would recompile a compiled model)
        problem_type="single_label_classification",
    )
    torch.manual_seed(0)
    return ViTForImageClassification(config)


class SavedBytes:
    """Counts the unique storage bytes autograd saves for backward, parameters excluded."""

    def __init__(self, model: torch.nn.Module):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.params:
            self.seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    def total(self) -> int:
        return sum(self.seen.values())


class Variant:
    """One model copy with its optimizer and its sparsity (library recipe or authors' baseline)."""

    def __init__(
        self,
        name: str,
        base: torch.nn.Module,
        total_steps: int,
        pattern: tuple[int, int] = (2, 4),
        unfused: bool = False,
        compile: bool = False,
    ):
        self.name = name
        self.model = copy.deepcopy(base).train()
        self.compile = compile
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.sparsifier = None
        n, m = pattern
        recipe = RECIPES.get(name)
        if name in AUTHORS:
            attach_authors(self.model, n, m, AUTHORS[name])
        elif recipe is not None:
            config = NMSparsityConfig(n_keep=n, m=m, sparse_dim="row", locations="FF", **recipe)
            # compiled, the step's masks are compiled too, as the Trainer's torch_compile does
            self.sparsifier = NMSparsifier(
                self.model, config, total_steps=total_steps, compile_masks=compile
            )
            if unfused:
                for target in self.sparsifier.targets:
                    if target.kind == "linear":
                        target.module.forward = types.MethodType(
                            _unfused_linear_forward, target.module
                        )
        # attach first, then compile (the sparsifier's forwards trace into the graph)
        self.forward = torch.compile(self.model) if compile else self.model
        self.times: list[float] = []
        self.pass_times: list[float] = []  # seconds inside the sparse passes, per timed step
        self.saved: list[int] = []
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.state_bytes = 4 * params  # weights, gradients, exp_avg, exp_avg_sq

    def step(
        self,
        step: int,
        pixels: torch.Tensor,
        labels: torch.Tensor,
        accum: int = 1,
        count_saved: bool = False,
    ) -> None:
        """One optimizer step of ``accum`` micro-batches (forward + backward each), timed; with
        ``count_saved`` (warm-up steps only) the bytes autograd saves in the first micro-batch's
        forward are counted instead."""
        counter = SavedBytes(self.model)
        hooks = (
            torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t)
            if count_saved and not self.compile
            else contextlib.nullcontext()
        )
        start = time.perf_counter()
        if self.sparsifier is not None:
            plan = self.sparsifier.update(step)
            assert plan.phase == "sparse", plan
        for micro in range(accum):
            # one forward's saved tensors: later micro-batches reuse the freed storages
            with hooks if micro == 0 else contextlib.nullcontext():
                loss = self.forward(pixel_values=pixels, labels=labels).loss
            (loss / accum).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        passes = PASS_CLOCK.take()
        if count_saved:
            self.saved.append(counter.total())
        else:
            self.times.append(elapsed)
            self.pass_times.append(passes)


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile); all three equal for one value."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def overhead_ratio_interval(
    ours: list[float], theirs: list[float], resamples: int = 2000
) -> tuple[float, float, float]:
    """median(ours) / median(theirs) of per-round overheads, with the 5-95% bootstrap interval
    over resampled rounds (same indices for both: the rounds are paired). NaN where the authors'
    median overhead is not positive."""

    def stat(idx: list[int]) -> float:
        den = statistics.median(theirs[i] for i in idx)
        return statistics.median(ours[i] for i in idx) / den if den > 0 else float("nan")

    rounds = list(range(len(ours)))
    point = stat(rounds)
    rng = random.Random(0)
    boots = [stat([rng.choice(rounds) for _ in rounds]) for _ in range(resamples)]
    boots = sorted(b for b in boots if b == b)  # NaN (authors' overhead <= 0) left out
    if not boots:
        return point, float("nan"), float("nan")
    return point, boots[int(0.05 * (len(boots) - 1))], boots[int(0.95 * (len(boots) - 1))]


def summarize(variants: list[Variant]) -> dict[str, dict]:
    """Per variant: median step ms, time/dense per round (median and IQR), overhead %, the
    overhead of the fastest steps (min over rounds / dense's min), the time inside the sparse
    passes as % of dense's step (median, IQR), saved bytes, and for library recipes the overhead
    (and the passes' time) over the authors'."""
    dense = variants[0]
    ratios = {v.name: [t / d for t, d in zip(v.times, dense.times, strict=True)] for v in variants}
    passes = {
        v.name: [p / d * 100 for p, d in zip(v.pass_times, dense.times, strict=True)]
        for v in variants
    }
    out: dict[str, dict] = {}
    for v in variants:
        q1, med, q3 = quartiles(ratios[v.name])
        p1, pmed, p3 = quartiles(passes[v.name])
        saved = statistics.median(v.saved) if v.saved else float("nan")
        dense_saved = statistics.median(dense.saved) if dense.saved else float("nan")
        row = {
            "step_ms": statistics.median(v.times) * 1e3,
            "time_over_dense": med,
            "time_over_dense_iqr": [q1, q3],
            "overhead_pct": (med - 1) * 100,
            "overhead_pct_iqr": [(q1 - 1) * 100, (q3 - 1) * 100],
            "overhead_of_fastest_pct": (min(v.times) / min(dense.times) - 1) * 100,
            "passes_pct": pmed,
            "passes_pct_iqr": [p1, p3],
            "saved_mb": saved / 2**20,
            "saved_over_dense": saved / dense_saved if dense_saved else float("nan"),
            "saved_state_over_dense": (saved + v.state_bytes) / (dense_saved + dense.state_bytes),
            "rounds": ratios[v.name],
        }
        reference = "authors-SR-STE" if v.name == "SR-STE" else "authors"
        if reference not in ratios:
            reference = "authors"
        if reference in ratios and v.name in RECIPES and v.name != "dense":
            ours = [r - 1 for r in ratios[v.name]]
            point, lo, hi = overhead_ratio_interval(ours, [r - 1 for r in ratios[reference]])
            row["authors_reference"] = reference
            row["over_authors_overhead"] = point
            row["over_authors_overhead_90"] = [lo, hi]
            theirs = statistics.median(passes[reference])
            row["passes_over_authors"] = pmed / theirs if theirs > 0 else float("nan")
        out[v.name] = row
    return out


def _cell(value: float | None, spec: str, width: int) -> str:
    return f"{'' if value is None or value != value else format(value, spec):>{width}}"


def format_table(summary: dict[str, dict], memory: bool = True) -> str:
    """The printed table: one row per variant."""
    header = (
        f"{'variant':>14} {'step ms':>8} {'overhead %':>10} {'IQR %':>12} {'fastest %':>9} "
        f"{'ours/authors':>12} {'5-95%':>11} {'passes %':>8} {'IQR %':>11} {'passes o/a':>10}"
    )
    if memory:
        header += f" {'saved MB':>8} {'saved/dense':>11} {'(saved+state)/dense':>19}"
    lines = [header, "-" * len(header)]
    for name, r in summary.items():
        olo, ohi = r["overhead_pct_iqr"]
        plo, phi = r["passes_pct_iqr"]
        band = r.get("over_authors_overhead_90")
        line = (
            f"{name:>14} {r['step_ms']:8.1f} {r['overhead_pct']:10.1f} "
            f"{f'{olo:.1f}..{ohi:.1f}':>12} {r['overhead_of_fastest_pct']:9.1f} "
            f"{_cell(r.get('over_authors_overhead'), '.2f', 12)} "
            f"{f'{band[0]:.2f}-{band[1]:.2f}' if band else '':>11} "
            f"{r['passes_pct']:8.2f} {f'{plo:.2f}..{phi:.2f}':>11} "
            f"{_cell(r.get('passes_over_authors'), '.2f', 10)}"
        )
        if memory:
            line += (
                f" {r['saved_mb']:8.1f} {r['saved_over_dense']:11.3f}"
                f" {r['saved_state_over_dense']:19.3f}"
            )
        lines.append(line)
    return "\n".join(lines)


def run_variants(
    names: list[str],
    base: torch.nn.Module,
    batch: int,
    image: int,
    warmup: int,
    repeats: int,
    pattern: tuple[int, int] = (2, 4),
    unfused: bool = False,
    compile: bool = False,
    accum: int = 1,
    progress: float = 0.0,
) -> list[Variant]:
    """Build every variant (dense first) and run them round-robin, in a new random order each
    round (no variant always follows another); returns them with times. Warm-up steps count the
    saved bytes and are not timed."""
    names = ["dense"] + [n for n in names if n != "dense"]
    variants = [Variant(n, base, TOTAL_STEPS, pattern, unfused, compile) for n in names]
    first = int(progress * TOTAL_STEPS)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, image, image, generator=generator)
    labels = torch.randint(0, 1000, (batch,), generator=generator)
    order = random.Random(0)
    # the pass clock wraps the library's functions in Python timers: a compiled graph would break
    # at each of them, so compiled runs are timed end to end only
    with contextlib.nullcontext() if compile else wrapped_passes(_clocked):
        for step in range(max(warmup, 1) + repeats):
            for variant in order.sample(variants, len(variants)):
                variant.step(first + step, pixels, labels, accum, count_saved=step < max(warmup, 1))
    return variants


def patterns_in_use(variants: list[Variant]) -> str:
    """``name n:m`` of each library variant at its last step (the first targeted layer's)."""
    parts = []
    for v in variants:
        if v.sparsifier is not None:
            state = getattr(v.sparsifier.targets[0].module, ATTR)
            n, m = state.patterns[0]
            parts.append(f"{v.name} {n}:{m}" + (f" alpha {state.alpha:.3g}" if state.alpha else ""))
    return ", ".join(parts)


def keep_heap() -> bool:
    """Ask glibc's malloc to keep freed memory instead of returning it to the OS, so that a large
    tensor allocated again does not page-fault every page in anew. With the default settings, a
    step of this model page-faults between 0 and ~30,000 times depending on the heap's state
    (measured with ``getrusage``): several % of a step, at random, in every variant. Returns
    False where the C library has no ``mallopt`` (not glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        # M_MMAP_THRESHOLD (-3) at glibc's maximum, 32 MiB; M_TRIM_THRESHOLD (-1) at 1 GiB
        return bool(libc.mallopt(-3, 32 * 2**20) and libc.mallopt(-1, 2**30))
    except (OSError, AttributeError):
        return False


def _labelled(fn, label: str):
    def run(*args, **kwargs):
        with torch.profiler.record_function(label):
            return fn(*args, **kwargs)

    return run


def _clocked(fn, label: str):
    def run(*args, **kwargs):
        with PASS_CLOCK:
            return fn(*args, **kwargs)

    return run


@contextlib.contextmanager
def wrapped_passes(wrap):
    """The library's sparse passes (the mask, building W~, the terms of the gradient written to
    W) replaced by ``wrap(fn, label)`` for the duration: named profiler ranges (`_labelled`) or
    the pass clock (`_clocked`)."""
    from nmsparse_hf import autograd as nm_autograd
    from nmsparse_hf import sparsifier as nm_sparsifier

    targets = [
        (nm_sparsifier, "nm_mask"),
        (nm_autograd, "_masked"),
        (nm_autograd, "_straight_through"),
    ]
    originals = [(module, name, getattr(module, name)) for module, name in targets]
    for module, name, fn in originals:
        setattr(module, name, wrap(fn, LABELS[name]))
    try:
        yield
    finally:
        for module, name, fn in originals:
            setattr(module, name, fn)


def profile_steps(variants: list[Variant], recipe: str, batch: int, image: int, top: int) -> str:
    """One profiled step of dense and of ``recipe``: the time inside the sparse passes (named
    ranges), the operators whose self CPU time grew the most, then each step's top operators."""
    from torch.profiler import ProfilerActivity, profile

    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(batch, 3, image, image, generator=generator)
    labels = torch.randint(0, 1000, (batch,), generator=generator)
    by_name = {v.name: v for v in variants}
    stats: dict[str, dict[str, tuple[float, int]]] = {}
    tables = []
    for name in ("dense", recipe):
        variant = by_name[name]
        step = len(variant.times)
        with wrapped_passes(_labelled), profile(activities=[ProfilerActivity.CPU]) as prof:
            variant.step(step, pixels, labels)
        events = prof.key_averages()
        stats[name] = {e.key: (e.self_cpu_time_total / 1e3, e.count) for e in events}
        ranges = {e.key: (e.cpu_time_total / 1e3, e.count) for e in events}
        tables.append(
            f"--- {name}: top {top} operators by self CPU time\n"
            + events.table(sort_by="self_cpu_time_total", row_limit=top)
        )
    dense, sparse = stats["dense"], stats[recipe]
    keys = set(dense) | set(sparse)
    diff = sorted(
        keys, key=lambda k: sparse.get(k, (0, 0))[0] - dense.get(k, (0, 0))[0], reverse=True
    )
    total = sum(t for t, _ in dense.values())
    sparse_total = sum(t for t, _ in sparse.values())
    lines = [
        f"--- {recipe}: time inside the sparse passes (CPU total of each range; dense step "
        f"{total:.1f} ms, {recipe} step {sparse_total:.1f} ms of self time)"
    ]
    for label in [*LABELS.values(), AUTHORS_LABEL]:
        if label in ranges:
            ms, calls = ranges[label]
            lines.append(
                f"{label:>44} {ms:9.2f} ms {calls:6d} calls {ms / total * 100:6.2f}% of dense"
            )
    lines += [
        f"--- {recipe} vs dense: operators by added self CPU time",
        f"{'operator':>44} {'dense ms':>9} {'calls':>6} {recipe + ' ms':>12} {'calls':>6} "
        f"{'added ms':>9} {'% of dense':>10}",
    ]
    for key in diff[:top]:
        d_ms, d_n = dense.get(key, (0.0, 0))
        s_ms, s_n = sparse.get(key, (0.0, 0))
        lines.append(
            f"{key[:44]:>44} {d_ms:9.2f} {d_n:6d} {s_ms:12.2f} {s_n:6d} {s_ms - d_ms:9.2f} "
            f"{(s_ms - d_ms) / total * 100:10.2f}"
        )
    return "\n".join(lines + tables)


def parse_pattern(text: str) -> tuple[int, int]:
    """``"N:M"`` (N kept) -> (N, M)."""
    n, m = (int(v) for v in text.split(":"))
    return n, m


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (steps per variant)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant")
    parser.add_argument("--layers", type=int, default=None, help="encoder depth (default 12)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--vit-b", action="store_true", help="ViT-B/16 instead of ViT-S/16")
    parser.add_argument("--pattern", default="2:4", help="FF pattern N:M (N kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument(
        "--system-malloc",
        action="store_true",
        help="leave glibc's malloc settings alone (by default the script asks it to keep freed "
        "memory, which removes random page-fault time from every variant; see keep_heap)",
    )
    parser.add_argument("--recipes", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument(
        "--accum",
        type=int,
        default=1,
        help="micro-batches per optimizer step (gradient accumulation; the timed unit is the "
        "optimizer step)",
    )
    parser.add_argument(
        "--progress",
        type=float,
        default=0.0,
        help="fraction of the schedule at which the timed steps start (SDGF's later stages)",
    )
    parser.add_argument("--json", default=None, help="also write the summary to this JSON file")
    parser.add_argument(
        "--profile",
        default=None,
        choices=[v for v in VARIANTS if v != "dense"],
        help="profile one step of dense and of this variant after the timed rounds",
    )
    parser.add_argument("--profile-top", type=int, default=15, help="operators per profile table")
    parser.add_argument(
        "--unfused",
        action="store_true",
        help="run the sparse Linears as before the fused SparseLinear: F.linear on W~ from "
        "EffectiveWeight (saves W~ for backward), to compare",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile every variant (dense too); time only, warm-up includes compilation",
    )
    args = parser.parse_args(argv)
    if args.compile and args.unfused:
        parser.error("--compile and --unfused measure different things; pick one")
    if args.profile and args.compile:
        parser.error("--profile profiles eager steps; leave out --compile")
    if args.threads:
        torch.set_num_threads(args.threads)
    heap = "system malloc" if args.system_malloc else f"heap kept: {keep_heap()}"
    return _measure(args, heap)


def _measure(args: argparse.Namespace, heap: str) -> dict:
    if args.compile:
        # every variant is a copy of the same classes, so they share dynamo's per-code cache; in a
        # real run one model compiles once per distinct phase/pattern (see tests/test_sparsifier)
        torch._dynamo.config.recompile_limit = 64
    pattern = parse_pattern(args.pattern)
    names = list(dict.fromkeys(args.recipes + ([args.profile] if args.profile else [])))
    base = build_model(args.vit_b, args.layers, args.image_size)
    model_name = "ViT-B/16" if args.vit_b else "ViT-S/16"
    print(
        f"{model_name} layers={base.config.num_hidden_layers} image={args.image_size} "
        f"batch={args.batch}"
        + (f" x {args.accum} micro-batches per step" if args.accum > 1 else "")
        + f" FF {args.pattern} row, torch {torch.__version__}, threads "
        f"{torch.get_num_threads()}, {args.warmup} warm-up + {args.repeats} timed rounds, "
        f"round-robin"
        + f", {heap}"
        + (", UNFUSED sparse Linear (F.linear on W~)" if args.unfused else "")
        + (", torch.compile (inductor)" if args.compile else "")
    )
    variants = run_variants(
        names,
        base,
        args.batch,
        args.image_size,
        args.warmup,
        args.repeats,
        pattern,
        args.unfused,
        args.compile,
        args.accum,
        args.progress,
    )
    print(f"patterns at the timed steps: {patterns_in_use(variants)}")
    summary = summarize(variants)
    print(format_table(summary, memory=not args.compile))
    print(
        "overhead: median over rounds of (variant step / dense step of the same round) - 1, IQR "
        "over rounds; fastest: fastest step / dense's fastest step - 1; ours/authors: our "
        "overhead / the authors' overhead, 5-95% bootstrap; passes: time inside the sparse "
        "passes / dense step (median, IQR), o/a: ours / the authors'; dense-again: the noise "
        "floor"
    )
    if args.compile:
        print(
            "target (ViT-S/16, batch 8, FF 1:8): compiled sparse step <= 1.03x the compiled dense"
        )
    else:
        print("targets (ViT-S/16, batch 8, FF 1:8): ours/authors <= 0.5, saved/dense <= 1.05")
    if args.profile:
        print(profile_steps(variants, args.profile, args.batch, args.image_size, args.profile_top))
    result = {
        "model": model_name,
        "layers": base.config.num_hidden_layers,
        "batch": args.batch,
        "accum": args.accum,
        "progress": args.progress,
        "image_size": args.image_size,
        "pattern": args.pattern,
        "threads": torch.get_num_threads(),
        "warmup": args.warmup,
        "repeats": args.repeats,
        "compile": args.compile,
        "torch": torch.__version__,
        "heap": heap,
        "variants": summary,
    }
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main()
