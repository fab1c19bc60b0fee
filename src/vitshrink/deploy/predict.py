"""`vitshrink predict`: run an exported ONNX model over image files and folders, on the edge.

Imports only numpy, Pillow and onnxruntime (through `runtime`), so it fits next to the model on a 4 GB
Jetson Nano. Bad images in a folder are reported and skipped; one broken file never stops a batch.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from .._proc import peak_rss_mb
from ..artifacts import _UMASK, atomic_file, write_json
from ..errors import DataError
from ..labels import PALETTE
from ..outputs import PNG_SOFTWARE, check_file_target
from ._base import DeployModel
from .loader import open_model
from .tiling import DEFAULT_OVERLAP

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})
# Only raster formats a camera or dataset produces. Pillow would otherwise also open EPS (which runs
# Ghostscript on load), PSD, ICO and more: not something to feed untrusted files to on a device.
# (Phone MPO photos open through the JPEG plugin.)
ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "WEBP", "TIFF", "GIF", "PPM")
# Modes Pillow converts faithfully to grey/RGB. 16-bit grey is scaled by the runtime; float ("F") and
# LAB have no fixed range / no colorimetric conversion in Pillow, so they are refused.
SUPPORTED_MODES = frozenset(
    {
        "1",
        "L",
        "LA",
        "P",
        "PA",
        "RGB",
        "RGBA",
        "RGBX",
        "CMYK",
        "YCbCr",
        "HSV",
        "I",
        "I;16",
        "I;16L",
        "I;16B",
        "I;16N",
    }
)
# Below this an image holds no usable content at any model resolution: upscaled it is a flat patch and the
# answer is noise, so it is reported (typically a tracking pixel or a thumbnail stub) rather than predicted.
MIN_SIDE = 8


_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def _sniff(path: Path) -> str | None:
    """The format a file's magic bytes claim, to tell corrupt images from non-images."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError:
        return None
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for magic, fmt in _SIGNATURES if head.startswith(magic)), None)


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image, or raise DataError with a one-line reason."""
    path = Path(path)
    try:
        nbytes = path.stat().st_size
    except FileNotFoundError:
        raise DataError("file not found") from None
    except OSError as e:
        raise DataError(f"cannot read file ({e.strerror or e})") from None
    if nbytes == 0:
        raise DataError("empty file (0 bytes)")
    try:
        src = Image.open(path, formats=ALLOWED_FORMATS)
    except Image.UnidentifiedImageError:
        fmt = _sniff(path)
        if fmt:  # the right signature but an unreadable header: say "corrupt", not "not an image"
            raise DataError(f"corrupt {fmt} file (unreadable header)") from None
        raise DataError(f"not an image in a supported format ({', '.join(ALLOWED_FORMATS)})") from None
    except Image.DecompressionBombError as e:
        raise DataError(f"image too large to decode safely ({e})") from None
    except OSError as e:
        raise DataError(f"cannot read file ({e.strerror or e})") from None
    try:
        with src:  # multi-frame formats (GIF, MPO) keep the file open until closed
            src.load()  # Image.open only reads the header; truncation and bad data surface here
            # Camera photos: predict on the image as displayed. Always a new image, so closing src is safe.
            img = ImageOps.exif_transpose(src, in_place=False)
    except Exception as e:  # noqa: BLE001
        # Pillow's decoders raise OSError, SyntaxError, ValueError, struct.error, zlib.error... on hostile
        # bytes; every one of them means "this file is a bad image", and the batch must go on.
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "truncated" in msg:
            raise DataError(f"truncated image file ({msg})") from None
        raise DataError(f"corrupt image data ({type(e).__name__}: {msg})") from None
    w, h = img.size
    if w < MIN_SIDE or h < MIN_SIDE:
        raise DataError(f"image too small ({w}x{h} px; need at least {MIN_SIDE}x{MIN_SIDE})")
    if img.mode not in SUPPORTED_MODES:
        raise DataError(f"unsupported image mode {img.mode!r}")
    return img


def collect_images(
    inputs: list[str | os.PathLike], exclude: Path | None = None
) -> tuple[list[Path], list[dict]]:
    """Expand files and folders (recursively, by extension) into a sorted, de-duplicated file list.

    Files named explicitly are taken whatever their extension; missing paths become error entries.
    `exclude` (the output folder) is skipped so a re-run does not predict on its own masks.
    """
    files: list[Path] = []
    errors: list[dict] = []
    seen: set[Path] = set()
    excl = exclude.resolve() if exclude is not None else None

    def add(p: Path) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            files.append(p)

    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.suffix.lower() not in IMAGE_EXTENSIONS or not f.is_file():
                    continue
                if excl is not None and excl in f.resolve().parents:
                    continue
                add(f)
        elif p.exists():
            add(p)
        else:
            errors.append({"file": str(p), "error": "file not found"})
    return files, errors


def _unique_stem(path: Path, used: set[str]) -> str:
    stem, n = path.stem, 2
    while stem in used:  # a/x.png and b/x.jpg must not overwrite each other's masks
        stem, n = f"{path.stem}_{n}", n + 1
    used.add(stem)
    return stem


def _save_png(img: Image.Image, path: Path) -> None:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Software", PNG_SOFTWARE)  # how the output policy recognises our own masks
    with atomic_file(path, "wb") as f:
        img.save(f, format="PNG", pnginfo=info)


def _plan_outputs(
    out_dir: Path, files: list[Path], task: str, inputs: list[Path], overwrite: bool
) -> dict[Path, str]:
    """Each image's output stem, after checking every file predict will write against the output policy.

    Done before any inference, so a refused name leaves nothing written.
    """
    used: set[str] = set()
    stems = {f: _unique_stem(f, used) for f in files}
    targets = [out_dir / "predictions.json"]
    if task != "classification":
        targets += [out_dir / f"{s}_{kind}.png" for s in stems.values() for kind in ("mask", "overlay")]
    for t in targets:
        check_file_target(t, inputs=inputs, overwrite=overwrite)
    return stems


@contextlib.contextmanager
def _staging(out_dir: Path) -> Iterator[Path]:
    """A temp folder beside `out_dir`; its files move into `out_dir` only when every image is done.

    A failure part-way (a full disk, Ctrl-C, SIGTERM) leaves `out_dir` as it was: no partial masks.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(
        tempfile.mkdtemp(prefix=f".{out_dir.name}.{os.getpid()}@", suffix=".tmp", dir=out_dir.parent)
    )
    try:
        yield stage
        if next(stage.iterdir(), None) is None:
            return
        if not out_dir.exists():
            os.chmod(stage, 0o777 & ~_UMASK)
            os.replace(stage, out_dir)
            return
        for f in sorted(stage.iterdir(), key=lambda p: p.name == "predictions.json"):  # summary last
            os.replace(f, out_dir / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def overlay(img: Image.Image, mask: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """The image blended `alpha` with the palette colour of each pixel's class."""
    colours = Image.fromarray(PALETTE[mask])
    return Image.blend(img.convert("RGB"), colours, alpha)


def predict(
    model: str | os.PathLike,
    images: list[str | os.PathLike] | str | os.PathLike,
    out: str | os.PathLike | None = None,
    threads: int | None = None,
    quiet: bool = False,
    *,
    low_memory: bool = False,
    overwrite: bool = False,
    mode: str = "auto",
    tile: int | tuple[int, int] | None = None,
    overlap: float = DEFAULT_OVERLAP,
    tile_batch: int = 4,
) -> dict[str, Any]:
    """Predict every image in `images` (files and/or folders) with an exported ONNX or OpenVINO model.

    With `out`: classification writes out/predictions.json (file -> label, score, top-5); segmentation
    writes out/<stem>_mask.png (class ids, mode L, original size), out/<stem>_overlay.png and
    out/predictions.json (file -> per-class pixel fractions). Returns a JSON-serialisable report:
    {"task", "results": [...], "errors": [{"file", "error"}...], "peak_rss_mb"}.
    `low_memory` trades 25-40% speed for ~40% less peak memory (see OnnxModel). Existing files in
    `out` are replaced only when vitshrink wrote them (or with `overwrite`), never an input image.
    Segmentation `mode`: "auto" (sliding-window tiles when a frame is >= 2x the model input both ways,
    else resize), "tile" (tiles of `tile` px overlapping by `overlap`, `tile_batch` per run) or
    "resize" (the whole frame at the model input). Each result says which ran ("inference") and its
    "latency_ms" (inference and post-processing, not decoding or writing).
    """
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    out_dir = Path(out) if out is not None else None
    # A bad model is fatal (raised before touching any image); bad images are only reported.
    net = open_model(model, threads=threads, low_memory=low_memory)
    files, errors = collect_images(list(images), exclude=out_dir)
    if not files and not errors:
        raise DataError(f"no images found in: {', '.join(str(i) for i in images)}")
    if not quiet:
        for e in errors:
            print(f"skipped {e['file']}: {e['error']}", file=sys.stderr)
    stems: dict[Path, str] = {}
    how = {"mode": mode, "tile": tile, "overlap": overlap, "batch_size": tile_batch}
    with contextlib.ExitStack() as stack:
        stage = None
        if out_dir is not None:
            stems = _plan_outputs(out_dir, files, net.task, [Path(model), *files], overwrite)
            stage = stack.enter_context(_staging(out_dir))
        results = _predict_files(net, files, errors, stems, stage, quiet, how)
        if stage is not None and results:  # nothing predicted: the CLI fails and nothing is written
            _write_summary(stage, model, net.task, results, errors)
    if errors and not quiet:
        print(f"{len(errors)} of {len(results) + len(errors)} inputs skipped", file=sys.stderr)
    return {
        "task": net.task,
        "results": results,
        "errors": errors,
        "peak_rss_mb": None if (rss := peak_rss_mb()) is None else round(rss, 1),
    }


def _predict_files(
    net: DeployModel,
    files: list[Path],
    errors: list[dict],
    stems: dict[Path, str],
    out_dir: Path | None,
    quiet: bool,
    how: dict[str, Any],
) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    for path in files:
        try:
            img = load_image(path)
            t0 = time.perf_counter()
            if net.task == "segmentation":
                res = net.segment(
                    img, how["mode"], tile=how["tile"], overlap=how["overlap"], batch_size=how["batch_size"]
                )
            else:
                (res,) = net.predict([img])
            latency_ms = (time.perf_counter() - t0) * 1000
        except DataError as e:
            errors.append({"file": str(path), "error": str(e)})
            if not quiet:
                print(f"skipped {path}: {e}", file=sys.stderr)
            continue
        entry: dict[str, Any] = {"file": str(path)}
        if net.task == "classification":
            entry.update(res)
            if not quiet:
                print(f"{path}: {res['label']} ({res['score']:.3f})")
        else:
            mask = res["mask"]
            entry["size"] = [img.width, img.height]
            entry["class_fractions"] = res["class_fractions"]
            entry["inference"] = res["inference"]
            if out_dir is not None:
                stem = stems[path]
                mask_path, overlay_path = out_dir / f"{stem}_mask.png", out_dir / f"{stem}_overlay.png"
                _save_png(Image.fromarray(mask), mask_path)
                _save_png(overlay(img, mask), overlay_path)
                entry["mask"], entry["overlay"] = mask_path.name, overlay_path.name
            if not quiet:
                top = ", ".join(f"{k} {v:.0%}" for k, v in list(res["class_fractions"].items())[:3])
                print(f"{path}: {top}")
        entry["latency_ms"] = round(latency_ms, 2)
        results.append(entry)
    return results


def _write_summary(
    out_dir: Path, model: str | os.PathLike, task: str, results: list[dict], errors: list[dict]
) -> None:
    if task == "classification":
        preds = {
            r["file"]: {"label": r["label"], "index": r["index"], "score": r["score"], "top5": r["top5"]}
            for r in results
        }
    else:
        keys = ("mask", "overlay", "size", "class_fractions", "inference", "latency_ms")
        preds = {r["file"]: {k: r[k] for k in keys} for r in results}
    write_json(
        out_dir / "predictions.json",
        {"model": str(model), "task": task, "predictions": preds, "errors": errors},
    )
