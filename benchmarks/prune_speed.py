"""Does structured pruning make ViTs faster? vitshrink vs Torch-Pruning's own Hugging Face recipe.

For DeiT-small (384-d, 6 heads, 12 layers, patch 16) and Swin-tiny at 224x224 (random weights: speed
does not depend on them) and pruning ratios 0.25 / 0.5 / 0.75 this measures parameters, MACs and ONNX
Runtime CPU latency of:

* base   - the unpruned model;
* ours   - ``vitshrink.prune.prune_model`` (uniform widths, whole heads, round_to=8, config rewritten);
* tp     - Torch-Pruning's recipe from examples/transformers/prune_hf_vit.py (and prune_hf_swin.py for
           Swin's patch merging), with whole-head pruning: ``BasePruner(..., num_heads={q,k,v: heads},
           prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio,
           pruning_ratio=ratio, ignored_layers=[classifier])``, then the attention attributes patched;
* ours@tp - ours at the ratio that gives the same parameter count as tp (``ratio_for_target``);
* ours auto - ``prune --depth-ratio auto``: ours' parameter count split between depth (0/0.25/0.5)
           and width, the fastest split on onnxruntime on this machine (``prune.shape``).

Latency: every variant is exported with ``torch.onnx.export(dynamo=False, opset 17)`` and run with
``intra_op_num_threads`` threads (2 by default); all sessions live in ONE process and are timed in
interleaved rounds, keeping each model's best per-round median, because single runs on a shared
machine vary by 30-50%. It also checks what each variant needs to be reloaded: ours through plain
``AutoModelForImageClassification.from_pretrained``, tp's only through ``torch.save(model)`` (pickle).

    PYTHONPATH=src .venv/bin/python benchmarks/prune_speed.py            # full run (< 10 min, 2 cores)
    PYTHONPATH=src .venv/bin/python benchmarks/prune_speed.py --quick    # ratio 0.5 only, fewer rounds
    ... --depth    # also depth pruning (`prune --depth-ratio`), alone and with width ratio 0.5
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import onnxslim
import torch
import torch_pruning as tp
import transformers as T
from torch import nn

from vitshrink.deploy.runtime import session_options
from vitshrink.export import make_exportable
from vitshrink.models.families.swin import SwinPatchMergingPruner
from vitshrink.prune import _latency_ms
from vitshrink.prune.core import count_macs, count_params, prune_model
from vitshrink.prune.depth import drop_blocks
from vitshrink.prune.shape import choose_shape
from vitshrink.prune.target import fill_budget, ratio_for_target

T.utils.logging.set_verbosity_error()
T.utils.logging.disable_progress_bar()
warnings.filterwarnings("ignore")


def deit_small() -> nn.Module:
    cfg = T.DeiTConfig(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        intermediate_size=1536,
        image_size=224,
        patch_size=16,
    )
    cfg.num_labels = 1000
    return T.DeiTForImageClassification(cfg).eval()


def swin_tiny() -> nn.Module:
    cfg = T.SwinConfig(
        embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, image_size=224
    )
    cfg.num_labels = 1000
    return T.SwinForImageClassification(cfg).eval()


MODELS = {"deit-small": deit_small, "swin-tiny": swin_tiny}


# -- Torch-Pruning's recipe ---------------------------------------------------------------------------
def tp_prune(
    model: nn.Module,
    ratio: float,
    x: torch.Tensor,
    whole_heads: bool = True,
    ignored_layers: list[nn.Module] | None = None,
    **pruner_kwargs: Any,
) -> nn.Module:
    """examples/transformers/prune_hf_vit.py (+ prune_hf_swin.py's patch-merging pruner).

    whole_heads=True is the recipe with whole-head pruning; False is prune_hf_swin.py as published
    (head dims shrink, head count stays). ignored_layers (added for prune_recovery.py, whose
    segmentation heads are not `model.classifier`): the output layers kept whole, default the classifier;
    pruner_kwargs (also added for it) go to BasePruner, e.g. head_pruning_ratio_dict.
    """
    num_heads = {}
    for m in model.modules():
        if hasattr(m, "q_proj") and isinstance(getattr(m, "num_attention_heads", None), int):
            for lin in (m.q_proj, m.k_proj, m.v_proj):
                num_heads[lin] = m.num_attention_heads
    extra: dict[str, Any] = {}
    if model.config.model_type == "swin":
        from transformers.models.swin.modeling_swin import SwinPatchMerging

        extra = {
            "customized_pruners": {SwinPatchMerging: SwinPatchMergingPruner()},
            "root_module_types": (nn.Linear, nn.LayerNorm, SwinPatchMerging),
        }
    pruner = tp.pruner.BasePruner(
        model,
        x,
        global_pruning=False,
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=ratio,
        ignored_layers=[model.classifier] if ignored_layers is None else ignored_layers,
        output_transform=lambda out: out.logits.sum(),
        num_heads=num_heads,
        prune_num_heads=whole_heads,
        prune_head_dims=not whole_heads,
        head_pruning_ratio=ratio if whole_heads else 0.0,
        **extra,
        **pruner_kwargs,
    )
    for g in pruner.step(interactive=True):
        g.prune()
    for m in model.modules():  # "Modify the attention head size and all head size after pruning"
        if hasattr(m, "q_proj") and m.q_proj in pruner.num_heads:
            m.num_attention_heads = pruner.num_heads[m.q_proj]
            m.head_dim = m.q_proj.out_features // m.num_attention_heads
    return model.eval()


# -- measuring ----------------------------------------------------------------------------------------
@dataclass
class Variant:
    model: str
    name: str
    ratio: float
    params: int = 0
    macs: int = 0
    reload: str = ""
    onnx: bytes = b""
    medians: list[float] = field(default_factory=list)
    error: str = ""
    same_as: Variant | None = None  # identical architecture already timed: reuse, don't time twice

    @property
    def latency(self) -> float:
        if self.same_as is not None:
            return self.same_as.latency
        return min(self.medians) if self.medians else float("nan")


class _Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def to_onnx(model: nn.Module, x: torch.Tensor, slim: bool = True) -> bytes:
    """Export as vitshrink's export stage does: TorchScript exporter, opset 17, then onnxslim."""
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(
            _Logits(make_exportable(model)).eval(),
            (x,),
            buf,
            dynamo=False,
            opset_version=17,
            input_names=["pixel_values"],
        )
    if not slim:
        return buf.getvalue()
    # onnxslim folds the exporter's shape arithmetic (~40% of the nodes): without it per-node overhead,
    # the same for every width, dominates small pruned models and hides part of their speed-up
    return onnxslim.slim(onnx.load_from_string(buf.getvalue())).SerializeToString()


def reload_check(model: nn.Module, x: torch.Tensor) -> str:
    """Can plain transformers load it back, with the same outputs?

    Loads with the model's own class (not AutoModelForImageClassification) so prune_recovery.py can use
    it for segmentation models too; same class for this file's classifiers.
    """
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        try:
            back = type(model).from_pretrained(d).eval()
        except Exception as e:  # noqa: BLE001 - we report whatever transformers says
            pickled = io.BytesIO()
            torch.save(model, pickled)
            return f"no ({type(e).__name__}); torch.save only ({len(pickled.getvalue()) / 1e6:.0f} MB pickle)"
    with torch.no_grad():
        diff = float((back(pixel_values=x).logits - model(pixel_values=x).logits).abs().max())
    return f"yes (max diff {diff:.0e})"


SLIM = True


def measure(variant: Variant, model: nn.Module, x: torch.Tensor) -> None:
    variant.params, variant.macs = count_params(model), count_macs(model, x)
    variant.reload = reload_check(model, x)
    variant.onnx = to_onnx(model, x, slim=SLIM)


def time_all(variants: list[Variant], x: np.ndarray, threads: int, rounds: int, iters: int) -> None:
    opts = session_options(threads)  # vitshrink's own: subnormals flushed, as in bench and deploy
    sessions = [(v, ort.InferenceSession(v.onnx, opts, providers=["CPUExecutionProvider"])) for v in variants]
    for _, s in sessions:  # warm-up
        s.run(None, {"pixel_values": x})
    for r in range(rounds):
        order = sessions if r % 2 == 0 else sessions[::-1]  # alternate order against drift
        for v, s in order:
            ts = []
            for _ in range(iters):
                t0 = time.perf_counter()
                s.run(None, {"pixel_values": x})
                ts.append((time.perf_counter() - t0) * 1e3)
            v.medians.append(statistics.median(ts))


# -- main ---------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> list[Variant]:
    # torch work (pruning, export) single-threaded: on a shared 2-core box extra torch threads only spin
    torch.set_num_threads(1)
    x = torch.randn(1, 3, 224, 224)
    ratios = [0.5] if args.quick else [0.25, 0.5, 0.75]
    variants: list[Variant] = []
    for mname in args.models:
        build = MODELS[mname]
        torch.manual_seed(0)
        base = build()
        v = Variant(mname, "base", 0.0)
        measure(v, base, x)
        variants.append(v)
        for r in ratios:
            t0 = time.time()
            ours = prune_model(copy.deepcopy(base), ratio=r, example_inputs=x)
            v = Variant(mname, "ours", r)
            measure(v, ours, x)
            variants.append(v)
            print(
                f"{mname} ours r={r}: {v.params / 1e6:.2f} M params, pruned in {time.time() - t0:.1f}s",
                flush=True,
            )
            variants.append(auto_variant(mname, "ours auto", r, base, x, v))
            recipes = [("tp", True)] + ([("tp-headdim", False)] if mname.startswith("swin") else [])
            for label, whole in recipes:
                v = Variant(mname, label, r)
                try:
                    theirs = tp_prune(copy.deepcopy(base), r, x, whole_heads=whole)
                    with torch.no_grad():
                        theirs(pixel_values=x)
                    measure(v, theirs, x)
                except Exception as e:  # noqa: BLE001 - reported in the table
                    v.error = f"{type(e).__name__}: {str(e).splitlines()[0][:90]}"
                variants.append(v)
                ours_params = next(
                    o.params for o in variants if o.model == mname and o.name == "ours" and o.ratio == r
                )
                if v.error or abs(v.params - ours_params) <= 0.02 * v.params:
                    continue  # failed, or ours at this ratio already has tp's parameter count
                r_eq = ratio_for_target(base, x, target_params=v.params)  # as prune --target-params
                m_eq = fill_budget(base, r_eq, x, target_params=v.params)
                eq = prune_model(copy.deepcopy(base), ratio=r_eq, ratio_mlp=m_eq, example_inputs=x)
                w = Variant(mname, f"ours@{label}", r_eq)
                w.same_as = next(
                    (
                        o
                        for o in variants
                        if o.model == mname and o.name == "ours" and o.params == count_params(eq)
                    ),
                    None,
                )
                if w.same_as is None:
                    measure(w, eq, x)
                else:  # e.g. Swin-T: 0.24 and 0.25 both keep 2 of 3 stage-0 heads
                    w.params, w.macs, w.reload = w.same_as.params, w.same_as.macs, w.same_as.reload
                variants.append(w)
                variants.append(auto_variant(mname, f"ours auto@{label}", r_eq, base, x, w, v.params))
        for d, w_ratio in DEPTH_RECIPES if args.depth else []:
            # depth first (blocks ranked on the example input), then widths, as `prune --depth-ratio`
            model = copy.deepcopy(base)
            drop_blocks(model, d, [x])
            if w_ratio:
                model = prune_model(model, ratio=w_ratio, example_inputs=x)
            v = Variant(mname, f"ours depth {d:g}", w_ratio)
            measure(v, model, x)
            variants.append(v)
    timed = [v for v in variants if v.onnx and v.same_as is None]
    print(
        f"timing {len(timed)} ONNX models: {args.rounds} interleaved rounds x {args.iters} runs, {args.threads} threads",
        flush=True,
    )
    time_all(timed, x.numpy(), args.threads, args.rounds, args.iters)
    return variants


def auto_variant(
    mname: str, label: str, r: float, base: nn.Module, x: torch.Tensor, width_only: Variant, target: int = 0
) -> Variant:
    """`prune --depth-ratio auto` at `target` params (default: width_only's): the budget split between
    depth and width, fastest exported model on onnxruntime here (as prune() measures) wins."""
    d, w, m, _ = choose_shape(
        base, x, [x], lambda net: _latency_ms(net, x), target_params=target or width_only.params
    )
    mlp = f", MLP {m:.2f}" if m != w else ""
    a = Variant(mname, f"{label} (depth {d:g}, width {w:.2f}{mlp})", r)
    if d == 0 and m == w and not target:
        a.same_as = width_only.same_as or width_only
        a.params, a.macs, a.reload = width_only.params, width_only.macs, width_only.reload
        return a
    model = copy.deepcopy(base)
    drop_blocks(model, d, [x])
    measure(a, prune_model(model, ratio=w, ratio_mlp=m, example_inputs=x), x)
    return a


# (depth ratio, width ratio) pairs timed with --depth
DEPTH_RECIPES = [(0.5, 0.0), (0.75, 0.0), (0.5, 0.5), (0.75, 0.5)]


def table(variants: list[Variant]) -> str:
    head = (
        "| model | variant | ratio | params (M) | GMACs | MAC reduction | latency (ms) | speed-up | "
        "speed-up / MAC reduction | reloads with from_pretrained |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    base = {v.model: v for v in variants if v.name == "base"}
    for v in variants:
        if v.error:
            rows.append(f"| {v.model} | {v.name} | {v.ratio:g} | - | - | - | - | - | - | failed: {v.error} |")
            continue
        b = base[v.model]
        mac_red, speed = b.macs / v.macs, b.latency / v.latency
        same = f" (= ours {v.same_as.ratio:g})" if v.same_as is not None else ""
        rows.append(
            f"| {v.model} | {v.name} | {v.ratio:.3g} | {v.params / 1e6:.2f} | {v.macs / 1e9:.2f} | {mac_red:.2f}x | "
            f"{v.latency:.1f}{same} | {speed:.2f}x | {speed / mac_red:.2f} | {v.reload} |"
        )
    return head + "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="ratio 0.5 only and fewer rounds")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument(
        "--threads",
        default="auto",
        help="ORT intra-op threads; auto = 2, or 1 when the machine is busy (load > 1)",
    )
    ap.add_argument("--no-slim", action="store_true", help="time the raw exported graphs (no onnxslim)")
    ap.add_argument(
        "--depth", action="store_true", help="also time depth pruning (+ width 0.5): ours depth D rows"
    )
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    args = ap.parse_args()
    load = os.getloadavg()[0]
    args.threads = (1 if load > 1.0 else 2) if args.threads == "auto" else int(args.threads)
    print(f"load average {load:.1f}: ONNX Runtime with {args.threads} intra-op thread(s)", flush=True)
    args.rounds = args.rounds or (3 if args.quick else 9)
    args.iters = args.iters or (5 if args.quick else 10)
    global SLIM
    SLIM = not args.no_slim
    t0 = time.time()
    variants = run(args)
    print()
    print(table(variants))
    base = {v.model: v for v in variants if v.name == "base"}

    def kind(v: Variant) -> str:  # "ours auto (depth 0.5, width 0.41)" -> "ours auto"
        return v.name.split(" (")[0]

    for name in sorted({kind(v) for v in variants if v.name.startswith("ours") and "@" not in v.name}):
        ours = [v for v in variants if kind(v) == name and not v.error]
        worst = min((base[v.model].latency / v.latency) / (base[v.model].macs / v.macs) for v in ours)
        print(f"worst speed-up / MAC-reduction for {name}: {worst:.2f} (target >= 0.6)")
    print(
        f"ORT threads={args.threads} (load average {load:.1f}), onnxslim={SLIM}, rounds={args.rounds}, iters={args.iters}, "
        f"total {time.time() - t0:.0f}s"
    )


if __name__ == "__main__":
    main()
