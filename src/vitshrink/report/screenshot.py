"""Render a report in headless Chromium: a PNG screenshot (for docs) or the DOM after load (for tests).

Uses the browser binary directly rather than a driver library (Playwright, Selenium): both would add a
heavy dependency and download their own browser, while the two command-line modes below are all we need.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

from vitshrink.artifacts import atomic_path
from vitshrink.errors import VitshrinkError
from vitshrink.outputs import temp_dir

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Offline, no profile state, no background traffic: the page must render from the file alone.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)
TIMEOUT_S = 120


def find_chromium() -> str | None:
    """The browser to use: $VITSHRINK_CHROMIUM if set, else the first Chromium-family binary on PATH."""
    override = os.environ.get("VITSHRINK_CHROMIUM")
    if override:
        return override if shutil.which(override) else None
    return next((p for name in BROWSERS if (p := shutil.which(name))), None)


def _run(html: Path, extra: list[str]) -> subprocess.CompletedProcess[str]:
    html = Path(html).resolve()
    if not html.is_file():
        raise VitshrinkError(f"HTML file not found: {html}")
    browser = find_chromium()
    if browser is None:
        raise VitshrinkError(
            "no Chromium found (install it, e.g. `apt install chromium`, or set VITSHRINK_CHROMIUM)"
        )
    with temp_dir("chromium") as profile:
        cmd = [browser, *FLAGS, f"--user-data-dir={profile}", *extra, html.as_uri()]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise VitshrinkError(f"Chromium did not finish rendering {html.name} in {TIMEOUT_S} s") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise VitshrinkError(f"Chromium failed on {html.name} (exit {proc.returncode}): {last}")
    return proc


def dump_dom(html: str | Path) -> str:
    """The page's DOM serialised after load, as Chromium sees it."""
    return _run(Path(html), ["--dump-dom"]).stdout


def screenshot(html: str | Path, png: str | Path, width: int = 1200, height: int = 1800) -> Path:
    """Screenshot the top `width` x `height` CSS pixels of `html` into `png` (written atomically)."""
    png = Path(png)
    with atomic_path(png) as tmp:
        # Chromium picks the format from the extension and refuses `.tmp`, so shoot beside the temp file.
        shot = tmp.with_name(tmp.name + ".png")
        try:
            _run(Path(html), [f"--screenshot={shot}", f"--window-size={width},{height}"])
            if not shot.is_file() or shot.stat().st_size == 0:
                # Chromium exits 0 even when it could not write the image.
                raise VitshrinkError(f"Chromium wrote no screenshot for {Path(html).name}")
            os.replace(shot, tmp)
        finally:
            with contextlib.suppress(OSError):
                shot.unlink()
    return png
