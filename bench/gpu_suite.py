"""The GPU measurements in one run: mask kernel, training step time and peak memory, 2:4 inference.

On a CUDA machine (sm80+ for the 2:4 part):

1. **Mask kernel** at ViT-B feed-forward shapes (3072x768, 768x3072), patterns 2:4, 1:8, 1:32:
   `nm_mask` (eager and `torch.compile`d) against `torch.ao`'s `WeightNormSparsifier.step()` and
   one elementwise pass (`w.abs()`), round-robin, medians; torch.ao's mask is checked equal to
   ours on tie-free groups first.
2. **Training step** of ViT-B/16 (224 px) at batch 128 under bf16 autocast (fp32 master weights,
   as ``TrainingArguments(bf16=True)``), AdamW: median step time and peak allocated memory for
   dense, every recipe and the authors' baseline (`bench/step_overhead.py`'s variants), eager and
   ``torch.compile``d. Variants run one after another (each alone on the GPU, for its peak).
3. **2:4 inference** with ``torch.sparse.to_sparse_semi_structured`` (fp16): each FF layer shape
   alone (tokens = batch x 197) and the whole finalized ViT-B end to end, dense vs sparse time,
   with the outputs/logits compared.

Writes ``gpu_suite.json`` and ``gpu_suite.md`` (the tables) into ``--out``.

``--smoke`` runs every code path on CPU at tiny sizes (a 1-layer ViT at 32 px, 64x128 weights,
2 timed steps; compiled only for dense and MDGF-exp) in under two minutes, and prints why each
CUDA-only part is skipped; it checks the script, not the speed.

    python bench/gpu_suite.py --out results/gpu                 # on a GPU machine, ~15 min
    python bench/gpu_suite.py --out /tmp/gpu_smoke --smoke      # anywhere
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._dynamo
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mask_kernel import ao_sparsifier, check_same_mask  # noqa: E402
from step_overhead import VARIANTS, Variant, build_model  # noqa: E402

from nmsparse_hf.masks import nm_mask  # noqa: E402

PATTERNS = ((2, 4), (1, 8), (1, 32))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn) -> float:
    """Seconds of one call, the device synchronised before and after."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _round_robin(device: torch.device, fns: dict, repeats: int) -> dict[str, float]:
    """Median milliseconds of each callable, one warm-up call each, rounds interleaved."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_timed(device, fn))
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


# ---------------------------------------------------------------------------------- 1. mask kernel
def mask_kernel(device: torch.device, shapes, repeats: int, compile: bool) -> list[dict]:
    """`nm_mask` vs torch.ao's step vs ``w.abs()`` (and the compiled mask) per shape and pattern."""
    from torch import nn

    compiled = torch.compile(nm_mask, fullgraph=True, dynamic=False) if compile else None
    rows = []
    torch.manual_seed(0)
    for out_f, in_f in shapes:
        weight = torch.randn(out_f, in_f)
        for n, m in PATTERNS:
            free, total = check_same_mask(weight, n, m)  # on CPU: same mask as torch.ao
            w = weight.to(device)
            linear = nn.Linear(in_f, out_f, bias=False).to(device)
            with torch.no_grad():
                linear.weight.copy_(w)
            ao = ao_sparsifier(linear, n, m)
            fns = {
                "nm_mask": lambda w=w, n=n, m=m: nm_mask(w, n, m, "row"),
                "abs": lambda w=w: w.abs(),
                "ao.step": ao.step,
            }
            if compiled is not None:
                same = torch.equal(compiled(w, n, m, "row"), nm_mask(w, n, m, "row"))
                assert same, f"compiled mask differs at {out_f}x{in_f} {n}:{m}"
                fns["compiled"] = lambda w=w, n=n, m=m: compiled(w, n, m, "row")
            t = _round_robin(device, fns, repeats)
            row = {
                "shape": f"{out_f}x{in_f}",
                "pattern": f"{n}:{m}",
                "tie_free_groups": f"{free}/{total}",
                **{f"{k}_ms": v for k, v in t.items()},
                "mask_over_abs": t["nm_mask"] / t["abs"],
                "ao_over_mask": t["ao.step"] / t["nm_mask"],
            }
            if "compiled" in t:
                row["ao_over_compiled"] = t["ao.step"] / t["compiled"]
                row["compiled_over_abs"] = t["compiled"] / t["abs"]
            rows.append(row)
            print(
                f"mask {row['shape']} {row['pattern']}: nm_mask {t['nm_mask']:.3f} ms, "
                f"abs {t['abs']:.3f}, ao.step {t['ao.step']:.3f}"
                + (f", compiled {t['compiled']:.3f}" if "compiled" in t else "")
            )
    return rows


# ---------------------------------------------------------------------------------- 2. train step
def _train_step(variant: Variant, step: int, pixels, labels, device, dtype) -> None:
    if variant.sparsifier is not None:
        variant.sparsifier.update(step)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        loss = variant.forward(pixel_values=pixels, labels=labels).loss
    loss.backward()
    variant.optimizer.step()
    variant.optimizer.zero_grad(set_to_none=True)


def _measure(device, base, name, mode, pixels, labels, warmup, repeats, dtype) -> dict:
    """One variant alone: warm-up steps, then timed steps with the peak memory they reach.

    ``peak_mb`` counts what the variant's training holds at its peak (model copy, gradients,
    AdamW state, activations), above what was allocated before it was built (the shared base
    model and the inputs)."""
    cuda = device.type == "cuda"
    before = torch.cuda.memory_allocated(device) if cuda else 0
    variant = Variant(name, base, 100_000, (2, 4), compile=mode == "compiled")
    start = time.perf_counter()
    for step in range(warmup):
        _train_step(variant, step, pixels, labels, device, dtype)
    _sync(device)
    warm_s = time.perf_counter() - start
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(warmup, warmup + repeats):
        times.append(
            _timed(
                device, lambda v=variant, s=step: _train_step(v, s, pixels, labels, device, dtype)
            )
        )
    peak = torch.cuda.max_memory_allocated(device) - before if cuda else None
    del variant
    if mode == "compiled":
        torch._dynamo.reset()  # drop the compiled graphs (and the model copy they hold)
    if cuda:
        torch.cuda.empty_cache()
    row = {
        "variant": name,
        "mode": mode,
        "step_ms": statistics.median(times) * 1e3,
        "step_ms_min": min(times) * 1e3,
        "step_ms_max": max(times) * 1e3,
        "peak_mb": None if peak is None else peak / 2**20,
        "warmup_s": warm_s,
    }
    print(
        f"step {mode} {name}: {row['step_ms']:.1f} ms"
        + ("" if peak is None else f", peak {row['peak_mb']:.0f} MB")
        + f" (warm-up {warm_s:.1f} s)"
    )
    return row


def train_steps(device, base, batch, image, names, compiled_names, warmup, repeats, dtype):
    """Median step ms and peak memory of each variant, eager and compiled, one at a time."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, image, image, generator=generator).to(device)
    labels = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    torch._dynamo.config.recompile_limit = 64
    rows = [
        _measure(device, base, name, mode, pixels, labels, warmup, repeats, dtype)
        for mode, mode_names in (("eager", names), ("compiled", compiled_names))
        for name in mode_names
    ]
    for r in rows:
        dense = next((d for d in rows if d["mode"] == r["mode"] and d["variant"] == "dense"), None)
        if dense is None:
            continue
        r["time_over_dense"] = r["step_ms"] / dense["step_ms"]
        if r["peak_mb"] is not None:
            r["peak_over_dense"] = r["peak_mb"] / dense["peak_mb"]
    return rows


# ---------------------------------------------------------------------------------- 3. inference
def _two_four(out_f: int, in_f: int, device, dtype) -> torch.Tensor:
    weight = torch.randn(out_f, in_f)
    return (weight * nm_mask(weight, 2, 4, "row")).to(device, dtype)


def semi_structured(device, shapes, tokens: int, model_fn, batch: int, image: int, repeats: int):
    """Per-layer and end-to-end 2:4 semi-structured speedups, outputs compared; or the reason
    it cannot run here."""
    from nmsparse_hf import NMSparsifier, NMSparsityConfig
    from nmsparse_hf.export.inference import (
        cuda_semi_structured_available,
        semi_structured_candidates,
        to_semi_structured,
    )

    model = model_fn()
    sparsifier = NMSparsifier(model, NMSparsityConfig(n_keep=2, m=4, locations="FF"), 1)
    sparsifier.finalize()
    names = list(sparsifier.layers)
    sparsifier.detach()
    candidates = semi_structured_candidates(model, names, torch.float16)
    result: dict = {
        "candidates": f"{sum(c.ok for c in candidates)}/{len(candidates)}",
        "layers": [],
        "model": None,
    }
    available, reason = cuda_semi_structured_available()
    if not available or device.type != "cuda":
        result["skipped"] = f"semi-structured sparse kernels {reason or 'need a CUDA device'}"
        print(
            f"2:4 inference SKIPPED: {result['skipped']} ({result['candidates']} FF layers "
            f"qualify by shape and pattern)"
        )
        return result
    from torch.sparse import to_sparse_semi_structured

    dtype = torch.float16
    with torch.inference_mode():
        for out_f, in_f in shapes:
            weight = _two_four(out_f, in_f, device, dtype)
            sparse_w = to_sparse_semi_structured(weight)
            x = torch.randn(tokens, in_f, device=device, dtype=dtype)
            ref, out = F.linear(x, weight), F.linear(x, sparse_w)
            err = (ref - out).abs().max().item()
            fns = {
                "dense": lambda x=x, w=weight: F.linear(x, w),
                "sparse": lambda x=x, w=sparse_w: F.linear(x, w),
            }
            t = _round_robin(device, fns, repeats)
            row = {
                "shape": f"{out_f}x{in_f}",
                "tokens": tokens,
                "dense_ms": t["dense"],
                "sparse_ms": t["sparse"],
                "speedup": t["dense"] / t["sparse"],
                "max_abs_diff": err,
            }
            result["layers"].append(row)
            print(f"2:4 layer {row['shape']}: speedup {row['speedup']:.2f}x, max diff {err:.2e}")
        dense = model.to(device, dtype).eval()
        sparse = copy.deepcopy(dense)
        swapped = to_semi_structured(sparse, names)
        x = torch.randn(batch, 3, image, image, device=device, dtype=dtype)
        ref, out = dense(pixel_values=x).logits, sparse(pixel_values=x).logits
        t = _round_robin(
            device,
            {"dense": lambda: dense(pixel_values=x), "sparse": lambda: sparse(pixel_values=x)},
            repeats,
        )
    result["model"] = {
        "swapped": f"{sum(c.ok for c in swapped)}/{len(swapped)}",
        "batch": batch,
        "dense_ms": t["dense"],
        "sparse_ms": t["sparse"],
        "speedup": t["dense"] / t["sparse"],
        "max_abs_logit_diff": (ref - out).abs().max().item(),
        "same_top1": float((ref.argmax(-1) == out.argmax(-1)).float().mean()),
    }
    print(f"2:4 end to end: {result['model']}")
    return result


# ---------------------------------------------------------------------------------- report
def markdown(result: dict) -> str:
    """The JSON's tables as markdown."""
    lines = [f"# GPU suite ({result['device']}, torch {result['torch']})", ""]
    lines += [
        "## Mask kernel (ms, medians)",
        "",
        "| shape | N:M | nm_mask | compiled | abs | ao.step | mask/abs | ao.step/mask | "
        "ao.step/compiled |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["mask_kernel"]:
        comp = r.get("compiled_ms")
        lines.append(
            f"| {r['shape']} | {r['pattern']} | {r['nm_mask_ms']:.3f} | "
            f"{'-' if comp is None else f'{comp:.3f}'} | {r['abs_ms']:.3f} | "
            f"{r['ao.step_ms']:.3f} | {r['mask_over_abs']:.2f} | {r['ao_over_mask']:.2f} | "
            f"{r.get('ao_over_compiled', float('nan')):.2f} |"
        )
    s = result["train_step"]
    lines += [
        "",
        f"## Training step: {s['model']}, batch {s['batch']}, {s['precision']} (median ms, "
        "peak allocated MB)",
        "",
        "| variant | mode | step ms | time/dense | peak MB | peak/dense |",
        "|---|---|---|---|---|---|",
    ]
    for r in s["rows"]:
        peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        peak_ratio = r.get("peak_over_dense")
        lines.append(
            f"| {r['variant']} | {r['mode']} | {r['step_ms']:.1f} | "
            f"{r.get('time_over_dense', float('nan')):.3f} | {peak} | "
            f"{'-' if peak_ratio is None else f'{peak_ratio:.3f}'} |"
        )
    inf = result["semi_structured"]
    lines += ["", "## 2:4 inference (`to_sparse_semi_structured`, fp16)", ""]
    if "skipped" in inf:
        lines.append(f"Not run: {inf['skipped']}.")
    else:
        lines += ["| layer | tokens | dense ms | 2:4 ms | speedup | max abs diff |"]
        lines += ["|---|---|---|---|---|---|"]
        for r in inf["layers"]:
            lines.append(
                f"| {r['shape']} | {r['tokens']} | {r['dense_ms']:.3f} | {r['sparse_ms']:.3f} | "
                f"{r['speedup']:.2f} | {r['max_abs_diff']:.2e} |"
            )
        m = inf["model"]
        lines.append(
            f"\nEnd to end ({m['swapped']} layers swapped, batch {m['batch']}): dense "
            f"{m['dense_ms']:.2f} ms, 2:4 {m['sparse_ms']:.2f} ms, speedup {m['speedup']:.2f}x; "
            f"max |logit diff| {m['max_abs_logit_diff']:.3e}, same top-1 {m['same_top1']:.3f}."
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for gpu_suite.json and .md")
    parser.add_argument("--smoke", action="store_true", help="every code path, tiny, on CPU")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (compile included)")
    parser.add_argument("--recipes", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--no-compile", action="store_true", help="leave out compiled runs")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("no CUDA device: run this on a GPU machine, or use --smoke to check the script")
        return {}
    device = torch.device("cuda" if cuda and not args.smoke else "cpu")
    names = ["dense"] + [r for r in args.recipes if r != "dense"]
    if args.smoke:
        torch.set_num_threads(1)
        shapes, repeats, warmup, batch, image = [(64, 128)], 2, 1, 2, 32
        model_fn = lambda: build_model(False, None, image, width="tiny")  # noqa: E731
        compiled_names = [] if args.no_compile else ["dense", "MDGF-exp"]
        precision, dtype = "bf16 autocast (CPU)", torch.bfloat16
        print(
            "SMOKE on CPU: tiny sizes, timings meaningless; compiled runs only for dense and "
            "MDGF-exp; CUDA-only parts are skipped with their reason"
        )
    else:
        shapes, repeats, warmup, batch, image = (
            [(3072, 768), (768, 3072)],
            args.repeats,
            args.warmup,
            args.batch,
            224,
        )  # noqa: E501
        model_fn = lambda: build_model(True, None, image)  # noqa: E731
        compiled_names = [] if args.no_compile else names
        precision, dtype = "bf16 autocast, fp32 master weights", torch.bfloat16
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "smoke": args.smoke,
    }
    result["mask_kernel"] = mask_kernel(device, shapes, max(repeats, 3), not args.no_compile)
    base = model_fn().to(device)
    rows = train_steps(device, base, batch, image, names, compiled_names, warmup, repeats, dtype)
    del base
    result["train_step"] = {
        "model": "tiny ViT (smoke)" if args.smoke else "ViT-B/16",
        "batch": batch,
        "precision": precision,
        "rows": rows,
    }
    result["semi_structured"] = semi_structured(
        device, shapes, batch * 197, model_fn, batch, image, repeats
    )
    result["seconds"] = time.perf_counter() - started
    (out / "gpu_suite.json").write_text(json.dumps(result, indent=1))
    (out / "gpu_suite.md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {out / 'gpu_suite.json'} and {out / 'gpu_suite.md'} ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
