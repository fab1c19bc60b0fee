"""Edge deployment: a torch-free ONNX runtime, `predict`, and the TensorRT recipe.

Importing this package loads only numpy, Pillow and onnxruntime, so it runs on a 4 GB Jetson Nano;
OpenVINO models (`open_model` on an IR folder) load openvino too, only when opened.
Note: the function `predict` shadows the submodule of the same name as an attribute of this package;
import helpers from the submodule with `from vitshrink.deploy.predict import load_image`.
"""

from __future__ import annotations

from ._base import DeployModel
from .loader import open_model
from .ov_runtime import OpenVinoModel
from .predict import PALETTE, load_image, predict
from .runtime import OnnxModel
from .trt import trt_recipe
from .video import predict_video

__all__ = [
    "PALETTE",
    "DeployModel",
    "OnnxModel",
    "OpenVinoModel",
    "load_image",
    "open_model",
    "predict",
    "predict_video",
    "trt_recipe",
]
