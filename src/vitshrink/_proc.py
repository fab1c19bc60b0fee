"""Process facts read from /proc, stdlib only (used by the torch-free deploy path and the bench worker)."""

from __future__ import annotations

import sys


def peak_rss_mb(rusage_fallback: bool = False) -> float | None:
    """This process's peak resident memory (VmHWM) in MiB; where /proc is unavailable, None, or with
    `rusage_fallback` getrusage's ru_maxrss (macOS).

    VmHWM is the process's own peak; ru_maxrss survives exec and would report a big parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    if not rusage_fallback:
        return None
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)  # bytes on macOS, KiB elsewhere
