"""Device profiles for `compress --device`: how latency is measured, which quant modes make sense, extras.

`jetson-nano` cannot be measured here: it limits threads to the Nano's 4 cores (or fewer present),
checks peak memory against its 4 GB shared by CPU and GPU, emits an fp16 TensorRT recipe, and marks
every latency as measured on this machine.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from typing import Any

from ..errors import VitshrinkError
from ..targets import TARGET_DEVICES
from ..targets import width_rule as _target_width

# The OS (and desktop) keep about 1 GB of a Jetson's shared memory (see vitshrink.deploy.trt.DEVICES).
JETSON_OS_RESERVED_MB = 1024


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    bench_device: str  # what bench_many runs on: "cpu" or "cuda"
    max_threads: int | None  # cap on intra-op threads (None: all cores)
    memory_mb: int | None  # memory the deployed model may use (None: unchecked)
    quant_modes: tuple[str, ...]  # quantization modes the budget search tries ("none" = keep fp32)
    trt: bool  # emit a TensorRT recipe for the final model
    disclaimer: str = ""


def _jetson_memory_mb() -> int:
    from ..deploy.trt import DEVICES

    return DEVICES["jetson-nano"].memory_mb - JETSON_OS_RESERVED_MB


PROFILES = TARGET_DEVICES


def get_profile(name: str) -> DeviceProfile:
    if name == "cpu":
        # fp16 runs through casts on most CPUs; it is kept so the search can measure, not assume. Every
        # int8 variant too: static / mixed quantize the convs that dynamic leaves float (smaller files).
        modes = ("none", "int8", "int8-dynamic", "int8-static", "int8-mixed", "fp16")
        return DeviceProfile("cpu", "cpu", None, None, modes, False)
    if name == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise VitshrinkError(
                "--device cuda needs onnxruntime with the CUDA execution provider (pip install onnxruntime-gpu)"
            )
        return DeviceProfile(
            "cuda",
            "cuda",
            None,
            None,
            ("none", "fp16"),
            False,
        )
    if name == "jetson-nano":
        return DeviceProfile(
            "jetson-nano",
            "cpu",
            4,
            _jetson_memory_mb(),
            # The Nano's Maxwell GPU has no fast int8: TensorRT fp16 is what runs there.
            ("fp16",),
            True,
            disclaimer=(
                f"latency was measured on this machine ({platform.machine()}, {os.cpu_count()} cores, "
                "onnxruntime CPU) with threads capped at the Nano's 4, not on a Jetson Nano: re-measure on "
                "the device with the TensorRT recipe in trt/ (build_engine.sh, then run_engine.py)"
            ),
        )
    raise VitshrinkError(f"unknown device '{name}' (choose from {', '.join(PROFILES)})")


def width_rule(profile: DeviceProfile, target_cpu: str = "auto") -> tuple[int, str]:
    """(multiple, why) that prune rounds widths to for this profile: a GPU's tile, else the vector
    width of the target CPU (one table: `vitshrink.targets`)."""
    return _target_width(profile.name, target_cpu)


def threads_for(profile: DeviceProfile, threads: int | None) -> int | None:
    """Intra-op threads for measuring: the caller's choice, capped by the profile and the cores present."""
    cores = os.cpu_count() or 1
    if profile.max_threads is not None:
        return max(1, min(threads or profile.max_threads, profile.max_threads, cores))
    return threads


def device_info(profile: DeviceProfile, threads: int | None) -> dict[str, Any]:
    import onnxruntime as ort

    info: dict[str, Any] = {
        "profile": profile.name,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": threads,
        "onnxruntime": ort.__version__,
        "runtime": f"onnxruntime {profile.bench_device.upper()}, batch 1",
    }
    if profile.memory_mb is not None:
        info["memory_cap_mb"] = profile.memory_mb
    info["round_to"], info["round_to_why"] = width_rule(profile)
    if profile.disclaimer:
        info["disclaimer"] = profile.disclaimer
    return info
