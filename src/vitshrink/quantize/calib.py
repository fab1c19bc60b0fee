"""Calibration batches: checked, re-chunked to the model's batch, spilled to disk one .npy a batch."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from ..errors import DataError

CALIB_MAX_SAMPLES = 256  # enough for stable activation ranges
CALIB_BATCH_PIXELS = 16 * 224 * 224  # pixels per calibration batch (see batch_size_for)


class Batches(Sequence[np.ndarray]):
    """Batches spilled to disk, one .npy file each, read back one at a time.

    Calibration inputs and the fp32 reference outputs grow with the number of images and their size
    (256 images at 512 px: 800 MB of inputs); on disk, memory stays that of one batch. Without a
    folder they stay in memory (a plain list), which is what tiny models want.
    """

    def __init__(self, folder: str | os.PathLike | None = None) -> None:
        self._folder = None if folder is None else Path(folder)
        if self._folder is not None:
            self._folder.mkdir(parents=True, exist_ok=True)
        self._items: list[np.ndarray | Path] = []
        self._sizes: list[int] = []

    def append(self, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr)
        if self._folder is None:
            self._items.append(arr)
        else:
            path = self._folder / f"{len(self._items):05d}.npy"
            np.save(path, arr, allow_pickle=False)
            self._items.append(path)
        self._sizes.append(int(arr.shape[0]))

    @property
    def samples(self) -> int:
        return sum(self._sizes)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        item = self._items[i]
        return item if isinstance(item, np.ndarray) else np.load(item, allow_pickle=False)

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))


def batch_size_for(shape: Sequence[int | None]) -> int:
    """Samples per batch: the model's fixed batch, else ~CALIB_BATCH_PIXELS pixels (16 at 224 px, 3 at
    512 px), so that one batch's activations -- what calibration holds at once -- do not grow with
    the image size."""
    if shape[0]:
        return int(shape[0])
    pixels = int(np.prod([d for d in shape[2:] if d])) if len(shape) > 2 else 0
    return max(1, min(16, CALIB_BATCH_PIXELS // pixels)) if pixels else 16


def prepare_calib(
    calib: Iterable[np.ndarray] | None,
    shape: Sequence[int | None],
    spill: str | os.PathLike | None = None,
) -> Batches:
    """Calibration batches (float32, NCHW), re-chunked to the model's batch dim if fixed (else to
    `batch_size_for`), streamed: at most one input batch is in memory at a time when `spill` names a
    folder to keep them in."""
    out = Batches(spill)
    if calib is None:
        return out
    if isinstance(calib, np.ndarray):  # one array is one batch, not an iterable of images
        calib = [calib]
    shape = list(shape)
    pending: list[np.ndarray] = []
    total = 0
    bs = 0
    for i, batch in enumerate(calib):
        arr = np.asarray(batch)
        if arr.ndim == len(shape) - 1:
            arr = arr[None]
        if arr.ndim != len(shape) or not np.issubdtype(arr.dtype, np.number):
            raise DataError(
                f"calibration batch {i} has shape {arr.shape}; expected {len(shape)}-D pixel_values"
            )
        for axis, want in enumerate(shape[1:], start=1):
            if want is not None and arr.shape[axis] != want:
                raise DataError(f"calibration batch {i} has shape {arr.shape}; the model expects {shape}")
        if not np.isfinite(arr).all():
            raise DataError(f"calibration batch {i} contains NaN or inf")
        arr = arr.astype(np.float32, copy=False)[: CALIB_MAX_SAMPLES - total]
        if not bs:
            bs = batch_size_for([shape[0], *arr.shape[1:]])
        pending.append(arr)
        total += arr.shape[0]
        while sum(len(a) for a in pending) >= bs:
            flat = np.concatenate(pending)
            out.append(flat[:bs])
            pending = [flat[bs:]] if len(flat) > bs else []
        if total >= CALIB_MAX_SAMPLES:
            break
    if not total:
        raise DataError("calibration data is empty")
    rest = sum(len(a) for a in pending)
    if shape[0] and not len(out):  # fixed batch size: whole batches only
        raise DataError(f"the model takes batches of {shape[0]}; got only {rest} calibration samples")
    if rest and not shape[0]:
        out.append(np.concatenate(pending))
    return out
