"""Time `nm_mask` against one elementwise pass and against torch.ao's WeightNormSparsifier.

For each weight shape and N:M pattern (row grouping, fp32) the variants below run round-robin in
one process, so load from other processes hits all of them alike; the table gives medians and the
ratios of medians.

* ``nm_mask``: ``nmsparse_hf.masks.nm_mask(w, n, m, "row")``.
* ``abs``: ``w.abs()``, one elementwise pass that reads the weight and writes a new tensor of the
  same size (the reference "memory-bound pass"). Target: nm_mask / abs <= 4.
* ``ao.step``: ``WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, M),
  zeros_per_block=M-N).step()`` on a prepared ``nn.Linear``: recomputes the same N:M mask (blocks of
  1 row x M input columns, i.e. our ``row`` grouping). This is the fair comparison (mask update vs
  mask update). Target: ao.step / nm_mask >= 5.
* ``ao.setup``: ``prepare()`` on a fresh Linear (registers the parametrization), reported
  separately: it is paid once per training run, not per step.
* ``compiled``: ``torch.compile(nm_mask)`` (inductor), which is what a model under
  ``torch.compile`` (or ``TrainingArguments(torch_compile=True)``) runs: M <= 8 counts pairwise in
  one fused pass, longer groups call the eager kernel as one op. Checked equal to the eager mask
  before timing; compile time is reported and not timed. ``--no-compile`` leaves it out (inductor
  on CPU needs a C++ compiler).

Before timing, the script asserts that torch.ao's first mask equals ours on every group without a
tie at the keep/prune boundary (torch.ao ranks by w*w and breaks ties arbitrarily).

    python bench/mask_kernel.py --repeats 30 --threads 1
    python bench/mask_kernel.py --repeats 30 --threads 1 --no-compile
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import time

import torch
import torch._dynamo
from torch import nn
from torch.ao.pruning import WeightNormSparsifier

from nmsparse_hf.masks import nm_mask

PATTERNS = ((2, 4), (1, 8), (1, 32))


def parse_shape(text: str) -> tuple[int, int]:
    out, inp = (int(v) for v in text.lower().split("x"))
    return out, inp


def ao_sparsifier(linear: nn.Linear, n: int, m: int) -> WeightNormSparsifier:
    """A WeightNormSparsifier computing the n:m (n kept) row mask of ``linear``, prepared."""
    sparsifier = WeightNormSparsifier(
        sparsity_level=1.0, sparse_block_shape=(1, m), zeros_per_block=m - n
    )
    sparsifier.prepare(nn.Sequential(linear), [{"tensor_fqn": "0.weight"}])
    return sparsifier


def ao_mask(linear: nn.Linear) -> torch.Tensor:
    return linear.parametrizations.weight[0].mask.bool()


def boundary_tie_free(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Per row group: True where the n-th and (n+1)-th largest differ, both in |w| and in w*w."""
    free = torch.ones(weight.numel() // m, dtype=torch.bool)
    for score in (weight.abs(), weight * weight):
        top = score.reshape(-1, m).topk(n + 1, dim=-1).values
        free &= top[:, n - 1] != top[:, n]
    return free


def check_same_mask(weight: torch.Tensor, n: int, m: int) -> tuple[int, int]:
    """Assert torch.ao's mask equals ours on tie-free groups; return (tie-free, total) groups."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    sparsifier = ao_sparsifier(linear, n, m)
    sparsifier.step()
    theirs = ao_mask(linear).reshape(-1, m)
    ours = nm_mask(weight, n, m, "row").reshape(-1, m)
    free = boundary_tie_free(weight, n, m)
    mismatch = int((theirs != ours).any(dim=-1)[free].sum())
    assert mismatch == 0, f"{n}:{m}: torch.ao and nm_mask differ on {mismatch} tie-free groups"
    assert bool((ours.sum(dim=-1) == n).all())
    return int(free.sum()), free.numel()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_case(
    weight: torch.Tensor, n: int, m: int, repeats: int, compiled=None
) -> dict[str, float]:
    """Median seconds of each variant, measured round-robin."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    sparsifier = ao_sparsifier(linear, n, m)
    fresh = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    variants = {
        "nm_mask": lambda: nm_mask(weight, n, m, "row"),
        "abs": lambda: weight.abs(),
        "ao.step": sparsifier.step,
        "ao.setup": lambda: ao_sparsifier(copy.deepcopy(fresh), n, m),
    }
    if compiled is not None:
        variants["compiled"] = lambda: compiled(weight, n, m, "row")
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds per case")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--shapes", nargs="+", default=["3072x768", "768x3072"], help="weight shapes OUTxIN"
    )
    parser.add_argument(
        "--patterns", nargs="+", default=[f"{n}:{m}" for n, m in PATTERNS], help="N:M, N kept"
    )
    parser.add_argument(
        "--no-compile", action="store_true", help="leave out the torch.compile'd nm_mask column"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    compiled = None
    has_compiler = any(shutil.which(c) for c in ("g++", "clang++", os.environ.get("CXX", "")) if c)
    if not args.no_compile and not has_compiler:
        print("no C++ compiler on PATH (inductor needs one on CPU): compiled columns left out")
    elif not args.no_compile:
        torch._dynamo.config.cache_size_limit = 64  # one graph per (shape, N, M)
        compiled = torch.compile(nm_mask, fullgraph=True, dynamic=False)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, repeats {args.repeats}")
    print("baseline elementwise pass: w.abs() (reads w, writes a new fp32 tensor)")
    header = (
        f"{'shape':>10} {'N:M':>5} {'nm_mask ms':>10} {'abs ms':>7} {'ao.step ms':>10} "
        f"{'ao.setup ms':>11} {'mask/abs':>8} {'ao.step/mask':>12} {'ao.setup/mask':>13} "
        f"{'tie-free groups':>15}"
    )
    if compiled is not None:
        header += (
            f" {'compiled ms':>11} {'compiled/abs':>12} {'ao.step/compiled':>16} {'compile s':>9}"
        )
    print(header)
    print("-" * len(header))
    for shape_text in args.shapes:
        shape = parse_shape(shape_text)
        weight = torch.randn(shape)
        for pattern in args.patterns:
            n, m = (int(v) for v in pattern.split(":"))
            free, total = check_same_mask(weight, n, m)
            compile_s = 0.0
            if compiled is not None:
                start = time.perf_counter()
                same = torch.equal(compiled(weight, n, m, "row"), nm_mask(weight, n, m, "row"))
                compile_s = time.perf_counter() - start
                assert same, f"compiled mask differs from the eager one at {shape_text} {pattern}"
            t = bench_case(weight, n, m, args.repeats, compiled)
            extra = ""
            if compiled is not None:
                extra = (
                    f" {t['compiled'] * 1e3:11.2f} {t['compiled'] / t['abs']:12.2f}"
                    f" {t['ao.step'] / t['compiled']:16.2f} {compile_s:9.1f}"
                )
            print(
                f"{shape_text:>10} {pattern:>5} {t['nm_mask'] * 1e3:10.2f} {t['abs'] * 1e3:7.2f} "
                f"{t['ao.step'] * 1e3:10.2f} {t['ao.setup'] * 1e3:11.2f} "
                f"{t['nm_mask'] / t['abs']:8.2f} {t['ao.step'] / t['nm_mask']:12.2f} "
                f"{t['ao.setup'] / t['nm_mask']:13.2f} {f'{free}/{total}':>15}" + extra
            )
    print(
        "targets: mask/abs <= 4, ao.step/mask >= 5 (ao.setup is a one-off cost, not per step); "
        "compiled: the same targets for torch.compile'd models"
    )


if __name__ == "__main__":
    main()
