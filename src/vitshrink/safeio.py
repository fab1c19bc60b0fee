"""Bounded reads of files the user did not hand over directly (recipes, tables, files named in JSON).

A small hostile or mistaken file must not make vitshrink hang, fill memory or disk, or read something
outside the folder it belongs to:

- `load_yaml`: refuses documents over `MAX_YAML_BYTES` and more than `MAX_YAML_ALIASES` aliases (a
  "billion laughs" alias bomb expands exponentially in memory and in anything serialised from it);
- `read_limited` / `read_json_limited`: only regular files (not /dev/zero, FIFOs or folders), at most
  `max_bytes`, optionally only inside a given directory (after resolving symlinks and `..`).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from .errors import DataError

MAX_YAML_BYTES = 1 << 20
MAX_YAML_ALIASES = 16  # k levels of k aliases expand to at most ~3^(16/3) ~ 350 nodes
MAX_JSON_BYTES = 16 << 20
MAX_IMAGE_BYTES = 64 << 20


def inside(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """True when `path` (symlinks and `..` resolved) lies inside `root`."""
    p, r = Path(path).resolve(), Path(root).resolve()
    return p == r or r in p.parents


def check_regular(
    path: str | os.PathLike, *, what: str = "file", within: str | os.PathLike | None = None, max_bytes: int
) -> Path:
    """Raise DataError unless `path` is a regular file of at most `max_bytes` (inside `within` if given)."""
    path = Path(path)
    if within is not None and not inside(path, within):
        raise DataError(f"{what} {path} is outside {within}; refusing to read it")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"{what} not found: {path}") from None
    except OSError as e:
        raise DataError(f"cannot read {what} {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{what} {path} is not a regular file")
    if st.st_size > max_bytes:
        raise DataError(
            f"{what} {path} is {st.st_size / 2**20:.1f} MiB; the limit is {max_bytes / 2**20:.0f} MiB"
        )
    return path


def read_limited(
    path: str | os.PathLike, *, what: str = "file", within: str | os.PathLike | None = None, max_bytes: int
) -> bytes:
    """The bytes of a regular file, refusing one that is (or grows) larger than `max_bytes`."""
    path = check_regular(path, what=what, within=within, max_bytes=max_bytes)
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)  # a file still being appended to stops here too
    if len(data) > max_bytes:
        raise DataError(f"{what} {path} is larger than {max_bytes / 2**20:.0f} MiB")
    return data


def read_json_limited(
    path: str | os.PathLike,
    *,
    what: str = "JSON file",
    within: str | os.PathLike | None = None,
    max_bytes: int = MAX_JSON_BYTES,
) -> Any:
    raw = read_limited(path, what=what, within=within, max_bytes=max_bytes)
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{what} {path} is not valid JSON: {e}") from None


def load_yaml(
    path: str | os.PathLike, *, max_bytes: int = MAX_YAML_BYTES, max_aliases: int = MAX_YAML_ALIASES
) -> Any:
    """yaml.safe_load with a size limit and an alias limit; raises yaml.YAMLError or DataError."""
    import yaml

    text = read_limited(path, what="YAML file", max_bytes=max_bytes).decode("utf-8")

    class _Loader(yaml.SafeLoader):
        aliases = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                self.aliases += 1
                if self.aliases > max_aliases:
                    raise DataError(
                        f"{path}: more than {max_aliases} YAML aliases (*refs); refusing a document that "
                        "may expand without bound"
                    )
            return super().compose_node(parent, index)

    loader = _Loader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
