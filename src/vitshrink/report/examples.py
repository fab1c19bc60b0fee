"""Example predictions for a run's report: a few test images, ground truth, first and last stage.

Shared by `demo` and `compress`, so both reports show what the compressed model actually predicts.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from ..artifacts import atomic_file
from ..labels import palette_for


def write_examples(
    out: Path,
    data: str,
    data_options: dict[str, Any] | None,
    task: str,
    stages: list[dict[str, Any]],
    *,
    n: int = 3,
) -> list[dict[str, Any]]:
    """Write `out/examples/*.png` and return results.json's `examples` entries.

    `stages[0]` is the original (teacher) and `stages[-1]` the final model; both must be ONNX files.
    """
    import numpy as np
    import torch

    from ..data import load_dataset
    from ..deploy.loader import open_model
    from ..evaluate import onnx_model_meta
    from ..train import prepare

    ds = load_dataset(data, "test", limit=n, seed=1, data_options=data_options or {})
    ex_dir = out / "examples"
    ex_dir.mkdir(exist_ok=True)
    first, last = open_model(stages[0]["artifact"]), open_model(stages[-1]["artifact"])
    if getattr(ds, "streaming", False):
        ds = ds.with_view(tuple(first.size), first.channels)
    names = list(first.class_names)
    examples = []
    for i in range(len(ds)):
        img_u8, target = ds.take([i], view="fixed")  # image and mask at the model input, side by side
        preds = {}
        for key, m in (("teacher", first), ("compressed", last)):
            x = prepare(img_u8, onnx_model_meta(m), torch.device("cpu")).numpy()
            out = m.run(x.astype(np.float32))[0]
            preds[key] = out if m.class_ids else out.argmax(0)  # a class-map graph (--argmax) gives ids
        img = img_u8[0].permute(1, 2, 0).numpy()
        path = ex_dir / f"{i}.png"
        if task == "segmentation":
            from . import save_example_panel

            masks = {
                "ground truth": target[0].numpy(),
                "teacher": preds["teacher"].astype(np.uint8),
                f"compressed ({stages[-1]['name']})": preds["compressed"].astype(np.uint8),
            }
            save_example_panel(path, img, masks, palette_for(len(names), data), class_names=names)
            examples.append(
                {
                    "image": f"examples/{path.name}",
                    "caption": f"test image {i}: image, ground truth, teacher, {stages[-1]['name']}",
                }
            )
        else:
            from PIL import Image

            pil = Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img)
            scale = max(1, 112 // max(pil.size))
            with atomic_file(path) as f:
                pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST).save(f, format="PNG")
            examples.append(
                {
                    "image": f"examples/{path.name}",
                    "labels": {
                        "ground_truth": names[int(target[0])],
                        "teacher": names[int(preds["teacher"])],
                        "compressed": names[int(preds["compressed"])],
                    },
                }
            )
    return examples


def publish_final(out: Path, artifact: str | os.PathLike) -> Path:
    """Copy the final deployable ONNX to `out/model.onnx`, the fixed place users look for it."""
    src = Path(artifact)
    dst = out / "model.onnx"
    if src.suffix != ".onnx" or src.resolve() == dst.resolve():
        return src
    with atomic_file(dst) as f, open(src, "rb") as g:
        shutil.copyfileobj(g, f)
    return dst
