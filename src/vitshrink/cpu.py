"""Which int8 kernels the CPU runs, and the quantization format that is exact on it (no dependencies).

onnxruntime's x86 int8 GEMMs multiply uint8 activations by int8 weights (U8S8). With VNNI
(AVX512-VNNI, AVX-VNNI, AMX) one instruction (VPDPBUSD) accumulates straight into int32. Without it
(AVX2, and AVX-512 CPUs that lack VNNI) the kernel uses VPMADDUBSW, which adds two u8 x s8 products
into a *saturating* int16: 255 * 127 * 2 = 64770 does not fit, so large activations times large
weights are clipped and the model silently loses accuracy (measured: 0.175 relative output error on a
weight-heavy ViT where VNNI gives 0.02). onnxruntime's documented cure is `reduce_range`: 7-bit
weights (|w| <= 64) bound every pair by 255 * 64 * 2 = 32640 < 32767, so nothing can saturate. ARM64
kernels (SDOT/UDOT or widening multiplies) accumulate in 32 bits and need no such care.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

TARGET_CPUS = ("auto", "avx2", "vnni", "arm64")
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
# Tests and users can pretend to be another CPU (e.g. an AVX2 CI machine on an AMX host).
ENV_OVERRIDE = "VITSHRINK_CPU"


@functools.lru_cache(maxsize=4)  # the CPU does not change under a running process
def cpu_flags(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> frozenset[str]:
    """The feature flags of the first CPU in /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")[:1_000_000]
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def detect_cpu(machine: str | None = None, flags: frozenset[str] | None = None) -> str:
    """'arm64', 'vnni' (x86 with VNNI/AMX) or 'avx2' (any other x86) for this machine.

    `VITSHRINK_CPU` overrides detection; `machine` / `flags` stand in for the real ones in tests.
    """
    forced = os.environ.get(ENV_OVERRIDE, "").strip().lower()
    if forced in TARGET_CPUS[1:]:
        return forced
    machine = (machine or platform.machine()).lower()
    if machine in ("aarch64", "arm64", "armv8l"):
        return "arm64"
    flags = cpu_flags() if flags is None else flags
    return "vnni" if flags & VNNI_FLAGS else "avx2"


def resolve_target_cpu(target_cpu: str = "auto") -> str:
    """The concrete int8 target: the named one, or this machine's for 'auto'."""
    if target_cpu not in TARGET_CPUS:
        raise ValueError(f"unknown target CPU '{target_cpu}' (choose from {', '.join(TARGET_CPUS)})")
    return detect_cpu() if target_cpu == "auto" else target_cpu


def reduce_range_for(target_cpu: str) -> bool:
    """7-bit weights where the U8S8 kernels saturate (x86 without VNNI)."""
    return target_cpu == "avx2"


def int8_note(target_cpu: str) -> str:
    """One line for reports: what the int8 weights look like for this target and why."""
    if reduce_range_for(target_cpu):
        return "7-bit weights (reduce_range): AVX2 int8 kernels saturate 16-bit pair sums with full 8-bit weights"
    if target_cpu == "vnni":
        return (
            "full 8-bit weights: VNNI accumulates in 32 bits (on an x86 CPU without VNNI they may saturate)"
        )
    return "full 8-bit weights: ARM64 int8 kernels accumulate in 32 bits"


def runs_exactly_here(quantized_for: str | None, here: str | None = None) -> bool:
    """False when a model with full-range int8 weights (made for VNNI / ARM64) runs on an AVX2 x86 CPU."""
    if quantized_for not in ("vnni", "arm64"):
        return True  # float models and 7-bit (avx2) int8 run exactly anywhere; no need to probe the CPU
    return (here or detect_cpu()) != "avx2"
