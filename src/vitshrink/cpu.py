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


def cpu_name(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> str:
    """The CPU's model name from /proc/cpuinfo (for benchmark reports), else what `platform` says."""
    try:
        for line in Path(cpuinfo).read_text(errors="replace")[:1_000_000].splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


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


# fp32 lanes of the widest vector unit the int8/fp32 GEMM kernels use: AVX-512 16, AVX2 8. ARM64 NEON
# holds 4 fp32 or 8 fp16 lanes; 8 serves both. A named 'vnni' means an AVX-512 VNNI server part.
SIMD_LANES = {"avx2": 8, "vnni": 16, "arm64": 8}


def width_multiple(target_cpu: str = "auto", flags: frozenset[str] | None = None) -> tuple[int, str]:
    """(multiple, why) that pruned widths (heads x head size, MLP widths) should be rounded to on a CPU.

    A width that is not a multiple of the vector width leaves a partly filled vector (or a scalar tail
    loop) in every GEMM row. 'auto' looks at this CPU: AVX-VNNI without AVX-512 (client x86) is 8 lanes.
    """
    cpu = detect_cpu(flags=flags) if target_cpu == "auto" else resolve_target_cpu(target_cpu)
    lanes = SIMD_LANES[cpu]
    if target_cpu == "auto" and cpu == "vnni":
        flags = cpu_flags() if flags is None else flags
        lanes = 16 if "avx512f" in flags else 8
    unit = {
        "avx2": "AVX2 vectors hold 8 fp32",
        "arm64": "NEON vectors hold 4 fp32 or 8 fp16 (8 serves both)",
    }.get(cpu, f"{'AVX-512' if lanes == 16 else 'AVX-VNNI (256-bit)'} vectors hold {lanes} fp32")
    return lanes, f"{'detected' if target_cpu == 'auto' else 'named'} CPU {cpu}: {unit}"
