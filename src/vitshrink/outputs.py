"""The output policy shared by every command: vitshrink never replaces what it did not write.

An output (`--out`, `--json`, predict's masks) must be a new path, an empty folder, or an artifact
vitshrink itself wrote, recognisable by its contents:

- a model directory holds `vitshrink.json`; a run directory (compress, demo, predict, trt-recipe)
  holds the files that command writes (`state.json`/`results.json`, `predictions.json`, ...);
- an ONNX file carries vitshrink's metadata (`metadata_props["vitshrink"]`);
- a JSON file has the layout vitshrink writes (bench results, predictions);
- a PNG mask/overlay carries the text chunk `Software: vitshrink`.

Anything else is refused with a one-line error. `--overwrite` lets a single foreign *file* be
replaced; a non-empty foreign folder is never replaced, and no output may be (or contain) an input of
the same run. Each output is also locked for the run (`flock` on a file under the temp dir) so a
second concurrent writer fails fast instead of silently losing one result.

Temporary folders (`vitshrink-<what>-p<pid>-*` in the system temp dir) carry their owner's pid, so
`sweep_stale_temps` can remove those of killed runs without touching a live one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from .artifacts import META_NAME, ONNX_META_KEY, _pid_alive
from .errors import VitshrinkError

PNG_SOFTWARE = "vitshrink"
STALE_AFTER_S = 6 * 3600  # a temp dir this old whose owner is dead is a killed run's leftover
_TEMP_RE = re.compile(r"^vitshrink-[\w.-]*?-p(\d+)-[\w]+$")

# kind -> names whose presence inside a directory shows vitshrink wrote it
DIR_MARKERS: dict[str, tuple[str, ...]] = {
    "model": (META_NAME,),
    "ckpt": ("trainer_state.pt",),  # OUT.ckpt: written per epoch by train/distill/prune recovery
    "run": ("state.json", "results.json", "search.json", "*/summary.txt"),
    "predict": ("predictions.json",),
    "trt": ("build_engine.sh",),
}


class OutputError(VitshrinkError):
    """An output path the policy refuses."""


# ------------------------------------------------------------------------------- recognisers


def _is_vitshrink_dir(path: Path, kind: str) -> bool:
    markers = DIR_MARKERS.get(kind, ()) + DIR_MARKERS["model"]
    return any(any(path.glob(m)) if "*" in m else (path / m).is_file() for m in markers)


def is_vitshrink_onnx(path: Path) -> bool:
    """True when the ONNX file carries vitshrink's metadata (export, quantize)."""
    try:
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - unreadable means "not ours"
        return False
    return any(p.key == ONNX_META_KEY for p in proto.metadata_props)


def is_vitshrink_json(path: Path) -> bool:
    """True for the JSON layouts vitshrink writes under a user-chosen name (bench, predictions)."""
    if path.stat().st_size > 64 << 20:
        return False
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(obj, dict):
        return False
    if {"model", "task", "predictions"} <= obj.keys():
        return True
    res = obj.get("results")
    return isinstance(res, list) and all(isinstance(r, dict) and "latency_ms" in r for r in res)


def is_vitshrink_png(path: Path) -> bool:
    try:
        from PIL import Image

        with Image.open(path) as im:
            return im.format == "PNG" and im.info.get("Software") == PNG_SOFTWARE
    except Exception:  # noqa: BLE001
        return False


def is_vitshrink_file(path: Path) -> bool:
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return is_vitshrink_onnx(path)
    if suffix == ".json":
        return is_vitshrink_json(path)
    if suffix == ".png":
        return is_vitshrink_png(path)
    return False


# ------------------------------------------------------------------------------------ policy


def _resolve(p: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(p))))  # no symlink games: compare real paths too


def _same_or_inside(a: Path, b: Path) -> bool:
    """a is b or lies inside b (by absolute and by real path)."""
    return any(x == y or y in x.parents for x, y in ((a, b), (a.resolve(), b.resolve())))


def check_output(
    path: str | os.PathLike,
    kind: str,
    *,
    inputs: Iterable[str | os.PathLike | None] = (),
    overwrite: bool = False,
    into: bool = False,
) -> Path:
    """Refuse `path` as an output unless it is new, empty, or a vitshrink artifact; returns it.

    kind: "model" | "ckpt" | "run" | "predict" | "trt" for directories, "file" for a single file.
    into: the command writes named files into the directory rather than replacing it whole, so it may
    contain its inputs (e.g. predict next to its images); replacing commands may not.
    """
    out = _resolve(path)
    flag = "" if overwrite else " (or pass --overwrite)"
    for raw in inputs:
        if raw is None or not os.path.exists(raw):
            continue  # presets, dataset names
        inp = _resolve(raw)
        if _same_or_inside(out, inp) and (kind == "file" or out.resolve() == inp.resolve() or not into):
            raise OutputError(f"refusing to write {path}: it is an input of this run ({raw})")
        if not into and _same_or_inside(inp, out):
            raise OutputError(f"refusing to write {path}: it contains an input of this run ({raw})")
    if not into and kind != "file" and _same_or_inside(Path.cwd(), out):
        raise OutputError(f"refusing to replace {path}: it is (or contains) the current directory")
    if not os.path.lexists(out):
        return out
    if out.is_symlink() and kind != "file":
        raise OutputError(f"refusing to replace {path}: it is a symbolic link")
    if kind == "file":
        if out.is_dir():
            raise OutputError(f"refusing to write {path}: it is a directory")
        if not out.is_file():
            raise OutputError(f"refusing to write {path}: not a regular file")
        if not overwrite and not is_vitshrink_file(out):
            raise OutputError(f"refusing to overwrite {path}: not a file vitshrink wrote{flag}")
        return out
    if not out.is_dir():
        if overwrite and out.is_file() and not into:
            return out
        raise OutputError(f"refusing to replace {path}: it exists and is not a directory{flag}")
    if next(out.iterdir(), None) is None or _is_vitshrink_dir(out, kind):
        return out
    if kind == "predict":
        return out  # predict adds files beside the user's (e.g. masks next to the images), each checked
    if into and overwrite:
        return out  # named files are checked one by one (predict) or are vitshrink's own names
    raise OutputError(
        f"refusing to {'write into' if into else 'replace'} {path}: an existing folder that vitshrink "
        f"did not write (no {DIR_MARKERS.get(kind, DIR_MARKERS['model'])[0]}); choose a new path"
        + ("" if not into else flag)
    )


def check_file_target(path: Path, *, inputs: Iterable[Path] = (), overwrite: bool = False) -> None:
    """One named file a command writes into a folder (predict's masks): new, vitshrink's, or refused."""
    real = path.resolve()
    if any(real == Path(i).resolve() for i in inputs):
        raise OutputError(f"refusing to overwrite {path}: it is an input of this run")
    if os.path.lexists(path) and not (path.is_file() and (overwrite or is_vitshrink_file(path))):
        raise OutputError(
            f"refusing to overwrite {path}: not a file vitshrink wrote{'' if overwrite else ' (or pass --overwrite)'}"
        )


# -------------------------------------------------------------------------------------- locks


def _lock_dir() -> Path:
    d = Path(tempfile.gettempdir()) / f"vitshrink-locks-u{os.getuid()}"
    d.mkdir(mode=0o700, exist_ok=True)
    return d


@contextlib.contextmanager
def lock_outputs(paths: Iterable[str | os.PathLike]) -> Iterator[None]:
    """Hold an exclusive lock per output for the run; a second writer of the same path fails fast.

    The lock files live in the temp dir (keyed by the output's absolute path), so nothing is added next
    to the user's files and a missing parent needs no creating.
    """
    import fcntl

    held: list[IO[bytes]] = []
    try:
        for p in sorted({str(_resolve(p)) for p in paths}):
            name = hashlib.sha256(p.encode()).hexdigest()[:24] + ".lock"
            f = open(_lock_dir() / name, "a+b")  # noqa: SIM115 - held until the run ends
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                raise OutputError(f"another vitshrink run is writing {p}; wait for it to finish") from None
            held.append(f)
        yield
    finally:
        for f in held:
            f.close()


# ----------------------------------------------------------------------------- temporary dirs


def temp_dir(what: str) -> tempfile.TemporaryDirectory:
    """A TemporaryDirectory named with this process's pid, so a later run can sweep it if we are killed."""
    return tempfile.TemporaryDirectory(prefix=f"vitshrink-{what}-p{os.getpid()}-")


def sweep_stale_temps(root: str | os.PathLike | None = None, *, older_than_s: float = STALE_AFTER_S) -> int:
    """Remove temp dirs of dead vitshrink processes (ours, older than `older_than_s`); returns how many."""
    root = Path(root or tempfile.gettempdir())
    now, uid, n = time.time(), os.getuid(), 0
    with contextlib.suppress(OSError):
        for p in root.iterdir():
            m = _TEMP_RE.match(p.name)
            if not m:
                continue
            try:
                st = p.lstat()
            except OSError:
                continue
            if st.st_uid != uid or now - st.st_mtime < older_than_s or _pid_alive(int(m.group(1))):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
                n += 1
    return n
