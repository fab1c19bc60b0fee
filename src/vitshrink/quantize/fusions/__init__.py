"""Exact graph rewrites, one file each: a `Fusion` subclass (see `base.py`) that matches a pattern from
an anchor node and rewrites it on a copy of the model, `fusion(model) -> (model, info)`.

`FUSIONS` is the order the quantize pipeline runs them in (`steps.exact_rewrites`); those marked
`ort_only` write onnxruntime-only ops and run for int8 CPU models only. `gemm_to_matmul` is not in it:
the dynamic int8 builders run it on their own copy. A new rewrite is a new file here plus its place
in `FUSIONS`.
"""

from __future__ import annotations

from .base import Fusion
from .channels_last_reshapes import ChannelsLastReshapes
from .channels_last_tail import ChannelsLastTail
from .concat_conv import FoldConcatConv
from .gelu import FuseGelu
from .gemm_matmul import GemmToMatMul
from .mha import FuseAttention
from .residual_norm import ResidualNorms2d
from .sum_adds import SumsToAdds

fold_concat_conv = FoldConcatConv()
channels_last_reshapes = ChannelsLastReshapes()
channels_last_tail = ChannelsLastTail()
sums_to_adds = SumsToAdds()
residual_norms_2d = ResidualNorms2d()
fuse_attention = FuseAttention()
fuse_gelu = FuseGelu()
gemm_to_matmul = GemmToMatMul()

FUSIONS: tuple[Fusion, ...] = (
    fold_concat_conv,
    channels_last_reshapes,
    channels_last_tail,
    sums_to_adds,
    residual_norms_2d,
    fuse_attention,
    fuse_gelu,
)

__all__ = [
    "FUSIONS",
    "ChannelsLastReshapes",
    "ChannelsLastTail",
    "FoldConcatConv",
    "FuseAttention",
    "FuseGelu",
    "Fusion",
    "GemmToMatMul",
    "ResidualNorms2d",
    "SumsToAdds",
    "channels_last_reshapes",
    "channels_last_tail",
    "fold_concat_conv",
    "fuse_attention",
    "fuse_gelu",
    "gemm_to_matmul",
    "residual_norms_2d",
    "sums_to_adds",
]
