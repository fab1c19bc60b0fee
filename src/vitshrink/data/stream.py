"""Photo sets of any size and number, streamed: an index of the samples (built once, cached by the
data's fingerprint) and a Dataset that decodes one sample at a time in DataLoader worker processes.

Peak memory is a few batches of decoded pixels whatever the number of photos: nothing holds a split.

The size policy follows the model's image processor and mmsegmentation's pipelines:
- train: random rescale (segmentation 0.5-2.0x, classification 1.0-1.25x of the eval scale), random
  crop to the model's input size (padded with 0 / the ignore index when the rescaled photo is
  smaller; the mask cut with the same box, nearest), horizontal flip;
- eval, classification: the processor's resize (to the input size, or shortest edge then centre crop
  when the processor says so);
- eval, segmentation: the mask at the photo's own resolution; the image resized to the model input,
  or kept whole for sliding-window inference when `predict` would tile it (the photo at least 2x the
  input both ways), so mIoU is measured on the masks the user gave, the way the model is deployed.
Large JPEGs are decoded with Pillow's `draft()` (DCT scaling by 1/2, 1/4, 1/8) where the view is
that much smaller than the photo; only the crop box is resampled.

Why by hand: torchvision (whose transforms do this) has no CPU build here, and the per-sample
random rescale + crop must keep the mask aligned and cut the photo before resampling it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..artifacts import cache_root
from ..errors import DataError
from ..labels import IGNORE_INDEX
from ..tile_rule import should_tile
from .memory import Batch, VisionDataset, remap_targets

INDEX_VERSION = 1
# Random rescale ranges of the training view (relative to the eval scale): mmsegmentation's 0.5-2.0
# for segmentation; classification gets a mild zoom-in only (ViTs on short CPU schedules lose
# accuracy under strong geometric augmentation, see memory.augment).
TRAIN_SCALE = {"segmentation": (0.5, 2.0), "classification": (1.0, 1.25)}


def default_workers(n_samples: int | None = None, batch_size: int | None = None) -> int:
    """Decoding workers: all CPUs but one for the training process (at most 8), none for one batch."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    if n_samples is not None and batch_size is not None and n_samples <= batch_size:
        return 0
    return max(0, min(8, cpus - 1))


# ------------------------------------------------------------------------------------------ index


@dataclass
class Index:
    """What a split holds, without pixels: one reference per image (a path, or a row of a `datasets`
    table), one target per image (class id, or a mask reference), and the image sizes (h, w)."""

    task: str
    class_names: list[str]
    images: list[Any]
    targets: list[Any]
    sizes: list[tuple[int, int] | None]
    mode: str  # "L" or "RGB": the photos' colour mode
    source: str
    max_id: int | None = None  # segmentation: the largest class id seen in the masks (when scanned)
    key: str = ""  # its cache key, which holds the data's fingerprint (names the decoded cache too)

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["version"] = INDEX_VERSION
        return d

    @staticmethod
    def from_json(d: dict[str, Any]) -> Index:
        d = {k: v for k, v in d.items() if k != "version"}
        d["sizes"] = [tuple(s) if s else None for s in d["sizes"]]
        return Index(**d)


def cached_index(key: str, build: Callable[[], Index]) -> Index:
    """The index stored under `key` (which includes the data's fingerprint), else built and stored."""
    path = cache_root() / "index" / f"{key}.json"
    try:
        d = json.loads(path.read_text())
        if d.get("version") == INDEX_VERSION:
            return replace(Index.from_json(d), key=key)
    except (OSError, ValueError, TypeError):
        pass
    index = replace(build(), key=key)
    try:
        from ..artifacts import atomic_file

        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, "w") as f:
            json.dump(index.to_json(), f)
    except OSError:  # a read-only cache only costs the rebuild next time
        pass
    return index


class Reader:
    """Opens what an index refers to. Folders: paths; `data.hf` subclasses it for dataset rows."""

    def open(self, ref: Any) -> tuple[Image.Image, str]:
        """(lazy PIL image, a name for messages)."""
        return open_image(Path(ref), load=False), str(ref)

    def open_mask(self, ref: Any) -> tuple[Image.Image, str]:
        return self.open(ref)


def open_image(path: Path | io.BytesIO, name: str | None = None, *, load: bool = True) -> Image.Image:
    """A PIL image (header only unless `load`); unreadable files raise one-line DataErrors."""
    try:
        img = Image.open(path)
        if load:
            img.load()
        return img
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"corrupt or unreadable image {name or path}: {str(e).splitlines()[0]}") from None


def mask_array(img: Image.Image, name: str) -> np.ndarray:
    """A mask image as an integer array of class ids (uint8, or int32 for 16/32-bit masks)."""
    if img.mode not in ("L", "P", "1", "I", "I;16"):
        raise DataError(f"mask {name} must be a single-channel PNG of class ids (got mode {img.mode})")
    try:
        if img.mode in ("L", "P"):
            return np.asarray(img, dtype=np.uint8)
        return np.asarray(img.convert("I"), dtype=np.int32)
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"corrupt or unreadable mask {name}: {str(e).splitlines()[0]}") from None


# --------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class StreamOptions:
    """Per-set loading choices (`--data-opt key=value`)."""

    workers: int | None = None  # None: default_workers()
    skip_bad: bool = False  # skip corrupt photos/masks (counted) instead of stopping
    decoded_cache: bool = False  # train from a memory-mapped uint8 copy at the training size
    train_scale: tuple[float, float] | None = None  # random rescale range; None: TRAIN_SCALE[task]

    KEYS = ("workers", "skip_bad", "decoded_cache", "train_scale")

    @staticmethod
    def parse(opts: dict[str, Any]) -> StreamOptions:
        def flag(v: Any) -> bool:
            if isinstance(v, bool):
                return v
            s = str(v).lower()
            if s not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise DataError(f"expected true or false, got {v!r}")
            return s in ("1", "true", "yes", "on")

        out: dict[str, Any] = {}
        try:
            if "workers" in opts:
                out["workers"] = int(opts["workers"])
                if out["workers"] < 0:
                    raise ValueError
            for k in ("skip_bad", "decoded_cache"):
                if k in opts:
                    out[k] = flag(opts[k])
            if "train_scale" in opts:
                v = opts["train_scale"]
                lo, hi = (float(x) for x in (v if isinstance(v, list | tuple) else str(v).split("-")))
                if not 0 < lo <= hi:
                    raise ValueError
                out["train_scale"] = (lo, hi)
        except (TypeError, ValueError):
            raise DataError(
                "bad data option: workers is a count >= 0, skip_bad / decoded_cache are true or false, "
                "train_scale is LOW-HIGH (e.g. 0.5-2.0)"
            ) from None
        return StreamOptions(**out)


# ---------------------------------------------------------------------------------------- dataset


@dataclass
class _Bad:
    pos: int
    message: str


@dataclass
class StreamingDataset(torch.utils.data.Dataset):
    """One split of a photo set, decoded per sample (see the module docstring for the size policy).

    `size` is the model input (h, w) that batches come at; `channels` converts the photos (1 or 3).
    `batches()` runs decoding in DataLoader workers; `take()` decodes a few samples in-process.
    """

    index: Index
    size: tuple[int, int]
    channels: int
    reader: Reader = field(default_factory=Reader)
    positions: np.ndarray | None = None  # which index entries belong to this (sub)set
    shortest_edge: int | None = None  # eval resize for center-crop processors
    options: StreamOptions = field(default_factory=StreamOptions)
    perm: list[int] | None = None  # class id -> model's class id (align_classes)
    info: dict[str, Any] = field(default_factory=dict)
    skipped: set[int] = field(default_factory=set)  # positions skipped as bad (skip_bad)
    class_names_: list[str] | None = None

    streaming = True

    def __post_init__(self) -> None:
        if self.positions is None:
            self.positions = np.arange(len(self.index.images))

    # -- what every data set answers
    def __len__(self) -> int:
        return len(self.positions)  # type: ignore[arg-type]

    @property
    def task(self) -> str:
        return self.index.task

    @property
    def class_names(self) -> list[str]:
        return self.class_names_ or self.index.class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def source(self) -> str:
        return self.index.source

    def subset(self, n: int | None, seed: int = 0) -> StreamingDataset:
        if n is None or n >= len(self):
            return self
        pick = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n].sort()[0]
        return replace(self, positions=self.positions[pick.numpy()], skipped=set())  # type: ignore[index]

    def relabel(self, perm: torch.Tensor, names: list[str]) -> StreamingDataset:
        return replace(self, perm=[int(v) for v in perm], class_names_=list(names))

    def with_view(self, size: tuple[int, int] | None = None, channels: int | None = None) -> StreamingDataset:
        return replace(self, size=size or self.size, channels=channels or self.channels)

    # -- decoding
    def __getitem__(self, key: tuple[int, str, int]) -> Any:
        """key = (position in this set, view "train" | "eval" | "fixed", random seed)."""
        pos, view, seed = key
        try:
            return pos, *self._sample(int(self.positions[pos]), view, seed)  # type: ignore[index]
        except DataError as e:
            return _Bad(pos, str(e))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            ref = self.index.images[int(self.positions[pos])]  # type: ignore[index]
            return _Bad(pos, f"corrupt or unreadable image {ref}: {str(e).splitlines()[0]}")

    def _sample(self, i: int, view: str, seed: int) -> tuple[torch.Tensor, Any]:
        opened: list[Image.Image] = []
        try:
            return self._decode(i, view, seed, opened)
        finally:
            for im in opened:
                im.close()

    def _decode(self, i: int, view: str, seed: int, opened: list[Image.Image]) -> tuple[torch.Tensor, Any]:
        seg = self.task == "segmentation"
        img, name = self.reader.open(self.index.images[i])
        opened.append(img)
        W, H = img.size
        if W == 0 or H == 0:
            raise DataError(f"empty image {name}")
        mask = None
        if seg:
            mask, mname = self.reader.open_mask(self.index.targets[i])
            opened.append(mask)
            if mask.size != img.size:
                raise DataError(f"mask {mname} is {mask.width}x{mask.height} but image {name} is {W}x{H}")
        S = self.size
        tile = seg and should_tile((H, W), S)
        flip = False
        if view == "train":
            rng = np.random.default_rng(seed)
            sy, sx = (1.0, 1.0) if tile else self._eval_scale(H, W)
            lo, hi = self.options.train_scale or TRAIN_SCALE[self.task]
            r = float(rng.uniform(lo, hi))
            sy, sx = sy * r, sx * r
            hs, ws = max(1, round(H * sy)), max(1, round(W * sx))
            ch, cw = min(S[0], hs), min(S[1], ws)
            y0, x0 = int(rng.integers(0, hs - ch + 1)), int(rng.integers(0, ws - cw + 1))
            box = (x0 / sx, y0 / sy, (x0 + cw) / sx, (y0 + ch) / sy)
            out, flip = (cw, ch), bool(rng.random() < 0.5)
        elif view == "eval" and seg and tile:
            box, out = (0.0, 0.0, float(W), float(H)), (W, H)
        else:  # eval / fixed: the processor's resize (+ centre crop)
            sy, sx = self._eval_scale(H, W)
            y0, x0 = (H * sy - S[0]) / 2, (W * sx - S[1]) / 2  # the centre crop (0 for a plain resize)
            box = (x0 / sx, y0 / sy, (x0 + S[1]) / sx, (y0 + S[0]) / sy)
            out = (S[1], S[0])
        box = (max(0.0, box[0]), max(0.0, box[1]), min(float(W), box[2]), min(float(H), box[3]))
        x = self._pixels(img, name, box, out)
        if seg:
            m = mask_array(mask, mname)  # type: ignore[arg-type]
            if view != "eval":  # the eval mask stays at the photo's own resolution
                m = _resample_mask(m, box, out)
            m = self._check_ids(m, mname)
        if view == "train" and out != (S[1], S[0]):  # rescaled photo smaller than the crop: pad
            x = _pad(x, S, 0)
            if seg:
                m = _pad(m, S, IGNORE_INDEX)
        if flip:
            x = x[:, :, ::-1]
            if seg:
                m = m[:, ::-1]
        xt = _tensor(x)
        if seg:
            return xt, _tensor(m)
        label = int(self.index.targets[i])
        return xt, self.perm[label] if self.perm is not None else label

    def _eval_scale(self, h: int, w: int) -> tuple[float, float]:
        """(y, x) scale of the eval view before its centre crop: squash to the input, or shortest edge."""
        if self.shortest_edge and self.task == "classification":
            s = max(self.shortest_edge, *self.size) / min(h, w)
            return s, s
        return self.size[0] / h, self.size[1] / w

    def _pixels(
        self, img: Image.Image, name: str, box: tuple[float, ...], out: tuple[int, int]
    ) -> np.ndarray:
        """(C, h, w) uint8 of `box` (photo pixels) resampled to `out` (w, h); JPEG drafts where smaller."""
        mode = "L" if self.channels == 1 else "RGB"
        W, H = img.size
        fx, fy = out[0] / max(box[2] - box[0], 1e-6), out[1] / max(box[3] - box[1], 1e-6)
        if img.format == "JPEG" and min(fx, fy) <= 0.5:
            img.draft(mode, (max(1, int(W * fx)), max(1, int(H * fy))))
            dx, dy = img.size[0] / W, img.size[1] / H
            box = (box[0] * dx, box[1] * dy, box[2] * dx, box[3] * dy)
        try:
            img.load()
        except (OSError, SyntaxError, ValueError) as e:
            raise DataError(f"corrupt or unreadable image {name}: {str(e).splitlines()[0]}") from None
        if img.mode == "F" and not np.isfinite(np.asarray(img)).all():
            # float TIFFs can hold NaN/inf, which convert() would silently turn into arbitrary grey levels
            raise DataError(f"image {name} contains NaN or infinite pixel values")
        if img.mode != mode:
            img = img.convert(mode)
        full = box == (0.0, 0.0, float(img.size[0]), float(img.size[1]))
        if not (full and out == img.size):
            img = img.resize(out, Image.BILINEAR, box=box)
        a = np.asarray(img)
        return (a[None] if a.ndim == 2 else a.transpose(2, 0, 1)).astype(np.uint8, copy=False)

    def _check_ids(self, m: np.ndarray, name: str) -> np.ndarray:
        bad = (m != IGNORE_INDEX) & ((m < 0) | (m >= len(self.index.class_names)))
        if bad.any():
            raise DataError(
                f"mask {name} has unknown class id {int(m[bad].flat[0])} "
                f"(classes 0..{len(self.index.class_names) - 1}, 255 = ignore)"
            )
        m = m.astype(np.uint8, copy=False)
        if self.perm is not None:
            lut = np.arange(256, dtype=np.uint8)
            lut[: len(self.perm)] = self.perm
            m = lut[m]
        return m

    # -- batching
    def batches(
        self,
        batch_size: int,
        *,
        order: torch.Tensor | None = None,
        train: bool = False,
        generator: torch.Generator | None = None,
        workers: int | None = None,
        view: str | None = None,
    ) -> Iterator[Batch]:
        """Batches of decoded samples in `order`, decoded by worker processes.

        train: random rescale + crop + flip per sample, seeded from `generator` (reproducible).
        Bad samples stop with their one-line DataError, or are skipped and counted with skip_bad.
        """
        order = torch.arange(len(self)) if order is None else order
        view = view or ("train" if train else "eval")
        base = int(torch.randint(0, 2**31 - 1, (1,), generator=generator)) if train else 0
        keys = [(int(p), view, base + int(p)) for p in order]
        chunks = [keys[i : i + batch_size] for i in range(0, len(keys), batch_size)]
        n_workers = self.options.workers if workers is None else workers
        if n_workers is None:
            n_workers = default_workers(len(keys), batch_size)
        loader = torch.utils.data.DataLoader(
            self,
            batch_sampler=chunks,
            num_workers=n_workers,
            collate_fn=_collate,
            worker_init_fn=_worker_init,
        )
        for b in loader:
            bad = b.pop("bad")
            if bad:
                if not self.options.skip_bad:
                    raise DataError(bad[0].message)
                self.skipped.update(x.pos for x in bad)
            if len(b["index"]):
                yield Batch(b["images"], b["targets"], b["index"], None)

    def take(self, idx: Sequence[int] | torch.Tensor, view: str = "eval") -> tuple[Any, Any]:
        """Images and targets of a few samples, decoded in this process. view "eval": as scored
        (segmentation masks at the photo's size); "fixed": everything at the model input size."""
        order = torch.as_tensor([int(i) for i in idx], dtype=torch.long)
        b = next(self.batches(max(1, len(order)), order=order, workers=0, view=view))
        return b.images, b.targets

    # -- decoded cache
    def materialize(self, *, quiet: bool = True) -> VisionDataset:
        """The set at the training size as memory-mapped uint8 arrays on disk (written once, reused).

        Photos are decoded once with the eval resize (segmentation: squashed to the input, masks
        nearest); training then slices the map and augments per batch like the in-memory sets, which
        lets cached teacher logits follow the augmentation. Pages come from the page cache, so the
        process holds only what a batch touches.
        """
        h, w = self.size
        c = self.channels
        key = hashlib.sha1(
            json.dumps(
                [
                    self.index.source,
                    self.index.key,  # holds the folder's / dataset's fingerprint: new files, new copy
                    list(map(int, self.positions)),  # type: ignore[arg-type]
                    [h, w, c, self.shortest_edge, self.perm],
                ]
            ).encode()
        ).hexdigest()[:16]  # fmt: skip
        root = cache_root() / "decoded"
        img_path, tgt_path, done = root / f"{key}.images.u8", root / f"{key}.targets", root / f"{key}.json"
        n = len(self)
        seg = self.task == "segmentation"
        tshape = (n, h, w) if seg else (n,)
        tdtype = np.uint8 if seg else np.int64
        if not done.exists():
            from ..artifacts import atomic_path
            from ..progress import progress

            root.mkdir(parents=True, exist_ok=True)
            with atomic_path(img_path) as ti, atomic_path(tgt_path) as tt:
                xs = np.lib.format.open_memmap(ti, mode="w+", dtype=np.uint8, shape=(n, c, h, w))
                ys = np.lib.format.open_memmap(tt, mode="w+", dtype=tdtype, shape=tshape)
                bs = 16
                for b in progress(
                    self.batches(bs, view="fixed"), total=-(-n // bs), desc="decoded cache", disable=quiet
                ):
                    xs[b.index.numpy()] = b.images.numpy()
                    ys[b.index.numpy()] = np.asarray(b.targets)
                xs.flush()
                ys.flush()
                del xs, ys
            done.write_text(json.dumps({"n": n, "size": [h, w], "channels": c, "source": self.source}))
        xs = np.load(img_path, mmap_mode="c")
        ys = np.load(tgt_path, mmap_mode="c")
        info = {**self.info, "decoded_cache": str(img_path)}
        ds = VisionDataset(
            torch.from_numpy(xs), torch.from_numpy(ys), self.task, self.class_names, self.source, info
        )
        return ds


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding is Pillow's; torch threads in every worker would oversubscribe


def _collate(items: list[Any]) -> dict[str, Any]:
    bad = [x for x in items if isinstance(x, _Bad)]
    good = [x for x in items if not isinstance(x, _Bad)]
    index = torch.tensor([x[0] for x in good], dtype=torch.long)
    images = [x[1] for x in good]
    targets = [x[2] for x in good]
    out: dict[str, Any] = {"bad": bad, "index": index}
    if images and all(t.shape == images[0].shape for t in images):
        out["images"] = torch.stack(images)
    else:
        out["images"] = images
    if targets and isinstance(targets[0], int):
        out["targets"] = torch.tensor(targets, dtype=torch.long)
    elif targets and all(t.shape == targets[0].shape for t in targets):
        out["targets"] = torch.stack(targets)
    else:
        out["targets"] = targets
    return out


def _tensor(a: np.ndarray) -> torch.Tensor:
    a = np.ascontiguousarray(a)
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def _resample_mask(m: np.ndarray, box: tuple[float, ...], out: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resampling of the mask inside `box` to `out` (w, h): pixel centres mapped."""
    x0, y0, x1, y1 = box
    ow, oh = out
    ys = np.clip(np.floor(y0 + (np.arange(oh) + 0.5) * (y1 - y0) / oh).astype(np.int64), 0, m.shape[0] - 1)
    xs = np.clip(np.floor(x0 + (np.arange(ow) + 0.5) * (x1 - x0) / ow).astype(np.int64), 0, m.shape[1] - 1)
    return m[ys[:, None], xs[None, :]]


def _pad(a: np.ndarray, size: tuple[int, int], fill: int) -> np.ndarray:
    """Pad the last two dims at the bottom/right to `size` (h, w), mmsegmentation's way."""
    h, w = a.shape[-2:]
    if (h, w) == tuple(size):
        return a
    out = np.full((*a.shape[:-2], *size), fill, dtype=a.dtype)
    out[..., :h, :w] = a
    return out


__all__ = [
    "Index",
    "Reader",
    "StreamOptions",
    "StreamingDataset",
    "cached_index",
    "default_workers",
    "mask_array",
    "open_image",
    "remap_targets",
]
