"""Artifacts on disk: atomic writes, checksums and the `vitshrink.json` sidecar.

Every artifact (model directory, ONNX file, JSON) is written to a temporary sibling and renamed into
place when complete, so a killed run never leaves a half-written file where a good one was. Temporary
siblings are named `.<name>.<pid>@<host>.<random>.tmp`; those of processes that no longer exist (a
SIGKILLed run) are removed by the next `atomic_dir`/`atomic_path` write of the same artifact.

Test hooks (environment variables, read at the moment of each commit; unset in normal use):

- ``VITSHRINK_TEST_HANG_IN_SAVE=N``: at the N-th commit (1 = the first) of a matching artifact, print
  ``VITSHRINK_TEST_HANG_IN_SAVE: holding <path>`` to stderr and sleep forever, after the temporary
  file is complete but before the rename, so a test can SIGKILL the process mid-save deterministically.
- ``VITSHRINK_TEST_FAIL_IN_SAVE=ENOSPC`` (any errno name): raise that OSError at the commit instead,
  which is how a full disk surfaces.
- ``VITSHRINK_TEST_SAVE_MATCH=GLOB``: limit both hooks to artifacts whose file name matches (default ``*``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

META_NAME = "vitshrink.json"
ONNX_META_KEY = "vitshrink"  # the metadata_props entry every vitshrink ONNX carries (deploy._meta reads it)
META_FORMAT = 1

HANG_ENV = "VITSHRINK_TEST_HANG_IN_SAVE"
FAIL_ENV = "VITSHRINK_TEST_FAIL_IN_SAVE"
MATCH_ENV = "VITSHRINK_TEST_SAVE_MATCH"

# mkstemp/mkdtemp create 0600/0700 entries; artifacts get the permissions a plain open() would give.
# Read once at import: os.umask can only be read by setting it, which is unsafe once threads run.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_HOST = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())[:32] or "host"
_commits = 0


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}@{_HOST}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


def _clean_stale(path: Path) -> None:
    """Remove temporaries that killed processes on this host left beside `path`."""
    lead = f".{path.name}."
    with contextlib.suppress(OSError):
        for p in path.parent.iterdir():
            if not p.name.startswith(lead):
                continue
            owner = p.name[len(lead) :].split(".", 1)[0]  # "<pid>@<host>" or "old-<pid>@<host>"
            pid_s, _, host = owner.removeprefix("old-").partition("@")
            if host == _HOST and pid_s.isdigit() and not _pid_alive(int(pid_s)):
                _remove(p)


def _before_commit(target: Path) -> None:
    """The test hooks described in the module docstring; a no-op unless their variables are set."""
    global _commits
    hang, fail = os.environ.get(HANG_ENV), os.environ.get(FAIL_ENV)
    if not (hang or fail) or not fnmatch.fnmatch(target.name, os.environ.get(MATCH_ENV, "*")):
        return
    if fail:
        code = getattr(errno, fail, errno.EIO)
        raise OSError(code, os.strerror(code), str(target))
    _commits += 1
    if _commits >= int(hang or 1):
        print(f"{HANG_ENV}: holding {target}", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported.

    Hand-written with ctypes because neither os nor shutil exposes renameat2; without it replacing a
    directory takes two renames, and a kill between them would leave no artifact at `b`.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # file system without exchange support
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temp file beside `path`; on clean exit fsync and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # No stale-temp sweep here: small files are written in bulk (one mask per image) and a directory
    # scan per file would be quadratic; leftovers of a killed run are a few small hidden files.
    fd, tmp = tempfile.mkstemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; give the usual permissions first so a caller may still chmod inside.
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _before_commit(path)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp *path* beside `path` for libraries that write by name; rename when done."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with contextlib.suppress(FileNotFoundError):  # a library may have failed without raising
            os.chmod(tmp_path, 0o666 & ~_UMASK)
        _before_commit(path)
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory beside `path`; on success swap it into place.

    An existing directory at `path` is kept until the new one is complete, then replaced in one atomic
    exchange (two renames where the file system cannot exchange).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        _before_commit(path)
        if path.exists() and _exchange(tmp, path):
            _remove(tmp)  # now holds the previous version
        elif path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}@{_HOST}"
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_file(path, "w") as f:
        json.dump(obj, f, indent=2, default=_json_default)
        f.write("\n")


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | os.PathLike) -> Any:
    from .errors import VitshrinkError

    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise VitshrinkError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise VitshrinkError(f"expected a JSON file, got a directory: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VitshrinkError(f"corrupt JSON file {path}: {e}") from None


def cache_root() -> Path:
    """Where vitshrink keeps what it can rebuild (data indexes, decoded photos, generated sets, the
    demo's teachers): ``$VITSHRINK_CACHE`` or ``~/.cache/vitshrink``."""
    env = os.environ.get("VITSHRINK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vitshrink"
