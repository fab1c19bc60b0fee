"""Progress bars (tqdm) for every long loop; `--quiet` or VITSHRINK_QUIET=1 turns them off."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(
    it: Iterable[T], *, desc: str = "", disable: bool = False, total: int | None = None, **kw: Any
) -> Iterable[T]:
    disable = disable or os.environ.get("VITSHRINK_QUIET") == "1"
    return tqdm(
        it, desc=desc, total=total, disable=disable, leave=False, dynamic_ncols=True, file=sys.stderr, **kw
    )
