"""Native CPU kernels against the ATen path, pass by pass, on one ViT FF weight.

For each pass of a sparse step — the N:M mask at the patterns the recipes use, W̃ = W ⊙ (m + α(1−m))
with α = 0 and with a tensor α (MDGF), the SR-STE gradient term, the frozen fine-tune zeroing —
times the ATen path (`nmsparse_hf.cpu_kernels.disabled()`) and the native kernel on the same
tensors, alternating the two in every round, with the weight evicted from the caches before each
call (``cold``, as in a training step, where the GEMMs in between evict it) or not (``hot``).
Prints per pass the median time of each, the median and interquartile range over rounds of the
per-round ratio native / ATen, and the page faults of the timed rounds (after 5 untimed ones;
glibc is asked to keep freed memory, as in `bench/step_overhead.py`). Every result is also
checked to be bit for bit the same. The gradient terms include one clone of the gradient (both
paths), since they write in place.

    .venv/bin/python bench/cpu_kernels.py [--shape 1536 384] [--rounds 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from nmsparse_hf import cpu_kernels
from nmsparse_hf.autograd import _masked, _straight_through
from nmsparse_hf.masks import nm_mask

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_overhead import keep_heap  # noqa: E402

PATTERNS = ["1:8", "2:8", "4:8", "7:8", "2:4", "1:4", "2:16", "1:16", "4:32", "8:64"]


def passes(weight: torch.Tensor, grad: torch.Tensor):
    """(label, fn) for every pass; each fn returns the tensor whose bits are compared."""
    mask = nm_mask(weight, 1, 8)
    alpha = torch.tensor(0.37)
    out = []
    for pattern in PATTERNS:
        n, m = (int(v) for v in pattern.split(":"))
        out.append((f"mask {pattern}", lambda n=n, m=m: nm_mask(weight, n, m)))
    out.append(("W~ (alpha 0)", lambda: _masked(weight, mask, 0.0)))
    out.append(("W~ (MDGF alpha)", lambda: _masked(weight, mask, alpha)))
    out.append(
        ("SR-STE term", lambda: _straight_through(grad.clone(), weight, mask, 2e-4, False, True))
    )
    out.append(
        ("frozen zeroing", lambda: _straight_through(grad.clone(), weight, mask, 0, True, True))
    )
    return out


def _time(fn, evict: torch.Tensor | None) -> float:
    if evict is not None:
        evict.add_(1.0)  # a pass over 64 MiB: the weight leaves L1/L2 and most of L3
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.bool else t.view(torch.int32)


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(label: str, fn, rounds: int, evict: torch.Tensor | None, warmup: int = 5) -> dict:
    with cpu_kernels.disabled():
        expected = fn()
    assert torch.equal(_bits(fn()), _bits(expected)), f"{label}: native and ATen differ"
    aten, native = [], []
    for round_ in range(warmup + rounds):
        if round_ == warmup:
            aten, native, faults = [], [], _faults()
        with cpu_kernels.disabled():
            aten.append(_time(fn, evict))
        native.append(_time(fn, evict))
    faults = _faults() - faults
    ratios = sorted(n / a for n, a in zip(native, aten, strict=True))
    q = statistics.quantiles(ratios, n=4)
    return {
        "pass": label,
        "aten_ms": statistics.median(aten) * 1e3,
        "native_ms": statistics.median(native) * 1e3,
        "ratio": statistics.median(ratios),
        "iqr": (q[0], q[2]),
        "page_faults": faults,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=int, nargs=2, default=[1536, 384])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    heap = keep_heap()  # no page faults from re-allocated outputs, as in bench/step_overhead.py
    if not cpu_kernels.available():
        raise SystemExit(f"native CPU kernels unavailable: {cpu_kernels.unavailable_reason()}")
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(*args.shape, generator=g)
    grad = torch.randn(*args.shape, generator=g)
    evict = torch.zeros(16 << 20)
    print(
        f"weight {tuple(args.shape)} float32, torch {torch.__version__}, threads "
        f"{torch.get_num_threads()}, {args.rounds} rounds, ATen and native alternating, heap "
        f"kept: {heap}"
    )
    header = (
        f"{'pass':>18} {'cache':>5} {'ATen ms':>8} {'native ms':>9} {'native/ATen':>11} "
        f"{'IQR':>11} {'faults':>6}"
    )
    print(header + "\n" + "-" * len(header))
    results = []
    for label, fn in passes(weight, grad):
        for cache, buffer in (("cold", evict), ("hot", None)):
            row = measure(label, fn, args.rounds, buffer) | {"cache": cache}
            results.append(row)
            print(
                f"{label:>18} {cache:>5} {row['aten_ms']:8.3f} {row['native_ms']:9.3f} "
                f"{row['ratio']:11.2f} {row['iqr'][0]:5.2f}..{row['iqr'][1]:.2f} "
                f"{row['page_faults']:6d}"
            )
    print("every native result equals the ATen result bit for bit")
    return results


if __name__ == "__main__":
    main()
