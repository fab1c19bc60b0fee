"""Datasets: a SPEC names a built-in set, a folder or a Hugging Face `datasets` source; every split
loads into a data set that yields batches (`ds.batches(...)`) to every stage the same way.

SPECs
- ``fashion-mnist``: the Debian package ``dataset-fashion-mnist`` IDX files
  (``/usr/share/datasets/fashion-mnist``), or a folder holding the same four ``*-ubyte.gz`` files.
  Splits: ``train`` = first 55,000 training images, ``val`` = last 5,000 training images,
  ``test`` = the official 10,000 test images.
- ``aerial``: the generated UAV disaster-scene segmentation set (`vitshrink.data.aerial`), cached on
  disk. Options (Python API / recipe): ``size`` (default 128), ``n_train`` (800), ``n_val``/``n_test``
  (100), ``seed`` (0). Splits come from disjoint seeds.
- a folder, classification: ``<root>/<class>/*.jpg`` (or ``<root>/{train,val,test}/<class>/...``).
- a folder, segmentation: ``<root>/images/*.jpg`` + ``<root>/masks/*.png`` with the same stems, masks
  holding class ids and 255 = ignore (or ``<root>/{train,val,test}/{images,masks}``); optional
  ``<root>/classes.json`` lists the class names.
- Hugging Face `datasets`: a ``save_to_disk`` folder, a parquet file or folder, a Hub dataset id
  (`data.hf`).
- Folders without split sub-folders are split deterministically by a hash of each file name:
  80 % train, 10 % val, 10 % test (stable when files are added).

The two built-in sets are held in memory (uint8 tensors, `data.memory`); folders and `datasets`
sources are streamed: an index built once, photos of any size decoded per sample in worker processes
with the model's size policy (`data.stream`), so memory does not grow with the number of photos.
Data options common to streamed sets: ``workers``, ``skip_bad``, ``decoded_cache``, ``train_scale``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError
from ..labels import IGNORE_INDEX
from .builtin import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, has_idx_files, load_aerial, load_fashion_mnist
from .folders import IMAGE_EXTS, fingerprint, folder_index
from .memory import (
    AugParams,
    Batch,
    VisionDataset,
    apply_augment,
    augment,
    conform,
    normalize,
    resize_images,
    resize_masks,
    sample_augment,
)
from .stream import StreamingDataset, StreamOptions, default_workers

SPLITS = ("train", "val", "test")

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "IGNORE_INDEX",
    "IMAGE_EXTS",
    "SPLITS",
    "AugParams",
    "Batch",
    "StreamingDataset",
    "VisionDataset",
    "align_classes",
    "apply_augment",
    "augment",
    "default_workers",
    "describe",
    "default_input_size",
    "fingerprint",
    "head",
    "load_dataset",
    "normalize",
    "resize_images",
    "resize_masks",
    "sample_augment",
    "training_view",
]

_GENERIC_NAME = re.compile(r"^(class|label)[_ -]?\d+$", re.IGNORECASE)


def _name_key(name: str) -> str:
    # "T-shirt/top" cannot be a folder name; "T-shirt_top" or "tshirt top" is the same class
    return re.sub(r"[^0-9a-z]", "", name.lower())


def align_classes(ds: Any, names: list[str], *, model: str) -> Any:
    """`ds` with its targets renumbered to the model's class order (matched by name).

    A class-folder tree numbers its classes alphabetically; a model has its own id2label. Matching by
    name keeps output index i meaning the same class everywhere; names that do not match are an error.
    Index-only names (class_0, LABEL_1: no names known) are matched by position.
    """
    names = list(names)
    if len(names) != ds.num_classes:
        raise DataError(f"{model} has {len(names)} classes but data {ds.source} has {ds.num_classes}")
    if [_name_key(n) for n in names] == [_name_key(n) for n in ds.class_names]:
        return ds
    if all(_GENERIC_NAME.match(n) for n in names) or all(_GENERIC_NAME.match(n) for n in ds.class_names):
        return ds
    index = {_name_key(n): i for i, n in enumerate(names)}
    unknown = [n for n in ds.class_names if _name_key(n) not in index]
    if unknown or len(index) != len(names):
        missing = [n for n in names if _name_key(n) not in {_name_key(c) for c in ds.class_names}]
        raise DataError(
            f"class names of {model} do not match data {ds.source}: data has {unknown[:3]} that the model "
            f"lacks, model has {missing[:3]} that the data lacks"
        )
    perm = torch.tensor([index[_name_key(n)] for n in ds.class_names], dtype=torch.long)
    return ds.relabel(perm, names)


def load_dataset(
    spec: str | os.PathLike,
    split: str = "train",
    *,
    size: int | tuple[int, int] | list[int] | None = None,
    channels: int | None = None,
    limit: int | None = None,
    seed: int = 0,
    data_options: dict[str, Any] | None = None,
    shortest_edge: int | None = None,
    **options: Any,
) -> VisionDataset | StreamingDataset:
    """Load one split of a data SPEC, with batches at `size` and `channels` when given.

    `limit` keeps a deterministic random subset of that many samples. `data_options` (or extra
    keywords) configure the source, e.g. ``{"size": 256, "n_train": 400}`` for ``aerial`` (there
    `size` is the generated resolution, distinct from the `size` keyword that sets the batches'),
    ``{"image_column": "img"}`` for a `datasets` source, ``{"skip_bad": True}`` for a photo folder.
    Built-in sets come back in memory, resized; photo sets come back streamed (`StreamingDataset`)
    and are resized per sample by the size policy (`data.stream`); `shortest_edge` is a centre-crop
    image processor's resize for classification eval.
    """
    options = {**(data_options or {}), **options}
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}' (choose from {', '.join(SPLITS)})")
    spec_s = str(spec)
    if spec_s == "fashion-mnist":
        ds: Any = load_fashion_mnist(FASHION_MNIST_DIR, split)
    elif spec_s == "aerial":
        ds = load_aerial(split, **options)
    else:
        path = Path(spec_s).expanduser()
        if path.is_dir() and has_idx_files(path):
            ds = load_fashion_mnist(path, split)
        else:
            ds = _load_streamed(spec_s, path, split, options, size, channels, shortest_edge)
            return ds.subset(limit, seed=seed)
    ds = ds.subset(limit, seed=seed)
    return conform(ds, size=size, channels=channels)


def _load_streamed(
    spec: str,
    path: Path,
    split: str,
    options: dict[str, Any],
    size: Any,
    channels: int | None,
    shortest_edge: int | None,
) -> StreamingDataset:
    from . import hf
    from .memory import size_pair

    stream_opts = StreamOptions.parse(options)
    source_opts = {k: v for k, v in options.items() if k not in StreamOptions.KEYS}
    if hf.is_hf_spec(spec):
        index, reader = hf.hf_index(spec, split, source_opts)
        ds = StreamingDataset(index, size=(1, 1), channels=1, reader=reader, options=stream_opts)
    elif not path.exists():
        raise DataError(
            f"data not found: '{spec}' is neither a built-in dataset (fashion-mnist, aerial), a folder, "
            "nor a Hugging Face dataset"
        )
    elif not path.is_dir():
        raise DataError(f"data must be a folder, a parquet file or a built-in name, got a file: {path}")
    else:
        if source_opts:
            raise DataError(
                f"unknown data option(s) {sorted(source_opts)} for folder {path} "
                f"(allowed: {', '.join(StreamOptions.KEYS)})"
            )
        ds = StreamingDataset(folder_index(path, split), size=(1, 1), channels=1, options=stream_opts)
    if ds.task == "segmentation" and ds.num_classes > IGNORE_INDEX:
        # masks are uint8 class ids with 255 = ignore: a 256th class would collide with it
        raise DataError(
            f"{ds.source} has {ds.num_classes} classes; segmentation supports at most {IGNORE_INDEX} "
            f"(ids 0..{IGNORE_INDEX - 1}, {IGNORE_INDEX} = ignore)"
        )
    native = _common_size(ds)
    d = default_input_size(ds.task, native)
    hw = size_pair(size) if size is not None else (d, d)
    native_ch = 1 if ds.index.mode == "L" else 3
    ch = channels or native_ch
    if ch not in (1, 3):  # photos decode as grey or RGB
        raise DataError(f"cannot convert {native_ch}-channel images from {ds.source} to {ch} channels")
    ds.size, ds.channels, ds.shortest_edge = hw, ch, shortest_edge
    ds.info["native_size"] = list(native)
    return ds


def _common_size(ds: StreamingDataset) -> tuple[int, int]:
    """The most common photo size (h, w) of a set (its first photo's where sizes are not indexed)."""
    from collections import Counter

    sizes = [s for s in ds.index.sizes if s]
    if sizes:
        return Counter(sizes).most_common(1)[0][0]
    img, _ = ds.reader.open(ds.index.images[0])
    return img.height, img.width


def describe(spec: str | os.PathLike, data_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Task, classes, channels and native size (the most common photo size) of a SPEC."""
    ds = load_dataset(spec, "val", limit=8, data_options=data_options)
    if isinstance(ds, StreamingDataset):
        mixed = len({s for s in ds.index.sizes if s}) > 1
        return {
            "task": ds.task,
            "class_names": ds.class_names,
            "channels": ds.channels,
            "size": list(ds.size),
            "native_size": ds.info["native_size"],
            "mixed_sizes": mixed,
            "source": ds.source,
        }
    return {
        "task": ds.task,
        "class_names": ds.class_names,
        "channels": ds.channels,
        "size": list(ds.size),
        "mixed_sizes": False,
        "source": ds.source,
    }


def head(ds: Any, n: int) -> tuple[torch.Tensor, Any]:
    """The first `n` samples at the model input size (channel statistics, calibration, a first batch)."""
    return ds.take(range(min(n, len(ds))), view="fixed")


def default_input_size(task: str, native: tuple[int, int] | list[int]) -> int:
    """A preset's input size for photos of `native` size: the photos' own up to 224 (classification)
    or 512 (segmentation) pixels, larger photos are scaled down to that (a multiple of 32)."""
    cap = 224 if task == "classification" else 512
    side = min(int(native[0]), int(native[1]))
    return side if side <= cap else cap


def training_view(ds: Any, *, need_index: bool = False, quiet: bool = True) -> Any:
    """The set a training loop reads: streamed as is, or its decoded cache (memory-mapped, at the
    training size) when the user asked for it (``decoded_cache``) or the caller needs batch-level
    augmentation (`need_index`: cached teacher logits follow it)."""
    if isinstance(ds, StreamingDataset) and (need_index or ds.options.decoded_cache):
        return ds.materialize(quiet=quiet)
    return ds
