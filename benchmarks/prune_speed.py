"""Does structured pruning make ViTs faster? vitshrink's default `prune --ratio R` vs Torch-Pruning.

For DeiT-small (384-d, 6 heads, 12 layers, patch 16) and Swin-tiny at 224x224 and SegFormer-B0 at
512x512 (random weights: speed does not depend on them) and pruning ratios 0.3 / 0.5 / 0.7 this
measures parameters, MACs and ONNX Runtime CPU latency of:

* base   - the unpruned model;
* ours before - the previous default: ``prune_model(ratio=R, round_to=8)``, widths only;
* ours default - ``vitshrink.prune.prune(ratio=R)`` as it runs now: the depth/width split at the
           width cut's MACs, fastest measured here (``prune.shape``), widths rounded to this CPU's
           vector width (``vitshrink.cpu.width_multiple``);
* tp     - Torch-Pruning's recipe from examples/transformers/prune_hf_vit.py (and prune_hf_swin.py for
           Swin's patch merging), with whole-head pruning: ``BasePruner(..., num_heads={q,k,v: heads},
           prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio,
           pruning_ratio=ratio, ignored_layers=[classifier])``, then the attention attributes patched
           (layers with fewer heads than the ratio removes keep one: ``head_caps``);
* with --equal-params: ours@tp (ours at tp's parameter count) and ours auto@tp (``--depth-ratio
           auto`` at it).

The summary is speed-up / MAC reduction per model and ratio (1.0: latency falls as MACs do).
With ``--accuracy TEACHER`` it instead prunes a Fashion-MNIST model directory widths-only and by
default, both with the same recovery, and scores the test split.

Latency: every variant is exported with ``torch.onnx.export(dynamo=False, opset 17)`` and run with
``intra_op_num_threads`` threads (2 by default); all sessions live in ONE process and are timed in
interleaved rounds, keeping each model's best per-round median, because single runs on a shared
machine vary by 30-50%. It also checks what each variant needs to be reloaded: ours through plain
``from_pretrained``, tp's only through ``torch.save(model)`` (pickle).

    PYTHONPATH=src .venv/bin/python benchmarks/prune_speed.py            # full run (2 cores)
    PYTHONPATH=src .venv/bin/python benchmarks/prune_speed.py --quick    # ratio 0.5 only, fewer rounds
    ... --depth    # also depth pruning (`prune --depth-ratio`), alone and with width ratio 0.5
    ... --accuracy ~/.cache/vitshrink/demo/classification-teacher-*      # accuracy after recovery
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
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import onnxslim
import torch
import torch_pruning as tp
import transformers as T
from torch import nn

from vitshrink.artifacts import read_json
from vitshrink.deploy.runtime import session_options
from vitshrink.export import make_exportable
from vitshrink.models.families.swin import SwinPatchMergingPruner
from vitshrink.prune import _latencies_ms
from vitshrink.prune.core import count_macs, count_params, family_for, prune_model
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


def segformer_b0() -> nn.Module:
    cfg = T.SegformerConfig(num_labels=150)  # the B0 defaults: widths 32/64/160/256, 2 blocks per stage
    return T.SegformerForSemanticSegmentation(cfg).eval()


MODELS = {"deit-small": deit_small, "swin-tiny": swin_tiny, "segformer-b0": segformer_b0}
SIZES = {"segformer-b0": 512}  # input side (default 224): SegFormer at its deployment size


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


def output_layers(model: nn.Module) -> list[nn.Module]:
    """The class-prediction layers (`classifier`, `decode_head.classifier`, ...): Torch-Pruning keeps them."""
    return [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] == "classifier"]


def head_caps(model: nn.Module, ratio: float) -> dict[nn.Module, float]:
    """Per-attention head ratios that never remove the last head.

    Torch-Pruning removes ceil(ratio * heads) heads per layer, so single-head layers (SegFormer's first
    stages) would lose their only head and the model would break; capping at (heads - 1) / heads, with
    its own `head_pruning_ratio_dict`, is the smallest change that makes the recipe run.
    """
    caps = {}
    for m in model.modules():
        heads = getattr(m, "num_attention_heads", None)
        if hasattr(m, "q_proj") and isinstance(heads, int) and (heads - 1) / heads < ratio:
            caps[m] = (heads - 1) / heads
    return caps


def tp_at_ratio(model: nn.Module, ratio: float, x: torch.Tensor) -> nn.Module:
    """Torch-Pruning's recipe at `ratio`, its output layers kept and every attention keeping a head."""
    return tp_prune(
        model, ratio, x, ignored_layers=output_layers(model), head_pruning_ratio_dict=head_caps(model, ratio)
    )


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
            try:
                torch.save(model, pickled)
            except Exception as e2:  # noqa: BLE001 - e.g. transformers' output hooks are local functions
                return f"no ({type(e).__name__}); torch.save fails too ({type(e2).__name__})"
            return f"no ({type(e).__name__}); torch.save only ({len(pickled.getvalue()) / 1e6:.0f} MB pickle)"
    with torch.no_grad():
        diff = float((back(pixel_values=x).logits - model(pixel_values=x).logits).abs().max())
    return f"yes (max diff {diff:.0e})"


SLIM = True


def measure(variant: Variant, model: nn.Module, x: torch.Tensor) -> None:
    variant.params, variant.macs = count_params(model), count_macs(model, x)
    variant.reload = reload_check(model, x)
    variant.onnx = to_onnx(model, x, slim=SLIM)


def time_all(
    variants: list[Variant], inputs: dict[str, np.ndarray], threads: int, rounds: int, iters: int
) -> None:
    """Every variant timed on its model's input, all in one process, in interleaved rounds."""
    opts = session_options(threads)  # vitshrink's own: subnormals flushed, as in bench and deploy
    sessions = [(v, ort.InferenceSession(v.onnx, opts, providers=["CPUExecutionProvider"])) for v in variants]
    for v, s in sessions:  # warm-up
        s.run(None, {"pixel_values": inputs[v.model]})
    for r in range(rounds):
        order = sessions if r % 2 == 0 else sessions[::-1]  # alternate order against drift
        for v, s in order:
            ts = []
            feed = {"pixel_values": inputs[v.model]}
            for _ in range(iters):
                t0 = time.perf_counter()
                s.run(None, feed)
                ts.append((time.perf_counter() - t0) * 1e3)
            v.medians.append(statistics.median(ts))


# -- main ---------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> tuple[list[Variant], dict[str, torch.Tensor]]:
    # torch work (pruning, export) single-threaded: on a shared 2-core box extra torch threads only spin
    torch.set_num_threads(1)
    ratios = [0.5] if args.quick else args.ratios
    variants: list[Variant] = []
    inputs: dict[str, torch.Tensor] = {}
    tmp = Path(tempfile.mkdtemp(prefix="prune-speed-"))
    for mname in args.models:
        size = SIZES.get(mname, 224)
        x = inputs[mname] = torch.randn(1, 3, size, size)
        torch.manual_seed(0)
        base = MODELS[mname]()
        v = Variant(mname, "base", 0.0)
        measure(v, base, x)
        variants.append(v)
        model_dir = save_for_prune(base, size, tmp / mname)
        for r in ratios:
            t0 = time.time()
            # before: the previous default, `prune --ratio R` = widths only, rounded to 8 on every CPU
            before = prune_model(copy.deepcopy(base), ratio=r, round_to=8, example_inputs=x)
            v = Variant(mname, "ours before (widths, round 8)", r)
            measure(v, before, x)
            variants.append(v)
            variants.append(default_variant(mname, r, model_dir, tmp / f"{mname}-{r}", x, v))
            print(f"{mname} r={r}: before + default pruned in {time.time() - t0:.1f}s", flush=True)
            recipes = [("tp", True)] + ([("tp-headdim", False)] if mname.startswith("swin") else [])
            for label, whole in recipes:
                v = Variant(mname, label, r)
                try:
                    m = copy.deepcopy(base)
                    theirs = tp_at_ratio(m, r, x) if whole else tp_prune(m, r, x, whole_heads=False)
                    with torch.no_grad():
                        theirs(pixel_values=x)
                    measure(v, theirs, x)
                except Exception as e:  # noqa: BLE001 - reported in the table
                    v.error = f"{type(e).__name__}: {str(e).splitlines()[0][:90]}"
                variants.append(v)
                if args.equal_params and not v.error:
                    variants += equal_params_variants(mname, base, x, v, variants)
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
    time_all(timed, {k: x.numpy() for k, x in inputs.items()}, args.threads, args.rounds, args.iters)
    return variants, inputs


def save_for_prune(model: nn.Module, size: int, out: Path) -> Path:
    """`model` as a vitshrink model directory, so the default `prune()` itself can prune it."""
    from vitshrink.artifacts import META_FORMAT
    from vitshrink.models import save_model

    labels = [str(i) for i in range(model.config.num_labels)]
    seg = "SemanticSegmentation" in type(model).__name__
    meta = {
        "format": META_FORMAT,
        "task": "segmentation" if seg else "classification",
        "family": family_for(model).name,
        "class_names": labels,
        "preprocess": {"mean": [0.5] * 3, "std": [0.5] * 3, "size": [size, size], "channels": 3},
    }
    return save_model(model, meta, out)


def default_variant(
    mname: str, r: float, model_dir: Path, out: Path, x: torch.Tensor, before: Variant
) -> Variant:
    """`prune --ratio R` as it runs now: the depth/width split at equal MACs measured here, widths
    rounded to this CPU's vector width (both chosen by prune() itself, which records them)."""
    from vitshrink.models import load_model
    from vitshrink.prune import prune

    _, m = prune(model_dir, out, ratio=r, quiet=True)
    net = load_model(out)[0].eval()
    opts = read_json(out / "vitshrink.json")["history"][-1]["options"]
    d, w, k = opts["depth_ratio"], opts["ratio"], m["round_to"]["multiple"]
    mlp = f", MLP {opts['ratio_mlp']:.2f}" if opts["ratio_mlp"] != w else ""
    v = Variant(mname, f"ours default (depth {d:g}, width {w:.2f}{mlp}, round {k})", r)
    measure(v, net, x)
    if v.params == before.params and v.macs == before.macs:
        v.same_as = before  # the same architecture: time it once
    return v


def equal_params_variants(
    mname: str, base: nn.Module, x: torch.Tensor, theirs: Variant, variants: list[Variant]
) -> list[Variant]:
    """ours at Torch-Pruning's parameter count (widths only, and `--depth-ratio auto` at it)."""
    r_eq = ratio_for_target(base, x, target_params=theirs.params)  # as prune --target-params
    m_eq = fill_budget(base, r_eq, x, target_params=theirs.params)
    eq = prune_model(copy.deepcopy(base), ratio=r_eq, ratio_mlp=m_eq, example_inputs=x)
    w = Variant(mname, f"ours@{theirs.name}", r_eq)
    w.same_as = next((o for o in variants if o.model == mname and o.params == count_params(eq)), None)
    if w.same_as is None:
        measure(w, eq, x)
    else:
        w.params, w.macs, w.reload = w.same_as.params, w.same_as.macs, w.same_as.reload
    return [w, auto_variant(mname, f"ours auto@{theirs.name}", r_eq, base, x, w, theirs.params)]


def auto_variant(
    mname: str, label: str, r: float, base: nn.Module, x: torch.Tensor, width_only: Variant, target: int = 0
) -> Variant:
    """`prune --depth-ratio auto` at `target` params (default: width_only's): the budget split between
    depth and width, fastest exported model on onnxruntime here (as prune() measures) wins."""
    d, w, m, _ = choose_shape(
        base, x, [x], lambda nets: _latencies_ms(nets, x), target_params=target or width_only.params
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


GOAL = 0.85  # the default's speed-up should be at least this share of its MAC reduction (DeiT, Swin)


def efficiency(variants: list[Variant]) -> str:
    """Per model and ratio: speed-up / MAC reduction of the previous default, today's default and
    Torch-Pruning at the same ratio (1.0 = latency falls exactly as MACs do)."""
    base = {v.model: v for v in variants if v.name == "base"}

    def eff(v: Variant | None) -> str:
        if v is None or v.error:
            return "-"
        b = base[v.model]
        return f"{(b.latency / v.latency) / (b.macs / v.macs):.2f} ({b.macs / v.macs:.2f}x MACs)"

    lines = [
        "| model | ratio | before: widths, round 8 | default: depth+width, CPU rounding | Torch-Pruning |",
        "|---|---|---|---|---|",
    ]
    for m in base:
        for r in sorted({v.ratio for v in variants if v.model == m and v.name != "base"}):
            pick = {
                k: next((v for v in variants if v.model == m and v.ratio == r and v.name.startswith(k)), None)
                for k in ("ours before", "ours default", "tp")
            }
            if pick["ours default"] is None:
                continue
            lines.append(
                f"| {m} | {r:g} | {eff(pick['ours before'])} | {eff(pick['ours default'])} | {eff(pick['tp'])} |"
            )
    return "\n".join(lines)


def recovery_accuracy(teacher: Path, ratio: float, epochs: int, limit: int, seed: int = 0) -> str:
    """Accuracy after the same recovery: `prune --ratio R` widths only vs the default (depth + width),
    both distilled from the unpruned teacher on `limit` training images for `epochs`; test split."""
    from vitshrink.evaluate import eval_dataset, evaluate_model
    from vitshrink.models import load_model
    from vitshrink.prune import prune

    t_meta = load_model(teacher)[1]
    test = eval_dataset("fashion-mnist", "test", t_meta)
    lines = [
        "| prune --ratio {r:g}, {e} recovery epoch(s) on {n} images, seed {s} | depth | params | MACs | test top-1 |"
    ]
    lines[0] = lines[0].format(r=ratio, e=epochs, n=limit, s=seed) + "\n|---|---|---|---|---|"
    with tempfile.TemporaryDirectory() as d:
        for label, depth in (("widths only (--depth-ratio 0)", 0.0), ("default (depth + width)", None)):
            t0 = time.time()
            out, m = prune(
                teacher,
                Path(d) / label[:6],
                ratio=ratio,
                depth_ratio=depth,
                recover_epochs=epochs,
                data="fashion-mnist",
                limit=limit,
                seed=seed,
                quiet=True,
            )
            net, meta = load_model(out)
            acc = evaluate_model(net, meta, test, quiet=True)["accuracy"]
            chosen = read_json(out / "vitshrink.json")["history"][-1]["options"]["depth_ratio"]
            check = m.get("shape_check")  # the default's race: split vs widths only, val after recovery
            why = f" (val: split {check['split']:.4f}, widths {check['widths_only']:.4f})" if check else ""
            lines.append(
                f"| {label} | {chosen:g}{why} | {m['params_after'] / 1e6:.3f} M | {m['macs_after'] / 1e6:.1f} M | "
                f"{acc:.4f} |"
            )
            print(lines[-1], f"({time.time() - t0:.0f}s)", flush=True)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="ratio 0.5 only and fewer rounds")
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    ap.add_argument(
        "--equal-params",
        action="store_true",
        help="also ours at Torch-Pruning's parameter count (widths only, and --depth-ratio auto)",
    )
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
    ap.add_argument(
        "--accuracy",
        type=Path,
        metavar="TEACHER",
        help="only compare accuracy after recovery (widths only vs default) on this Fashion-MNIST model dir",
    )
    ap.add_argument("--recover-epochs", type=int, default=1)
    ap.add_argument("--recover-limit", type=int, default=10000)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="--accuracy: recovery seeds")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    args = ap.parse_args()
    if args.accuracy:
        for r in [0.5] if args.quick else args.ratios:
            for seed in args.seeds:
                print(recovery_accuracy(args.accuracy, r, args.recover_epochs, args.recover_limit, seed))
        return
    load = os.getloadavg()[0]
    args.threads = (1 if load > 1.0 else 2) if args.threads == "auto" else int(args.threads)
    print(f"load average {load:.1f}: ONNX Runtime with {args.threads} intra-op thread(s)", flush=True)
    args.rounds = args.rounds or (3 if args.quick else 9)
    args.iters = args.iters or (5 if args.quick else 10)
    global SLIM
    SLIM = not args.no_slim
    t0 = time.time()
    variants, _ = run(args)
    print()
    print(table(variants))
    print()
    print(
        "speed-up / MAC reduction (latency factor over MAC factor; goal for the default: >= "
        f"{GOAL} on DeiT and Swin, and >= Torch-Pruning's)"
    )
    print(efficiency(variants))
    base = {v.model: v for v in variants if v.name == "base"}

    def kind(v: Variant) -> str:  # "ours auto (depth 0.5, width 0.41)" -> "ours auto"
        return v.name.split(" (")[0]

    for name in sorted({kind(v) for v in variants if v.name.startswith("ours") and "@" not in v.name}):
        ours = [v for v in variants if kind(v) == name and not v.error]
        worst = min((base[v.model].latency / v.latency) / (base[v.model].macs / v.macs) for v in ours)
        print(f"worst speed-up / MAC-reduction for {name}: {worst:.2f}")
    print(
        f"ORT threads={args.threads} (load average {load:.1f}), onnxslim={SLIM}, rounds={args.rounds}, iters={args.iters}, "
        f"total {time.time() - t0:.0f}s"
    )


if __name__ == "__main__":
    main()
