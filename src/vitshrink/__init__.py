"""vitshrink: compress Vision Transformers for edge devices.

The Python API mirrors the CLI: every subcommand is a function here taking the same options.
Imports are lazy so that the deploy path (`vitshrink.deploy`) never pulls in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "train": "vitshrink.train",
    "evaluate": "vitshrink.evaluate",
    "bench": "vitshrink.bench",
    "export": "vitshrink.export",
    "demo": "vitshrink.demo",
    "distill": "vitshrink.distill",
    "prune": "vitshrink.prune",
    "quantize": "vitshrink.quantize",
    "predict": "vitshrink.deploy",
    "compress": "vitshrink.compress",
    "report": "vitshrink.report",
    "build_model": "vitshrink.models",
    "load_model": "vitshrink.models",
    "save_model": "vitshrink.models",
    "load_dataset": "vitshrink.data",
}


def __getattr__(name: str) -> Any:
    mod = _API.get(name)
    if mod is None:
        raise AttributeError(f"module 'vitshrink' has no attribute {name!r}")
    module = importlib.import_module(mod)
    # Stage modules are callable (see _callable.py); return the function itself for clarity.
    return getattr(module, name)


__all__ = sorted(_API)
