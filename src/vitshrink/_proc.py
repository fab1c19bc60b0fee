"""Process facts read from /proc, stdlib only (used by the torch-free deploy path and the bench worker)."""

from __future__ import annotations


def peak_rss_mb() -> float | None:
    """This process's peak resident memory (VmHWM) in MiB; None where /proc is unavailable.

    VmHWM is the process's own peak; ru_maxrss survives exec and would report a big parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None
