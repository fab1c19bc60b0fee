"""PyTorch-side quantization for users who stay in PyTorch (no ONNX round trip)."""

from __future__ import annotations

import copy
import warnings
from typing import Any, Literal

import torch
from torch import nn

from ..errors import VitshrinkError

TORCH_MODES = ("fp16", "int8-dynamic")


def _to(value: Any, dtype: torch.dtype) -> Any:
    """Cast floating tensors (also inside tuples/lists/dicts/ModelOutputs) to `dtype`."""
    if torch.is_tensor(value):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):  # includes transformers' ModelOutput, which must keep its class
        for k in list(value.keys()):
            value[k] = _to(value[k], dtype)
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, dtype) for v in value)
    return value


def _fp32_norm_pre(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return _to(args, torch.float32), _to(kwargs, torch.float32)


def _fp32_norm_post(module: nn.Module, args: tuple, output: Any) -> Any:
    return _to(output, torch.float16)


def _io_pre(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return _to(args, torch.float16), _to(kwargs, torch.float16)


def _io_post(module: nn.Module, args: tuple, output: Any) -> Any:
    return _to(output, torch.float32)


def _example_input(model: nn.Module) -> torch.Tensor | None:
    """A random pixel_values batch shaped from a transformers config (None when there is no config)."""
    cfg = getattr(model, "config", None)
    size, channels = getattr(cfg, "image_size", None), getattr(cfg, "num_channels", None)
    if not size or not channels:
        return None
    h, w = (size, size) if isinstance(size, int) else tuple(size)[:2]
    return torch.randn(2, channels, h, w, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def smooth_torch_layernorms(
    model: nn.Module, example: torch.Tensor | None = None, alpha: float = 0.5, min_ratio: float = 3.0
) -> int:
    """SmoothQuant-style migration of LayerNorm outlier channels into the Linear layers reading them.

    In place; returns how many LayerNorms were smoothed. Pairs are found by running `example` once
    and matching each LayerNorm's output tensor with the inputs of Linear layers. Activation ranges
    come from the LayerNorm affine (|gamma| + |beta|; the normalised input has unit variance per
    channel), so no data is needed. The result is checked against the original outputs and rolled
    back if anything else read the LayerNorm output.
    """
    example = _example_input(model) if example is None else example
    if example is None:
        return 0
    produced: dict[int, tuple[nn.LayerNorm, torch.Tensor]] = {}
    readers: dict[nn.LayerNorm, list[nn.Linear]] = {}
    hooks = []

    def ln_hook(mod: nn.Module, args: tuple, out: Any) -> None:
        if torch.is_tensor(out):
            produced[id(out)] = (mod, out)  # keep a reference so the id stays unique during the pass

    def lin_hook(mod: nn.Module, args: tuple) -> None:
        x = args[0] if args else None
        if not torch.is_tensor(x):
            return
        # The LayerNorm output itself, or a token-selecting view of it (e.g. the CLS token before
        # the classifier) that leaves the channel axis whole.
        src = x if id(x) in produced else x._base
        hit = produced.get(id(src)) if src is not None else None
        if (
            hit is not None
            and hit[1] is src
            and x.shape[-1] == src.shape[-1]
            and x.stride(-1) == src.stride(-1)
        ):
            readers.setdefault(hit[0], []).append(mod)

    for m in model.modules():
        if isinstance(m, nn.LayerNorm) and m.elementwise_affine and m.bias is not None:
            hooks.append(m.register_forward_hook(ln_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_pre_hook(lin_hook))
    try:
        ref = _logits(model(example))
    finally:
        for h in hooks:
            h.remove()
    backup = {k: v.clone() for k, v in model.state_dict().items()}
    done = 0
    for ln, lins in readers.items():
        lins = list(dict.fromkeys(lins))
        act = (ln.weight.abs() + ln.bias.abs()).double()
        if act.max() < min_ratio * act.median():
            continue  # no outlier channels: nothing to flatten
        wmax = torch.stack([lin.weight.abs().amax(0) for lin in lins]).amax(0).double()
        ok = (act > 0) & (wmax > 0)
        s = torch.ones_like(act)
        s[ok] = act[ok] ** alpha / wmax[ok] ** (1 - alpha)
        s = s.clamp(1e-4, 1e4)
        ln.weight.div_(s.to(ln.weight.dtype))
        ln.bias.div_(s.to(ln.bias.dtype))
        for lin in lins:
            lin.weight.mul_(s.to(lin.weight.dtype))
        done += 1
    out = _logits(model(example))
    if done and (out - ref).norm() > 1e-3 * ref.norm():
        model.load_state_dict(backup)
        return 0
    return done


def _logits(out: Any) -> torch.Tensor:
    if torch.is_tensor(out):
        return out.float()
    logits = out["logits"] if isinstance(out, dict) else out[0]
    return logits.float()


def quantize_torch(
    model: nn.Module,
    mode: Literal["fp16", "int8-dynamic"] = "int8-dynamic",
    *,
    example: torch.Tensor | None = None,
) -> nn.Module:
    """Return a quantized copy of `model` (the input is left untouched).

    fp16: weights and activations in half precision, every LayerNorm / GroupNorm kept in fp32 (its
    variance overflows fp16 once activations pass ~256); takes and returns float32 tensors.
    int8-dynamic: LayerNorm outlier channels are first migrated into the following Linear weights
    (`smooth_torch_layernorms`, exact in float), then nn.Linear weights become int8 with activations
    quantized per batch at run time (torch.ao.quantization.quantize_dynamic; CPU only). `example`
    (an input batch) is only needed to find LayerNorm -> Linear pairs in models without a
    transformers config.
    """
    if mode not in TORCH_MODES:
        raise VitshrinkError(
            f"unknown torch quantization mode '{mode}' (choose from {', '.join(TORCH_MODES)})"
        )
    q = copy.deepcopy(model).eval()
    if mode == "fp16":
        q = q.half()
        for m in q.modules():
            if isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
                m.float()
                m.register_forward_pre_hook(_fp32_norm_pre, with_kwargs=True)
                m.register_forward_hook(_fp32_norm_post)
        # float32 in and out, like the fp16 ONNX export (keep_io_types): callers need not change.
        q.register_forward_pre_hook(_io_pre, with_kwargs=True)
        q.register_forward_hook(_io_post)
    else:
        from torch.ao.quantization import quantize_dynamic

        # Per-tensor dynamic activation scales collapse on ViT LayerNorm outlier channels (measured:
        # top-1 agreement 0.11 on the test model without this, 1.0 with it).
        smooth_torch_layernorms(q, example)

        with warnings.catch_warnings():
            # torch.ao.quantization is deprecated in favour of torchao, which is not a dependency;
            # quantize_dynamic still works on this torch.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            q = quantize_dynamic(q, {nn.Linear}, dtype=torch.qint8)
    return q.eval()
