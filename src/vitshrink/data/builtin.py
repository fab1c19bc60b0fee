"""The built-in sets, small enough to hold in memory: Fashion-MNIST (IDX files of the Debian package
``dataset-fashion-mnist``) and the generated aerial segmentation set (`data.aerial`)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from .memory import VisionDataset

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)


def has_idx_files(path: Path) -> bool:
    return (path / "train-images-idx3-ubyte.gz").exists() or (path / "train-images-idx3-ubyte").exists()


def _read_idx(path: Path) -> np.ndarray:
    """IDX (the MNIST file format): big-endian magic, dims, then raw uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
        if zero != 0 or dtype != 0x08:
            raise ValueError("bad magic")
        dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
        data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        return data.reshape(dims)
    except FileNotFoundError:
        raise DataError(
            f"missing IDX file {path} (install the Debian package dataset-fashion-mnist)"
        ) from None
    except (OSError, ValueError, EOFError, struct.error) as e:
        raise DataError(f"corrupt IDX file {path}: {e}") from None


def _idx_path(root: Path, stem: str) -> Path:
    gz = root / f"{stem}.gz"
    return gz if gz.exists() or not (root / stem).exists() else root / stem


_FMNIST_CACHE: dict[tuple[str, str], VisionDataset] = {}


def load_fashion_mnist(root: Path, split: str) -> VisionDataset:
    key = (str(root), split)
    if key in _FMNIST_CACHE:
        return _FMNIST_CACHE[key]
    if not root.exists():
        raise DataError(
            f"Fashion-MNIST not found at {root}: install the Debian package dataset-fashion-mnist "
            "(make install does) or pass its folder"
        )
    prefix = "t10k" if split == "test" else "train"
    x = _read_idx(_idx_path(root, f"{prefix}-images-idx3-ubyte"))
    y = _read_idx(_idx_path(root, f"{prefix}-labels-idx1-ubyte"))
    if len(x) != len(y):
        raise DataError(f"Fashion-MNIST images/labels count mismatch in {root} ({len(x)} vs {len(y)})")
    if split != "test":
        cut = len(x) - 5000
        x, y = (x[:cut], y[:cut]) if split == "train" else (x[cut:], y[cut:])
    images = torch.from_numpy(np.array(x))[:, None]  # a writable copy of the read-only buffer
    targets = torch.from_numpy(np.array(y, dtype=np.int64))
    ds = VisionDataset(
        images, targets, "classification", list(FASHION_MNIST_CLASSES), f"fashion-mnist:{split}"
    )
    _FMNIST_CACHE[key] = ds
    return ds


def load_aerial(split: str, **options: Any) -> VisionDataset:
    from . import aerial
    from .folders import segmentation_index
    from .stream import StreamingDataset

    cache = options.pop("cache_dir", None)
    allowed = {"size", "n_train", "n_val", "n_test", "seed"}
    unknown = set(options) - allowed
    if unknown:
        raise DataError(
            f"unknown aerial dataset option(s): {', '.join(sorted(unknown))} (allowed: {', '.join(sorted(allowed))})"
        )
    paths = aerial.ensure(cache, quiet=True, **options)
    index = segmentation_index(paths[split], list(aerial.CLASSES))
    h, w = index.sizes[0]  # type: ignore[misc]
    ds = StreamingDataset(index, size=(h, w), channels=3)
    images, masks = ds.take(range(len(ds)))
    return VisionDataset(images, masks, "segmentation", list(aerial.CLASSES), f"aerial:{split}")
