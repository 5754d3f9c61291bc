"""What this machine can do, asked once per question, and the precision a run takes from it.

Two CPU classes run this project: x86-64 with AVX512-BF16 (or AMX), where bf16 matmuls run in hardware,
~2.5× fp32, and oneDNN prepacks bf16 weights; and AVX2-only CPUs (no AVX512, no bf16 hardware), where
oneDNN refuses to reorder a bf16 weight ("bf16 path needs the cpu support avx_ne_convert or avx512bw,
avx512vl and avx512dq") and bf16 matmuls are emulated. Every fast path asks these probes first, through
torch's own capability checks (not by catching the RuntimeError), and takes the plain path where the answer
is no: the same numbers, by another route.

`TAGPR_CPU=plain` forces every probe to "no" (no bf16 hardware, no prepacked weights), so a machine with
AVX512-BF16 runs the plainest paths; the test suite is run once more that way (`.ci/run`). An AVX2 laptop is
emulated faithfully by capping the libraries instead (`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
MKL_ENABLE_INSTRUCTIONS=AVX2`): ATen at AVX2 makes the bf16 probes say no, and fp32 weights are still prepacked, as
on the laptop itself.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

import torch

from .config import ConfigError

FORCE_ENV = "TAGPR_CPU"  # "plain": every probe answers no; unset or "auto": ask the machine
PRECISIONS = ("auto", "fp32", "bf16")


class PrecisionError(ConfigError):
    """A precision this machine cannot run (said before any work)."""


def forced_plain() -> bool:
    mode = os.environ.get(FORCE_ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", "plain"):
        raise ValueError(f"{FORCE_ENV}={os.environ[FORCE_ENV]!r}: expected 'auto' or 'plain'")
    return mode == "plain"


@functools.cache
def _aten_avx2() -> bool:
    # ATen's kernels at AVX2 or below: the CPU has no AVX512, or ATEN_CPU_CAPABILITY=avx2 caps it (an AVX2 machine
    # emulated on a larger one; its bf16 hardware then counts as absent, as on the machine emulated)
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "DEFAULT")


@functools.cache
def _bf16_matmul_hw() -> bool:
    cpu = getattr(torch, "cpu", None)
    names = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return not _aten_avx2() and any(bool(getattr(cpu, name, lambda: False)()) for name in names)


@functools.cache
def _prepack_ops() -> bool:
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


@functools.cache
def _onednn_bf16() -> bool:
    # the check oneDNN's bf16 reorder itself makes (avx512bw/vl/dq or avx_ne_convert)
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return probe is not None and not _aten_avx2() and bool(probe())


@functools.cache
def _mkl_pack_ops() -> bool:
    return (
        torch.backends.mkl.is_available()
        and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")
        and hasattr(torch.ops.mkl, "_mkl_linear")
    )


def bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX): there bf16 matmuls ran 2.4–3.3×
    faster than fp32 on the dev box; elsewhere they are emulated, slower than fp32."""
    return not forced_plain() and _bf16_matmul_hw()


def can_prepack(dtype: torch.dtype) -> bool:
    """Whether oneDNN can hold a CPU weight of `dtype` prepacked in its blocked layout (`tagpr.engine._Linear`)."""
    if forced_plain() or not _prepack_ops():
        return False
    return dtype != torch.bfloat16 or _onednn_bf16()


def can_pack_few_rows(dtype: torch.dtype) -> bool:
    """Whether MKL can hold a CPU fp32 weight packed for GEMMs of a few rows (`tagpr.engine._Linear` at a decode
    step's ≤ 32 rows: ~1.2–1.6× oneDNN's prepacked weight there, none faster above; bench/README.md)."""
    return dtype == torch.float32 and not forced_plain() and _mkl_pack_ops()


def describe() -> str:
    """The CPU class in the words the README uses ("AVX512-BF16", "AVX2 only", …), and a forced probe."""
    if forced_plain():
        return f"probes forced to plain ({FORCE_ENV}=plain)"
    cap = torch.backends.cpu.get_cpu_capability()
    if _bf16_matmul_hw():
        return "AMX" if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)() else "AVX512-BF16"
    return {"AVX2": "AVX2 only", "AVX512": "AVX512 without BF16"}.get(cap, cap)


def resolve_precision(precision: str, device: torch.device) -> str:
    """The forward matmuls' precision. "auto": bf16 on CUDA, fp32 on a CPU. "bf16" on a CPU needs bf16
    hardware: without it the run stops here, before any work (emulated bf16 is slower than fp32 and gives
    other numbers)."""
    if precision not in PRECISIONS:
        raise PrecisionError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16" and device.type == "cpu" and not bf16_matmul():
        raise PrecisionError(
            f"--precision bf16 needs a CPU with bf16 matmul hardware (AVX512-BF16 or AMX); this "
            f"one: {describe()}. Use --precision fp32 (or auto)."
        )
    return precision


def autocast(device: torch.device, precision: str):
    """bf16 autocast for the forward pass (matmuls in bf16, parameters, optimizer and losses in fp32)."""
    return torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16")


def keep_freed_memory() -> bool:
    """Let glibc keep freed memory for reuse instead of handing it back to the OS; every script calls it first.

    Large blocks are otherwise fresh `mmap`s, returned when freed, so the next activation page-faults on every
    page (bench/README.md measures it). Blocks up to 32 MB come from the heap and nothing is trimmed; resident
    memory then stays at the process's peak. Linux/glibc only (returns False elsewhere)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl)
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
