"""Make a stage module callable, so `vitshrink.prune(...)` works although `vitshrink.prune` is a package.

Python rebinds `vitshrink.<name>` to the submodule once it is imported, which would shadow a function
of the same name; giving the module a `__call__` keeps both `vitshrink.prune(...)` and
`vitshrink.prune.<submodule>` working.
"""

from __future__ import annotations

import sys
import types
from typing import Any


def install(module_name: str, func_name: str) -> None:
    module = sys.modules[module_name]

    class _CallableModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return getattr(self, func_name)(*args, **kwargs)

    module.__class__ = _CallableModule
