"""The channel multiple each deploy target's kernels want: one table for `prune --target-device` and
`compress --device` (`compress.devices` profiles read it).

A CPU runs widths best as multiples of its vector width (`cpu.width_multiple`: 16 on AVX-512, 8 on
AVX2 / AVX-VNNI / arm64). A GPU runs fp16 GEMMs on tensor cores whose tiles want channel counts in
multiples of 8 (cuDNN / cuBLAS) or, for TensorRT's fp16 kernels on a Jetson, 32.
"""

from __future__ import annotations

from .cpu import width_multiple

TARGET_DEVICES = ("cpu", "cuda", "jetson-nano")
GPU_WIDTHS: dict[str, tuple[int, str]] = {
    "cuda": (8, "cuda: fp16 tensor-core GEMMs need channel counts that are multiples of 8"),
    "jetson-nano": (
        32,
        "jetson-nano: TensorRT fp16 kernels tile channels by 32 (tensor-core GEMM tiles on newer "
        "Jetsons); widths off the tile pad to the next one and waste the remainder",
    ),
}


def width_rule(device: str = "cpu", target_cpu: str = "auto") -> tuple[int, str]:
    """(multiple, why) that pruned widths should be rounded to for `device` (a GPU's tile, else the
    vector width of `target_cpu`)."""
    if device in GPU_WIDTHS:
        return GPU_WIDTHS[device]
    if device != "cpu":
        raise ValueError(f"unknown target device '{device}' (choose from {', '.join(TARGET_DEVICES)})")
    return width_multiple(target_cpu)


__all__ = ["GPU_WIDTHS", "TARGET_DEVICES", "width_rule"]
