"""Image folders as indexes: ``<root>/<class>/*.jpg`` (classification) or ``<root>/images`` +
``<root>/masks`` (segmentation), optionally under ``train/ val/ test/``.

Indexing reads file headers only (sizes, colour mode); masks are decoded once when no
``classes.json`` names the classes (the largest id gives the class count). The index is cached by the
folder's fingerprint (every file's path, size and mtime), so a second run starts at once.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..labels import IGNORE_INDEX
from .stream import Index, cached_index, mask_array, open_image

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
GREY_MODES = ("L", "1", "I;16", "I", "F")


def split_of(name: str) -> str:
    """80 / 10 / 10 train / val / test by a hash of the name: stable when files are added."""
    h = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) % 10
    return "train" if h < 8 else ("val" if h == 8 else "test")


def fingerprint(spec: str | os.PathLike) -> str:
    """A cheap content key for a data folder: every file's relative path, size and mtime (no reads).

    Cache keys include it so a stage trained on a folder is not reused after the folder changed.
    Named datasets (fashion-mnist, aerial) and missing paths give "" (their content is fixed by name).
    """
    root = Path(spec)
    if not root.is_dir():
        return ""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        # hidden folders and vitshrink's own outputs (a run dir inside the data root changes every stage)
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and not is_output_dir(Path(dirpath) / d)
        )
        for f in sorted(filenames):
            p = Path(dirpath) / f
            try:
                st = p.stat()
            except OSError:
                continue
            h.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def folder_index(root: Path, split: str) -> Index:
    """The index of one split of a data folder (cached by fingerprint)."""
    has_splits = all((root / s).is_dir() for s in ("train", "val"))
    base = root / split if has_splits else root
    if has_splits and not base.is_dir():
        raise DataError(f"missing split folder {base}")
    key = hashlib.sha1(f"{root.resolve()}|{split}|{fingerprint(root)}".encode()).hexdigest()[:20]
    if (base / "images").is_dir() or (base / "masks").is_dir():
        names_file = root / "classes.json"
        names = read_class_names(names_file) if names_file.exists() else None
        return cached_index(
            f"seg-{key}", lambda: segmentation_index(base, names, split=None if has_splits else split)
        )
    train_classes = class_folders(root / "train") if has_splits and split != "train" else None
    return cached_index(
        f"cls-{key}",
        lambda: classification_index(base, split=None if has_splits else split, classes=train_classes),
    )


def read_class_names(path: Path) -> list[str]:
    try:
        names = json.loads(path.read_text())
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError("expected a JSON list of strings")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate class name(s) {dup[:3]}")
        if len(names) < 2:
            raise ValueError("needs at least two classes")
        return names
    except (OSError, ValueError) as e:
        raise DataError(f"bad class list {path}: {e}") from None


def is_output_dir(d: Path) -> bool:
    """A folder vitshrink wrote (a model saved inside the data root, its checkpoint): never a class."""
    return d.name.endswith(".ckpt") or any(
        (d / m).is_file() for m in ("vitshrink.json", "trainer_state.pt", "predictions.json", "state.json")
    )


def class_folders(root: Path) -> list[str]:
    return sorted(
        d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and not is_output_dir(d)
    )


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def _header(path: Path) -> tuple[tuple[int, int], str]:
    with open_image(path, load=False) as img:
        return (img.height, img.width), img.mode


def _headers(paths: list[Path]) -> list[tuple[tuple[int, int], str]]:
    # Pillow reads headers with the GIL released for I/O: threads overlap the file system's latency.
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(_header, paths))


def classification_index(root: Path, split: str | None, classes: list[str] | None = None) -> Index:
    found = class_folders(root)
    if not found:
        raise DataError(f"no class sub-folders in {root} (expected <root>/<class>/*.png or images/ + masks/)")
    if classes is None:
        classes = found
    else:  # a val/test split numbers its classes like train does, and may not add any
        extra = [c for c in found if c not in classes]
        if extra:
            raise DataError(f"class folder {root / extra[0]} has no counterpart in the train split")
    if len(classes) < 2:
        raise DataError(f"only one class folder in {root} ({classes[0]}): a classifier needs at least two")
    paths, labels = [], []
    for ci, c in enumerate(classes):
        if not (root / c).is_dir():
            continue
        for p in image_files(root / c):
            if split is None or split_of(f"{c}/{p.name}") == split:
                paths.append(p)
                labels.append(ci)
    if not paths:
        raise DataError(f"no images for split '{split}' in {root}")
    heads = _headers(paths)
    return Index(
        task="classification",
        class_names=list(classes),
        images=[str(p) for p in paths],
        targets=labels,
        sizes=[h for h, _ in heads],
        mode="L" if heads[0][1] in GREY_MODES else "RGB",
        source=f"{root}:{split or ''}",
    )


def segmentation_index(root: Path, class_names: list[str] | None, split: str | None = None) -> Index:
    img_dir, mask_dir = root / "images", root / "masks"
    for d in (img_dir, mask_dir):
        if not d.is_dir():
            raise DataError(f"missing folder {d} (segmentation data needs images/ and masks/)")
    images = [p for p in image_files(img_dir) if split is None or split_of(p.stem) == split]
    if not images:
        raise DataError(f"no images in {img_dir}" + (f" for split '{split}'" if split else ""))
    masks = {p.stem: p for p in image_files(mask_dir)}
    pairs = []
    for p in images:
        m = masks.get(p.stem)
        if m is None:
            raise DataError(f"no mask for image {p} (expected {mask_dir}/{p.stem}.png)")
        pairs.append((p, m))
    if class_names is None and (root / "classes.json").exists():
        class_names = read_class_names(root / "classes.json")
    img_heads = _headers([p for p, _ in pairs])
    mask_heads = _headers([m for _, m in pairs])
    for (p, m), (ih, _), (mh, mmode) in zip(pairs, img_heads, mask_heads):
        if ih != mh:
            raise DataError(f"mask {m} is {mh[1]}x{mh[0]} but image {p} is {ih[1]}x{ih[0]}")
        if mmode not in ("L", "P", "1", "I", "I;16"):
            raise DataError(f"mask {m} must be a single-channel PNG of class ids (got mode {mmode})")
    max_id = None
    if class_names is None:  # the class count comes from the masks: read each once (then cached)
        with ThreadPoolExecutor(max_workers=4) as pool:
            ids = list(pool.map(_max_id, [m for _, m in pairs]))
        max_id = max(ids)
        if max_id >= IGNORE_INDEX:  # would wrap around in the uint8 masks
            m = pairs[ids.index(max_id)][1]
            raise DataError(
                f"mask {m} has class id {max_id}; ids must be below {IGNORE_INDEX} (255 = ignore)"
            )
        class_names = [f"class_{i}" for i in range(max(max_id, 0) + 1)]
    return Index(
        task="segmentation",
        class_names=list(class_names),
        images=[str(p) for p, _ in pairs],
        targets=[str(m) for _, m in pairs],
        sizes=[h for h, _ in img_heads],
        mode="L" if img_heads[0][1] in ("L", "1") else "RGB",
        source=f"{root}:{split or ''}",
        max_id=max_id,
    )


def _max_id(path: Path) -> int:
    with open_image(path) as img:
        a = mask_array(img, str(path)).astype(np.int64)
    valid = a[a != IGNORE_INDEX]
    return int(valid.max()) if valid.size else -1
