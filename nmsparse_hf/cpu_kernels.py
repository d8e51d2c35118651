"""Native CPU kernels for the passes of a sparse step, built on first use with the C compiler.

On CPU the masking passes are memory-bound chains of ATen ops: the N:M mask alone is four to five
passes over the weight (|W|, group maxima, a comparison, a count, a cast), MDGF's W̃ builds its
factor in four, the SR-STE term takes three. `nmsparse_hf/csrc/nm_cpu.c` does each in one pass:

- `nm_mask`: the keep-mask of a float32 weight grouped along its last dimension: M = 4, 8 or 16
  (any N), one group per SIMD vector; M = 32 or 64 (N <= 16) by peeling the N largest;
- `masked`: W̃ = W ⊙ (m + α(1 − m)) of a float32 weight, written as float32;
- `straight_through_`: the SR-STE term and the frozen-mask zeroing, in place on a float32 gradient.

Each returns bit for bit what the ATen path returns (NaN, ±inf and ±0 included; the tests compare
both on every pattern and edge value). Anything else — CUDA, other dtypes, W̃ in an autocast
dtype, column groups, k×k convolutions, other patterns (M = 2, 128, ...; N > 16 of 32 or 64),
non-contiguous tensors, tensor subclasses, fake tensors, tracing under ``torch.compile``, a graph
recorded for double backward — takes the ATen path, as does everything when no compiler is found or ``NMSPARSE_HF_CPU_KERNELS``
is ``0`` (or ``false``, ``no``, ``off``).

The library is compiled once per machine (``cc -O3 -march=native -ffp-contract=off``, plus
``-fopenmp`` where PyTorch runs on GNU OpenMP, so that the loops share PyTorch's threads; well
under a second) into ``$NMSPARSE_HF_CACHE`` (default ``~/.cache/nmsparse_hf``), keyed by the source, the
flags and the CPU; several processes building at once each write a private file and rename it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

ENV_SWITCH = "NMSPARSE_HF_CPU_KERNELS"  # "0", "false", "no" or "off" turns the kernels off
MASK_GROUP_SIZES = (4, 8, 16, 32, 64)  # the M that `nm_mask` has a kernel for
PEELED_MAX_N = 16  # M = 32 and 64: the kernel peels N maxima, for N up to this
_BASE_FLAGS = ["-O3", "-ffp-contract=off", "-fPIC", "-shared"]
_switched_off = False  # set by `disabled()`
_why_not: str | None = None  # why the library could not be built or loaded


@contextlib.contextmanager
def disabled():
    """Within the block every pass takes the ATen path (for comparisons and benchmarks)."""
    global _switched_off
    before, _switched_off = _switched_off, True
    try:
        yield
    finally:
        _switched_off = before


def _off_by_environment() -> bool:
    return os.environ.get(ENV_SWITCH, "").strip().lower() in ("0", "false", "no", "off")


def available() -> bool:
    """True when the kernels are built and loaded and not switched off: CPU float32 passes use them."""
    return not _switched_off and not _off_by_environment() and _library() is not None


def unavailable_reason() -> str | None:
    """Why the kernels are not in use (switched off, no compiler, a build error), or None."""
    if _switched_off:
        return "switched off by nmsparse_hf.cpu_kernels.disabled()"
    if _off_by_environment():
        return f"switched off by {ENV_SWITCH}={os.environ[ENV_SWITCH]}"
    _library()
    return _why_not


def _not_built(reason: str) -> None:
    global _why_not
    _why_not = reason
    logger.info("nmsparse_hf: %s; the CPU passes use ATen (same results, slower).", reason)


def _cache_dir() -> Path:
    root = os.environ.get("NMSPARSE_HF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nmsparse_hf"
    )
    return Path(root)


def _cpu_identity() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    wanted = ("model name", "flags", "Features", "CPU part")
    picked = sorted({line for line in lines if line.split(":")[0].strip() in wanted})
    return platform.machine() + platform.processor() + "\n".join(picked)


def _torch_runs_gnu_openmp() -> bool:
    """True when PyTorch's OpenMP runtime is GNU's ``libgomp.so.1``, already loaded in this process:
    a library built with ``-fopenmp`` then binds to that same runtime and shares its threads. (With
    another runtime, e.g. Intel's, a second one would compete for the cores: no OpenMP then.)"""
    try:
        ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD | ctypes.RTLD_GLOBAL)
    except (OSError, AttributeError):
        return False
    return True


def _flag_sets() -> list[list[str]]:
    """The compiler flags to try, best first: native code and OpenMP, then without each."""
    sets = [["-march=native", *_BASE_FLAGS], _BASE_FLAGS]
    if _torch_runs_gnu_openmp():
        sets.insert(0, ["-march=native", "-fopenmp", *_BASE_FLAGS])
    return sets


def _compile(compiler: list[str], source: Path, target: Path, flag_sets) -> str | None:
    """Build ``source`` into ``target`` (atomically) with the first of ``flag_sets`` that works;
    None on success, else the compiler's errors."""
    errors = []
    for flags in flag_sets:
        fd, scratch = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            result = subprocess.run(
                [*compiler, *flags, str(source), "-o", scratch],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if result.returncode == 0:
                os.replace(scratch, target)
                return None
            errors.append(result.stderr.strip()[-500:])
        except (OSError, subprocess.SubprocessError) as error:
            errors.append(str(error))
        finally:
            if os.path.exists(scratch):
                os.unlink(scratch)
    return " | ".join(errors)


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The loaded kernels, built first where needed; None (logged once) when that cannot be done."""
    source_text = resources.files(__package__).joinpath("csrc/nm_cpu.c").read_bytes()
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        _not_built("no C compiler found (cc, gcc or $CC)")
        return None
    flag_sets = _flag_sets()
    key = hashlib.sha256(
        source_text + repr(flag_sets).encode() + compiler.encode() + _cpu_identity().encode()
    ).hexdigest()[:16]
    target = _cache_dir() / f"nm_cpu-{key}.so"
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory() as scratch:
                source = Path(scratch) / "nm_cpu.c"
                source.write_bytes(source_text)
                error = _compile(shlex.split(compiler), source, target, flag_sets)
            if error is not None:
                _not_built(f"the CPU kernels did not build with {compiler}: {error}")
                return None
        library = ctypes.CDLL(str(target))
    except OSError as error:
        _not_built(f"the CPU kernels could not be built or loaded: {error}")
        return None
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p
    library.nm_mask_f32.argtypes = [ptr, ptr, i64, i32, i32]
    library.nm_mask_f32.restype = ctypes.c_int
    library.masked_f32.argtypes = [ptr, ptr, ctypes.c_float, ptr, i64]
    library.masked_f32.restype = None
    library.straight_through_f32.argtypes = [ptr, ptr, ptr, ctypes.c_float, ctypes.c_int, i64]
    library.straight_through_f32.restype = None
    return library


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def _plain_cpu(*tensors: torch.Tensor) -> bool:
    """True when every tensor is an ordinary contiguous CPU tensor whose memory may be handed to C
    (not a subclass, fake or functorch-wrapped tensor)."""
    for tensor in tensors:
        if (
            type(tensor) not in _PLAIN_TYPES
            or tensor.device.type != "cpu"
            or tensor.layout != torch.strided
            or not tensor.is_contiguous()
            or torch._C._functorch.is_functorch_wrapped_tensor(tensor)
        ):
            return False
    return True


def has_mask_kernel(n: int, m: int) -> bool:
    """Whether `nm_mask` has a native kernel for the pattern n:m (M = 4, 8, 16 with any N; M = 32
    and 64 with N up to `PEELED_MAX_N`)."""
    return m in MASK_GROUP_SIZES and (m <= 16 or n <= PEELED_MAX_N)


def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor | None:
    """The bool N:M keep-mask of a float32 ``weight`` grouped in runs of ``m`` consecutive entries
    (its last dimension), as `nmsparse_hf.masks.nm_mask`; None where the kernel does not apply
    (the caller then takes the ATen path)."""
    if (
        torch.compiler.is_compiling()  # first: the checks below are not for a tracer to read
        or not has_mask_kernel(n, m)
        or weight.dtype != torch.float32
        or weight.numel() % m
        or not available()
        or not _plain_cpu(weight)
    ):
        return None
    mask = torch.empty(weight.shape, dtype=torch.bool)
    _library().nm_mask_f32(weight.data_ptr(), mask.data_ptr(), weight.numel() // m, m, n)
    return mask


def _same_shape_float32(tensor: torch.Tensor, mask: torch.Tensor) -> bool:
    return (
        tensor.dtype == torch.float32
        and mask.dtype == torch.bool
        and mask.shape == tensor.shape
        and available()
    )


def masked(weight: torch.Tensor, mask: torch.Tensor, alpha: float | torch.Tensor):
    """W ⊙ (m + α(1 − m)) of a float32 ``weight`` as a new float32 tensor, bit for bit the ATen
    path's (α rounded to float32 first, as ATen does); None where the kernel does not apply."""
    if (
        torch.compiler.is_compiling()
        or not _same_shape_float32(weight, mask)
        or not _plain_cpu(weight, mask)
    ):
        return None
    if isinstance(alpha, torch.Tensor):
        if alpha.numel() != 1 or not _plain_cpu(alpha):
            return None
        alpha = alpha.item()
    out = torch.empty_like(weight)
    _library().masked_f32(weight.data_ptr(), mask.data_ptr(), alpha, out.data_ptr(), out.numel())
    return out


def straight_through_(
    grad: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, srste_lambda: float, freeze: bool
) -> bool:
    """In place on the float32 ``grad``: + λ·W where the mask is False (λ ≠ 0), then +0 there when
    ``freeze``; bit for bit the ATen path. False (``grad`` untouched) where the kernel does not
    apply."""
    if (
        torch.compiler.is_compiling()
        or not _same_shape_float32(grad, mask)
        or weight.dtype != torch.float32
        or weight.shape != grad.shape
        or not _plain_cpu(grad, weight, mask)
    ):
        return False
    _library().straight_through_f32(
        grad.data_ptr(), weight.data_ptr(), mask.data_ptr(), srste_lambda, int(freeze), grad.numel()
    )
    return True
