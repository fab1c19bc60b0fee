"""Hugging Face `datasets` as a data SPEC: a `save_to_disk` folder, a parquet file or folder of parquet
files, or a Hub dataset id (through the Hub cache; offline once cached, like model ids).

Rows are read from the Arrow files (memory-mapped by `datasets`) and decoded one at a time in the
loader's workers: the image column is cast to undecoded bytes so Pillow (and its JPEG draft mode)
does the decoding. Columns are found by their usual names or set with
``--data-opt image_column=...,label_column=...`` (segmentation: ``mask_column=...``); class names come
from a ``ClassLabel`` feature.

Splits: ``val`` is the dataset's ``validation`` / ``valid`` / ``val`` / ``dev`` split; splits the
dataset lacks are carved from its ``train`` split by a hash of the row number (80 / 10 / 10, the rule
folders use), and ``train`` then keeps only its own share.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import re
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import DataError
from .folders import split_of
from .stream import Index, Reader, cached_index, open_image

IMAGE_COLUMNS = ("image", "img", "pixel_values", "picture", "photo")
LABEL_COLUMNS = ("label", "labels", "fine_label", "class", "category", "target")
MASK_COLUMNS = ("annotation", "mask", "label", "segmentation", "semantic_segmentation", "seg_map", "gt")
SPLIT_NAMES = {"train": ("train",), "val": ("validation", "valid", "val", "dev"), "test": ("test",)}
HUB_DATASET = re.compile(r"^(hf://datasets/)?[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
OPTIONS = ("image_column", "label_column", "mask_column")


def is_hf_spec(spec: str) -> bool:
    """A `datasets` source: save_to_disk folder, parquet file/folder, or (not a local path) a Hub id."""
    p = Path(spec).expanduser()
    if p.is_file():
        return p.suffix == ".parquet"
    if p.is_dir():
        return (
            (p / "dataset_dict.json").exists()
            or (p / "dataset_info.json").exists()
            or (p / "state.json").exists()
            or any(p.glob("*.parquet"))
            or any(p.glob("*/*.parquet"))
        )
    return HUB_DATASET.match(spec) is not None and ".." not in spec


class RowReader(Reader):
    """Opens image / mask cells of a `datasets` table by row number."""

    def __init__(self, table: Any, image_column: str, mask_column: str | None, name: str) -> None:
        self.table, self.image_column, self.mask_column, self.name = table, image_column, mask_column, name

    def _cell(self, row: int, column: str) -> tuple[Image.Image, str]:
        name = f"{self.name}[{row}].{column}"
        v = self.table[int(row)][column]
        if isinstance(v, Image.Image):
            return v, name
        if isinstance(v, dict) and v.get("bytes"):
            return open_image(io.BytesIO(v["bytes"]), name, load=False), name
        if isinstance(v, dict) and v.get("path"):
            return open_image(Path(v["path"]), name, load=False), name
        raise DataError(f"{name} holds no image")

    def open(self, ref: Any) -> tuple[Image.Image, str]:
        return self._cell(ref, self.image_column)

    def open_mask(self, ref: Any) -> tuple[Image.Image, str]:
        assert self.mask_column is not None
        return self._cell(ref, self.mask_column)


@functools.lru_cache(maxsize=4)
def load_splits(spec: str) -> Any:
    """The `datasets` DatasetDict (or Dataset) behind a SPEC; one-line errors for what cannot be read."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - a core dependency
        raise DataError(f"{spec} needs the 'datasets' package (pip install datasets)") from None
    datasets.disable_progress_bars()
    p = Path(spec).expanduser()
    try:
        if p.is_file():
            return datasets.load_dataset("parquet", data_files=str(p))
        if p.is_dir() and ((p / "dataset_dict.json").exists() or (p / "state.json").exists()):
            return datasets.load_from_disk(str(p))
        if p.is_dir():
            return datasets.load_dataset(str(p))
        return datasets.load_dataset(spec.removeprefix("hf://datasets/"))
    except FileNotFoundError as e:
        raise DataError(f"data not found: {spec} ({str(e).splitlines()[0][:200]})") from None
    except (ConnectionError, OSError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE", os.environ.get("HF_DATASETS_OFFLINE", "")).lower()
        why = "offline" if offline in ("1", "true", "yes", "on") else "the Hub could not be reached"
        raise DataError(
            f"data not found: '{spec}' is neither a built-in dataset, a folder, nor a dataset in the "
            f"Hugging Face cache, and {why} ({str(e).splitlines()[0][:160]})"
        ) from None
    except Exception as e:  # datasets raises many types (DatasetNotFoundError, ValueError, ArrowInvalid)
        raise DataError(
            f"cannot read {spec} as a Hugging Face dataset: {str(e).splitlines()[0][:200]}"
        ) from None


def _pick(
    columns: dict[str, Any], wanted: tuple[str, ...], kind: Any, exclude: str | None = None
) -> str | None:
    for c in wanted:
        if c in columns and c != exclude and (kind is None or isinstance(columns[c], kind)):
            return c
    if kind is not None:
        for c, f in columns.items():
            if c != exclude and isinstance(f, kind):
                return c
    return None


def _columns(spec: str, feats: Any, options: dict[str, Any]) -> tuple[str, str | None, str | None]:
    """(image, mask, label) column names: given in `options`, else by usual name or feature type."""
    import datasets

    img_col = options.get("image_column") or _pick(feats, IMAGE_COLUMNS, datasets.Image)
    if img_col is None or img_col not in feats:
        raise DataError(
            f"{spec}: no image column (columns {list(feats)}); name it with --data-opt image_column=..."
        )
    mask_col = options.get("mask_column") or _pick(feats, MASK_COLUMNS, datasets.Image, exclude=img_col)
    label_col = None
    if mask_col is None or (options.get("label_column") and not options.get("mask_column")):
        mask_col = None
        label_col = options.get("label_column") or _pick(feats, LABEL_COLUMNS, datasets.ClassLabel)
        label_col = label_col or _pick(feats, LABEL_COLUMNS, None)
        if label_col is None or label_col not in feats:
            raise DataError(
                f"{spec}: no label or mask column (columns {list(feats)}); "
                "name it with --data-opt label_column=... or mask_column=..."
            )
    if mask_col is not None and mask_col not in feats:
        raise DataError(f"{spec}: no column {mask_col!r} (columns {list(feats)})")
    return img_col, mask_col, label_col


def hf_index(spec: str, split: str, options: dict[str, Any]) -> tuple[Index, Reader]:
    """Index and row reader of one split of a `datasets` SPEC."""
    import datasets

    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise DataError(
            f"unknown data option(s) {sorted(unknown)} for {spec} (allowed: {', '.join(OPTIONS)})"
        )
    dd = load_splits(spec)
    tables = dict(dd) if isinstance(dd, datasets.DatasetDict) else {"train": dd}
    have = {s: next((n for n in names if n in tables), None) for s, names in SPLIT_NAMES.items()}
    if have["train"] is None:
        if len(tables) != 1:
            raise DataError(f"{spec} has splits {sorted(tables)} but none named train")
        have["train"] = next(iter(tables))
    own = have[split]
    table = tables[own or have["train"]]
    feats = table.features
    img_col, mask_col, label_col = _columns(spec, feats, options)
    for c in (img_col, mask_col):
        if c is not None and isinstance(feats[c], datasets.Image):
            table = table.cast_column(c, datasets.Image(decode=False))
    # rows of this split: its own table, else the hash share of train that the folders rule gives
    if split == "train":
        rows = [i for i in range(len(table)) if _kept_by_train(i, have)]
    elif own is not None:
        rows = list(range(len(table)))
    else:
        rows = [i for i in range(len(table)) if split_of(str(i)) == split]
    if not rows:
        raise DataError(f"no rows for split '{split}' in {spec}")
    name = f"{spec}:{own or have['train']}"
    fp = getattr(table, "_fingerprint", None) or str(len(table))
    train_table = tables[have["train"]]
    train_fp = getattr(train_table, "_fingerprint", None) or str(len(train_table))
    ident = (
        f"{Path(spec).expanduser().resolve()}|{own}|{split}|{fp}|{train_fp}|{img_col}|{mask_col}|{label_col}"
    )
    key = "hf-" + hashlib.sha1(ident.encode()).hexdigest()[:20]

    def build() -> Index:
        reader = RowReader(table, img_col, mask_col, name)
        first, _ = reader.open(rows[0])
        mode = "L" if first.mode in ("L", "1", "I;16", "I", "F") else "RGB"
        if mask_col is None:
            feat = feats[label_col]
            labels = list(table[label_col])
            if isinstance(feat, datasets.ClassLabel):
                names = list(feat.names)
            else:  # plain ints or strings: names from the values seen in the whole table
                values = sorted({str(v) for v in labels}) if isinstance(labels[0], str) else None
                names = values or [f"class_{i}" for i in range(int(max(labels)) + 1)]
                if values:
                    labels = [values.index(str(v)) for v in labels]
            return Index(
                task="classification",
                class_names=names,
                images=rows,
                targets=[int(labels[i]) for i in rows],
                sizes=[None] * len(rows),
                mode=mode,
                source=name,
            )
        from .stream import mask_array

        # the class count from every mask of the train table, so all splits agree on it
        scan = RowReader(
            train_table.cast_column(mask_col, datasets.Image(decode=False)), img_col, mask_col, name
        )
        max_id = -1
        for r in range(len(train_table)):
            m, mname = scan.open_mask(r)
            a = mask_array(m, mname)
            valid = a[a != 255]
            max_id = max(max_id, int(valid.max()) if valid.size else -1)
        return Index(
            task="segmentation",
            class_names=[f"class_{i}" for i in range(max(max_id, 0) + 1)],
            images=rows,
            targets=rows,
            sizes=[None] * len(rows),
            mode=mode,
            source=name,
            max_id=max_id,
        )

    index = cached_index(key, build)
    return index, RowReader(table, img_col, mask_col, name)


def _kept_by_train(row: int, have: dict[str, str | None]) -> bool:
    """Does the train split keep `row`? Not when a split the dataset lacks takes it by hash."""
    s = split_of(str(row))
    return s == "train" or have.get(s) is not None
