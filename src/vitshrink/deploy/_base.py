"""What every deployed vitshrink model does whatever runs it: preprocessing from the metadata,
input checks, tiling, classification / segmentation post-processing. numpy + Pillow only.

A runtime (`runtime.OnnxModel` for onnxruntime, `ov_runtime.OpenVinoModel` for OpenVINO) opens its
model, hands `_setup` the graph's input/output shapes and the vitshrink metadata, and implements
`_infer`; `loader.open_model` picks one by path, so predict, eval, bench, tiling and video need no
per-runtime branches.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import DataError, ModelError
from . import tiling
from ._meta import dynamic_size_problem, resolve_class_names, resolve_preprocess, resolve_task

TOP_K = 5
# Modes whose 16/32-bit integer samples are scaled by 65535 (16-bit PNG/TIFF greyscale).
_HIGH_DEPTH_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})


def static_dim(dim: Any) -> int | None:
    """A graph dimension as an int when fixed; None when symbolic ('batch', 'height') or unknown."""
    return dim if isinstance(dim, int) and dim > 0 else None


class DeployModel:
    """An exported vitshrink model: preprocessing, inference and post-processing from its metadata.

    Subclasses set `path` and call `_setup`; they implement `_infer` ((N, C, H, W) float32 -> the
    logits output) and `runtime` (the name reports show)."""

    path: Path
    runtime = "?"
    class_ids = False  # the graph ends in a uint8 class map (export --argmax), set before _setup

    def _setup(
        self, where: str, shape: Sequence[Any], out_shape: Sequence[Any] | None, meta: dict[str, Any]
    ) -> None:
        """Task, preprocessing and class names from the metadata, checked against the graph dims
        (`shape`: the NCHW input, `out_shape`: the logits; unknown dims as None)."""
        self._batch = static_dim(shape[0])
        self.meta = meta
        rank = (len(out_shape) + self.class_ids) if out_shape else None
        self.task = resolve_task(self.meta, rank, where)
        if self.class_ids and self.task != "segmentation":
            raise ModelError(f"{where}: a uint8 class-map output is for segmentation, not {self.task}")
        self.channels, self.size, mean, std = resolve_preprocess(
            self.meta, static_dim(shape[1]), (static_dim(shape[2]), static_dim(shape[3])), where
        )
        # A dynamic-size export records the step its sizes must keep (1 = any); such a graph also runs
        # at tile sizes and frame sizes other than self.size.
        dyn_hw = static_dim(shape[2]) is None and static_dim(shape[3]) is None
        multiple = (self.meta.get("preprocess") or {}).get("size_multiple") if dyn_hw else None
        self.size_multiple: int | None = int(multiple) if isinstance(multiple, int) and multiple > 0 else None
        self._pre = self.meta.get("preprocess") or {}
        # A resized-inside graph (export --resolution) runs its network at `inner_size` and takes the
        # photo at its own size: the host only normalises (see _feed_size).
        inner = self.meta.get("inner_size")
        self.inner_size: tuple[int, int] | None = (
            (int(inner[0]), int(inner[1])) if isinstance(inner, list) and len(inner) == 2 else None
        )
        if self.inner_size is not None and self.size_multiple != 1:
            self.inner_size = None  # metadata without the any-size graph it describes: use the fixed path
        self.mean = np.asarray(mean, np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(std, np.float32).reshape(-1, 1, 1)
        num_classes = (
            static_dim(out_shape[1]) if out_shape and len(out_shape) > 1 and not self.class_ids else None
        )
        self.class_names = resolve_class_names(self.meta, num_classes, where)
        if self.task == "segmentation" and num_classes is not None and num_classes > 255:
            raise ModelError(f"{where}: {num_classes} classes do not fit uint8 masks (255 is 'ignore')")
        self.warnings: list[str] = []

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _feed_size(self, img: Image.Image) -> tuple[int, int]:
        """(H, W) the image enters the graph at: the model input, or for a resized-inside graph the
        photo's own size, unless it is tiling-large (>= 2x the input both ways): then the host's
        antialiased resize to the input comes first, so the graph's plain bilinear shrink stays <= 2x."""
        frame = (img.height, img.width)
        if self.inner_size is not None and not tiling.should_tile(frame, self.size):
            return frame
        return self.size

    def preprocess(self, img: Image.Image) -> np.ndarray:
        """PIL image -> (1, C, H, W) float32: grey/RGB, bilinear resize, [0, 1], normalised."""
        h, w = self._feed_size(img)
        if img.mode in _HIGH_DEPTH_MODES:
            # convert("L"/"RGB") clips 16-bit samples at 255; scale them to [0, 1] ourselves instead.
            grey = Image.fromarray(np.asarray(img, np.float32) / 65535.0)
            x = np.asarray(grey.resize((w, h), Image.Resampling.BILINEAR), np.float32).clip(0.0, 1.0)[None]
            x = np.repeat(x, self.channels, axis=0)
        else:
            # PIL's bilinear (antialiased when shrinking) on uint8, then /255: what HF image processors do.
            img = img.convert("RGB" if self.channels == 3 else "L")
            img = img.resize((w, h), Image.Resampling.BILINEAR, box=self._crop_box(img.size))
            x = np.asarray(img, np.float32) / 255.0
            x = x.transpose(2, 0, 1) if x.ndim == 3 else x[None]
        return ((x - self.mean) / self.std)[None].astype(np.float32, copy=False)

    def _crop_box(self, wh: tuple[int, int]) -> tuple[float, float, float, float]:
        """The part of a (W, H) photo the model sees: all of it, or for a centre-crop processor
        (`shortest_edge`, classification) the centre crop after the shortest-edge resize, as the
        training data's eval view (`data.stream`) takes it."""
        W, H = wh
        edge = self._pre.get("shortest_edge") if self.task == "classification" else None
        if not edge:
            return (0.0, 0.0, float(W), float(H))
        h, w = self.size
        s = max(int(edge), h, w) / min(W, H)
        bw, bh = w / s, h / s
        x0, y0 = (W - bw) / 2, (H - bh) / 2
        return (max(0.0, x0), max(0.0, y0), min(float(W), x0 + bw), min(float(H), y0 + bh))

    def run(self, batch: np.ndarray) -> np.ndarray:
        """(N, C, H, W) float32 -> the raw `logits` output."""
        batch = np.asarray(batch)
        want = (self._batch or "N", self.channels, *self.size)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != (self.channels, *self.size):
            m = self.size_multiple
            if not (
                m and batch.ndim == 4 and batch.shape[1] == self.channels and self.takes(batch.shape[2:])
            ):
                if m:
                    lo = self._pre.get("size_min")
                    floor = f", at least {lo}" if isinstance(lo, int) and lo > m else ""
                    want = f"(N, {self.channels}, H, W) with H and W multiples of {m}{floor}"
                raise DataError(f"input has shape {tuple(batch.shape)}; {self.path.name} takes {want}")
        if self._batch is not None and batch.shape[0] != self._batch:
            raise DataError(f"input batch is {batch.shape[0]}; {self.path.name} takes exactly {self._batch}")
        logits = self._infer(np.ascontiguousarray(batch, np.float32))
        # Every path (predict, tiles, video, eval) goes through here: argmax/softmax of NaN would still
        # give a confident answer.
        if not np.isfinite(logits).all():
            raise ModelError(
                f"{self.path}: the model produced NaN or infinite outputs (corrupt or non-finite weights?)"
            )
        return logits

    def takes(self, hw: Sequence[int]) -> bool:
        """Whether the graph runs at height/width `hw` (its own size, or a multiple for dynamic-size)."""
        h, w = (int(v) for v in hw)
        if (h, w) == tuple(self.size):
            return True
        return (
            bool(self.size_multiple) and h > 0 and w > 0 and dynamic_size_problem(self._pre, (h, w)) is None
        )

    def _pixels(self, img: Image.Image) -> np.ndarray:
        """The frame as (H, W[, C]) uint8, or float32 in [0, 1] for 16-bit grey, at its own size."""
        if img.mode in _HIGH_DEPTH_MODES:
            px = np.asarray(img, np.float32) / 65535.0
            return np.repeat(px[..., None], self.channels, axis=2) if self.channels == 3 else px
        return np.asarray(img.convert("RGB" if self.channels == 3 else "L"))

    def _normalise(self, crop: np.ndarray) -> np.ndarray:
        """A (h, w[, C]) crop of _pixels -> (C, h, w) float32 input; the same arithmetic as preprocess."""
        x = crop.astype(np.float32) / 255.0 if crop.dtype == np.uint8 else crop.astype(np.float32)
        x = x.transpose(2, 0, 1) if x.ndim == 3 else x[None]
        return ((x - self.mean) / self.std).astype(np.float32, copy=False)

    def _run_padded(self, batch: np.ndarray) -> np.ndarray:
        """run() for any number of samples: a fixed-batch graph gets zero padding (and is split)."""
        if self._batch is None:
            return self.run(batch)
        outs = []
        for i in range(0, len(batch), self._batch):
            part = batch[i : i + self._batch]
            n = len(part)
            if n < self._batch:
                part = np.concatenate([part, np.zeros((self._batch - n, *part.shape[1:]), np.float32)])
            outs.append(self.run(part)[:n])
        return np.concatenate(outs)

    def segment(
        self,
        img: Image.Image,
        mode: str = "auto",
        tile: int | tuple[int, int] | None = None,
        overlap: float = tiling.DEFAULT_OVERLAP,
        batch_size: int = 4,
    ) -> dict[str, Any]:
        """Segment one frame at its full resolution: {"mask", "class_fractions", "inference"}.

        mode "resize": the whole frame resized to the model input (ids upsampled back); "tile":
        sliding-window inference (`tiling`), tiles of `tile` px (default: the model input) overlapping
        by `overlap`, `batch_size` tiles per run; "auto": "tile" when the frame is at least 2x the model
        input on both axes. "inference" says which mode ran, and why.
        """
        if self.task != "segmentation":
            raise ModelError(f"{self.path.name} is a {self.task} model; only segmentation can be tiled")
        if mode not in ("auto", "resize", "tile"):
            raise ModelError(f"unknown inference mode {mode!r} (auto, resize or tile)")
        frame = (img.height, img.width)
        th, tw = (tile, tile) if isinstance(tile, int) else tuple(tile or self.size)
        if tile is not None and not self.takes((th, tw)):
            if self.size_multiple:
                raise ModelError(
                    f"{self.path.name} cannot run {th}x{tw} tiles: {dynamic_size_problem(self._pre, (th, tw))}"
                )
            raise ModelError(
                f"{self.path.name} cannot run {th}x{tw} tiles: it takes {self.size[0]}x{self.size[1]} "
                "(its own size only); re-export with --image-size or --dynamic-size"
            )
        auto = mode == "auto"
        if mode == "tile" and self.class_ids:
            raise ModelError(
                f"{self.path.name} outputs a class map (exported with --argmax): tiles need logits to average "
                "where they overlap; use --resize, or export without --argmax to tile"
            )
        if auto:
            mode = "tile" if tiling.should_tile(frame, (th, tw)) and not self.class_ids else "resize"
        if mode == "resize":
            x = self.preprocess(img)
            res = self._segment(self.run(x)[0], img)
            res["inference"] = {"mode": "resized", "input": list(x.shape[2:])}
            if self.inner_size is not None:
                res["inference"]["inner"] = list(self.inner_size)
            if auto and self.class_ids and tiling.should_tile(frame, (th, tw)):
                res["inference"]["reason"] = "class-map output (--argmax): tiling needs logits"
            elif auto:
                res["inference"]["reason"] = (
                    f"frame {img.width}x{img.height} is within {tiling.AUTO_TILE_FACTOR:g}x of the "
                    f"model input {self.size[1]}x{self.size[0]}"
                )
            return res
        tp = tiling.plan(frame, (th, tw), overlap, self.size_multiple or 1)
        ids, k = tiling.slide(
            self._pixels(img), self._run_padded, self._normalise, tp, batch=max(1, int(batch_size))
        )
        names = self._names(k)
        reason = (
            f"frame {img.width}x{img.height} is >= {tiling.AUTO_TILE_FACTOR:g}x the model input {tw}x{th}"
            if auto
            else "requested"
        )
        return {
            "mask": ids,
            "class_fractions": _fractions(ids, names),
            "inference": tiling.describe(tp, overlap, reason),
        }

    def predict(self, images: Sequence[Image.Image], batch_size: int = 1) -> list[dict[str, Any]]:
        """Predict each image; results in input order.

        classification: {"label", "index", "score", "top5": [{"label", "index", "probability"}...]}
        segmentation:   {"mask": uint8 (H, W) class ids at the image's own size, "class_fractions": {...}}
        batch_size 1 keeps peak memory lowest, which is what a Nano needs; a fixed-batch graph sets its own.
        Every image is resized to the model input; `segment` tiles large frames instead.
        """
        if isinstance(images, Image.Image):
            images = [images]
        # resized-inside graphs take each photo at its own size: one at a time unless the batch is fixed
        step = self._batch or (1 if self.inner_size is not None else max(1, int(batch_size)))
        results: list[dict[str, Any]] = []
        for start in range(0, len(images), step):
            chunk = list(images[start : start + step])
            batch = np.concatenate([self.preprocess(im) for im in chunk])
            if self._batch is not None and len(chunk) < self._batch:  # fixed-batch graph: pad the last chunk
                batch = np.concatenate(
                    [batch, np.zeros((self._batch - len(chunk), *batch.shape[1:]), np.float32)]
                )
            logits = self.run(batch)[: len(chunk)]
            for im, out in zip(chunk, logits):
                results.append(
                    self._classify(out) if self.task == "classification" else self._segment(out, im)
                )
        return results

    def _names(self, num_classes: int) -> list[str]:
        if self.class_names is None:  # dynamic output dims and no metadata: known only now
            self.class_names = [f"class_{i}" for i in range(num_classes)]
        if len(self.class_names) != num_classes:
            raise ModelError(
                f"{self.path}: metadata lists {len(self.class_names)} class names but the model output {num_classes}"
            )
        return self.class_names

    def _classify(self, logits: np.ndarray) -> dict[str, Any]:
        if logits.ndim != 1:
            raise ModelError(
                f"{self.path}: classification output per image has shape {logits.shape}; expected (K,)"
            )
        names = self._names(logits.shape[0])
        z = logits.astype(np.float64)
        p = np.exp(z - z.max())  # max-shifted softmax: no overflow for large logits
        p /= p.sum()
        top = np.argsort(-p, kind="stable")[:TOP_K]
        best = int(top[0])
        return {
            "label": names[best],
            "index": best,
            "score": float(p[best]),
            "top5": [{"label": names[i], "index": int(i), "probability": float(p[i])} for i in top],
        }

    def _segment(self, logits: np.ndarray, img: Image.Image) -> dict[str, Any]:
        if logits.ndim != (2 if self.class_ids else 3):
            want = "(H, W) class ids" if self.class_ids else "(K, H, W)"
            raise ModelError(
                f"{self.path}: segmentation output per image has shape {logits.shape}; expected {want}"
            )
        if self.class_ids:
            ids = logits
            if self.class_names is None:
                raise ModelError(f"{self.path}: a class-map model needs class_names in its metadata")
            names = self.class_names
        else:
            names = self._names(logits.shape[0])
            # argmax at model resolution, then a nearest resize of the ids: upsampling the K float maps to
            # a 12 MP photo first would cost K x 48 MB, more than a Nano can spare.
            ids = logits.argmax(axis=0).astype(np.uint8)
        if ids.shape == (img.height, img.width):  # a resized-inside graph answers at the photo's size
            return {"mask": ids, "class_fractions": _fractions(ids, names)}
        mask = np.asarray(Image.fromarray(ids).resize(img.size, Image.Resampling.NEAREST))
        return {"mask": mask, "class_fractions": _fractions(mask, names)}


def _fractions(mask: np.ndarray, names: list[str]) -> dict[str, float]:
    """Pixel fraction per class present in `mask`, largest first."""
    counts = np.bincount(mask.ravel(), minlength=len(names))[: len(names)]
    fractions = {names[i]: float(c) / mask.size for i, c in enumerate(counts) if c}
    return dict(sorted(fractions.items(), key=lambda kv: -kv[1]))
