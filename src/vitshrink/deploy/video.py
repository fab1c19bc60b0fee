"""`vitshrink predict FILE.mp4` (or a folder of frames): segment a video frame by frame, on the edge.

Frames are decoded and encoded with PyAV (`av`, FFmpeg bundled in its wheels, aarch64 included), one at
a time, so memory stays flat however long the flight is. Writes an overlay video and one JSON line per
processed frame (class fractions, latency), and reports sustained frames/s and peak RSS. To keep up with
a live feed, `every` keeps every Nth frame and `max_fps` at most that many frames per second of video
time. Torch-free like the rest of the deploy path; `av` is imported only when a video is processed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .._proc import peak_rss_mb
from ..artifacts import atomic_file, atomic_path, write_json
from ..errors import DataError, ModelError
from ._base import DeployModel
from .loader import open_model
from .tiling import DEFAULT_OVERLAP

VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".ts"})
# A folder of frames has no timestamps: this rate unless `fps` is given.
DEFAULT_FOLDER_FPS = 10.0


def is_video(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS and Path(path).is_file()


def _av() -> Any:
    try:
        import av
    except ImportError:  # pragma: no cover - av is a dependency; a trimmed install may lack it
        raise DataError("video needs PyAV: pip install av") from None
    return av


def _frames(source: Path, fps: float | None) -> tuple[Iterator[tuple[float, Image.Image]], float]:
    """(time in s, RGB frame) pairs from a video file or an ordered folder of images, and the rate."""
    if source.is_dir():
        from .predict import IMAGE_EXTENSIONS, load_image

        files = sorted(f for f in source.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
        if not files:
            raise DataError(f"no frames (images) in {source}")
        rate = fps or DEFAULT_FOLDER_FPS

        def folder() -> Iterator[tuple[float, Image.Image]]:
            for i, f in enumerate(files):
                yield i / rate, load_image(f).convert("RGB")

        return folder(), rate
    av = _av()
    try:
        container = av.open(str(source))
        stream = container.streams.video[0]
    except (av.error.FFmpegError, IndexError, OSError) as e:
        why = str(e).splitlines()[0] if str(e) else "no video stream"
        raise DataError(f"cannot read video {source}: {why}") from None
    stream.thread_type = "AUTO"  # decoder threads: decoding must not be what limits the frame rate
    rate = float(fps or stream.average_rate or stream.guessed_rate or 30)

    def decoded() -> Iterator[tuple[float, Image.Image]]:
        try:
            for n, frame in enumerate(container.decode(stream)):
                t = float(frame.time) if frame.time is not None else n / rate
                yield t, frame.to_image()
        except av.error.FFmpegError as e:
            raise DataError(f"video decoding failed in {source}: {str(e).splitlines()[0]}") from None
        finally:
            container.close()

    return decoded(), rate


class _Writer:
    """H.264 (yuv420p) overlay video, opened on the first frame; odd frame sides lose their last pixel
    row/column (4:2:0 chroma needs even sides)."""

    def __init__(self, path: Path, rate: float) -> None:
        self.path, self.rate = path, rate
        self.container: Any = None
        self.stream: Any = None
        self.frames = 0

    def write(self, img: Image.Image) -> None:
        av = _av()
        w, h = img.width // 2 * 2, img.height // 2 * 2
        if self.container is None:
            self.container = av.open(str(self.path), "w", format="mp4")
            codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
            self.stream = self.container.add_stream(codec, rate=Fraction(self.rate).limit_denominator(1001))
            self.stream.width, self.stream.height, self.stream.pix_fmt = w, h, "yuv420p"
            if codec == "libx264":
                self.stream.options = {"preset": "veryfast", "crf": "23"}
        if img.size != (w, h):
            img = img.crop((0, 0, w, h))
        for packet in self.stream.encode(av.VideoFrame.from_image(img)):
            self.container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        if self.container is not None:
            for packet in self.stream.encode():
                self.container.mux(packet)
            self.container.close()


def predict_video(
    model: str | os.PathLike | DeployModel,
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    threads: int | None = None,
    mode: str = "auto",
    tile: int | tuple[int, int] | None = None,
    overlap: float = DEFAULT_OVERLAP,
    tile_batch: int = 4,
    every: int = 1,
    max_fps: float | None = None,
    fps: float | None = None,
    limit: int | None = None,
    quiet: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Segment every kept frame of `source` (video file or folder of frames) into `out`/:
    <stem>_overlay.mp4 (the kept frames, overlaid, at their own resolution), <stem>_frames.jsonl (one
    line per kept frame: frame index, time, latency_ms, inference mode, class_fractions) and
    <stem>_video.json (the summary this returns).

    every: keep every Nth frame; max_fps: keep at most this many frames per second of video time (the
    rate a live feed can be kept up with is the reported sustained fps); fps: the rate of a folder of
    frames (default 10); limit: stop after this many kept frames.
    Summary: frames_read, frames_processed, sustained_fps (kept frames per wall-clock second, decoding
    and encoding included), inference_fps (model and post-processing only), latency_ms p50/p90/max,
    peak_rss_mb and the output paths.
    """
    from .predict import overlay

    if every < 1:
        raise DataError(f"every must be >= 1, got {every}")
    if max_fps is not None and max_fps <= 0:
        raise DataError(f"max_fps must be > 0, got {max_fps}")
    net = model if isinstance(model, DeployModel) else open_model(model, threads=threads)
    if net.task != "segmentation":
        raise ModelError(f"{net.path.name} is a {net.task} model; video output needs segmentation")
    source = Path(source)
    if not source.exists():
        raise DataError(f"not found: {source}")
    frames, rate = _frames(source, fps)
    out_rate = rate / every if max_fps is None else min(rate / every, max_fps)
    out_dir = Path(out)
    stem = source.stem if source.is_file() else source.name
    video_path = out_dir / f"{stem}_overlay.mp4"
    lines_path = out_dir / f"{stem}_frames.jsonl"
    from ..outputs import check_file_target

    for target in (video_path, lines_path, out_dir / f"{stem}_video.json"):  # never over a user's file
        check_file_target(target, inputs=[source, net.path], overwrite=overwrite)
    latencies: list[float] = []
    read = 0
    next_t = -float("inf")  # video time from which the next frame may be kept (max_fps)
    start = time.perf_counter()
    with atomic_path(video_path) as tmp_video, atomic_file(lines_path, "w") as lines:
        writer = _Writer(tmp_video, out_rate)
        try:
            for t, img in frames:
                n = read
                read += 1
                if n % every or t < next_t - 1e-6:
                    continue
                if max_fps is not None:
                    next_t = t + 1.0 / max_fps
                t0 = time.perf_counter()
                res = net.segment(img, mode, tile=tile, overlap=overlap, batch_size=tile_batch)
                latencies.append((time.perf_counter() - t0) * 1000)
                writer.write(overlay(img, res["mask"]))
                entry = {
                    "frame": n,
                    "time_s": round(t, 4),
                    "latency_ms": round(latencies[-1], 2),
                    "inference": res["inference"]["mode"],
                    "class_fractions": res["class_fractions"],
                }
                lines.write(json.dumps(entry) + "\n")
                lines.flush()  # a live consumer can tail the file
                if not quiet:
                    top = ", ".join(f"{k} {v:.0%}" for k, v in list(res["class_fractions"].items())[:3])
                    print(f"frame {n} ({latencies[-1]:.0f} ms): {top}", file=sys.stderr)
                if limit is not None and len(latencies) >= limit:
                    break
        finally:
            writer.close()
        if not latencies:
            raise DataError(f"no frames could be read from {source}")
    summary = _summary(net, source, video_path, lines_path, read, latencies, rate, out_rate, start)
    write_json(out_dir / f"{stem}_video.json", summary)
    return summary


def _summary(
    net: DeployModel,
    source: Path,
    video_path: Path,
    lines_path: Path,
    read: int,
    latencies: list[float],
    rate: float,
    out_rate: float,
    start: float,
) -> dict[str, Any]:
    """What <stem>_video.json says: frames, rates (sustained includes decoding and encoding), latency."""
    wall = time.perf_counter() - start
    lat = np.asarray(latencies)
    summary = {
        "model": str(net.path),
        "source": str(source),
        "overlay_video": video_path.name,
        "frames_jsonl": lines_path.name,
        "frames_read": read,
        "frames_processed": len(latencies),
        "source_fps": round(rate, 3),
        "output_fps": round(out_rate, 3),
        "sustained_fps": round(len(latencies) / wall, 3),
        "inference_fps": round(1000.0 * len(latencies) / float(lat.sum()), 3),
        "latency_ms": {
            "p50": round(float(np.percentile(lat, 50)), 2),
            "p90": round(float(np.percentile(lat, 90)), 2),
            "max": round(float(lat.max()), 2),
        },
        "peak_rss_mb": None if (rss := peak_rss_mb()) is None else round(rss, 1),
    }
    return summary
