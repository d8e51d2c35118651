"""Peak memory and time of `one_shot` on a randomly initialized Llama (docs/PRETRAINED.md).

    python bench/one_shot_cost.py --method sparsegpt --samples 32
    python bench/one_shot_cost.py --method wanda --samples 128 --no-errors

Builds a Llama of ``--hidden`` / ``--intermediate`` / ``--layers`` (8 heads, a 1000-token
vocabulary, untied embeddings), runs one warm-up forward, then prunes FF, Q, K, V and O to
``--pattern`` with ``--samples`` calibration sequences of ``--tokens`` tokens. "peak" is the
process's high-water resident set size (``getrusage(RUSAGE_SELF).ru_maxrss``) minus the resident
size just before `one_shot`, so it includes what the allocator kept cached. Run one method per
process: the high-water mark never comes down.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch


def resident_mib() -> float:
    """The process's resident set size now, in MiB (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def main(argv: list[str] | None = None) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    from nmsparse_hf import NMSparsityConfig, one_shot

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=("magnitude", "wanda", "sparsegpt"), default="sparsegpt")
    p.add_argument("--samples", type=int, default=32, help="calibration sequences")
    p.add_argument("--tokens", type=int, default=128, help="tokens per sequence")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--pattern", default="2:4", help="N:M, N kept")
    p.add_argument("--no-errors", action="store_true", help="skip the reconstruction errors")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    n_keep, m = (int(v) for v in a.pattern.split(":"))
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=1000,
            hidden_size=a.hidden,
            intermediate_size=a.intermediate,
            num_hidden_layers=a.layers,
            num_attention_heads=8,
            num_key_value_heads=8,
            tie_word_embeddings=False,
        )
    )
    ids = [torch.randint(0, 1000, (1, a.tokens)) for _ in range(a.samples)]
    calibration = [{"input_ids": x, "attention_mask": torch.ones_like(x)} for x in ids]
    with torch.no_grad():
        model(**calibration[0])
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    before = resident_mib()
    start = time.perf_counter()
    report = one_shot(
        model,
        NMSparsityConfig(n_keep=n_keep, m=m, locations="FF,QKV,O"),
        a.method,
        calibration=calibration,
        reconstruction_error=not a.no_errors,
        progress=False,
    )
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"Llama hidden {a.hidden}, intermediate {a.intermediate}, {a.layers} blocks "
        f"({weights:.0f} MiB of weights), {a.pattern} on FF,QKV,O, torch {torch.__version__}, "
        f"threads {a.threads}"
    )
    errors = "no" if a.no_errors else "yes"
    print(f"{'method':>10} {'calibration':>16} {'errors':>7} {'peak above model':>17} {'time':>8}")
    print(
        f"{a.method:>10} {f'{a.samples} x {a.tokens} tokens':>16} {errors:>7} "
        f"{f'+{peak - before:.0f} MiB':>17} {f'{seconds:.1f} s':>8}"
    )
    errors = [b.relative_error for b in report.blocks if b.relative_error is not None]
    mean = f", mean relative reconstruction error {sum(errors) / len(errors):.3f}" if errors else ""
    print(f"layer blocks pruned: {len(report.blocks)}, kept {report.kept_fraction:.3f}{mean}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
