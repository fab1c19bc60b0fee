"""Choices, value types and the `Option` declaration with its one range/choice check."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ModelError

# -- choices ------------------------------------------------------------------------------------------
QUANT_MODES = ("fp16", "int8-dynamic", "int8-static", "int8-mixed", "int8")
CALIB_METHODS = ("minmax", "percentile", "entropy", "distribution")
RUNTIMES = ("auto", "onnxruntime", "openvino")
IMPORTANCES = ("magnitude", "taylor", "random")
GRANULARITIES = ("heads", "mlp", "embed", "channels")
ONNX_FORMATS = ("auto", "file", "dir")
AMP_MODES = ("auto", "on", "off")
SPLITS = ("train", "val", "test")
DEFAULT_OPSET = 17
# The oldest opset with scaled_dot_product_attention in the exporter (every family's attention needs
# it); below it the exporter would fail and the dynamo fallback silently raise the opset to 18. No upper
# bound: an opset onnxruntime cannot load is refused by export's own load check.
MIN_OPSET = 14


# -- value types: argparse parses text with them, recipes and the API check values with them ----------
@dataclass(frozen=True)
class Number:
    """An int/float within [lo, hi] (lo / hi excluded unless lo_ok / hi_ok), NaN/inf refused.

    Called on text it is an argparse type; `reason(value)` checks a value (recipes, the API).
    `message`, when set, replaces the CLI's "must be ..." (with {v} for the value).
    """

    kind: type
    lo: float
    lo_ok: bool = True
    hi: float | None = None
    hi_ok: bool = True
    message: str | None = None

    @property
    def __name__(self) -> str:  # argparse names the type in its own messages
        return self.kind.__name__

    @property
    def types(self) -> tuple[type, ...]:
        return (int,) if self.kind is int else (int, float)

    def _ok(self, v: float) -> bool:
        low_ok = v >= self.lo if self.lo_ok else v > self.lo
        high_ok = self.hi is None or (v <= self.hi if self.hi_ok else v < self.hi)
        return math.isfinite(v) and low_ok and high_ok

    def __call__(self, text: str) -> Any:
        try:
            v = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if self.kind is int else 'a number'}, got '{text}'"
            ) from None
        if not self._ok(v):
            raise argparse.ArgumentTypeError(self.refusal(v, text))
        return v

    def refusal(self, v: Any, text: str | None = None) -> str:
        """The one-line refusal of an out-of-range `v` (as typed: `text`) on the command line or the API."""
        if self.message:
            return self.message.format(v=v)
        rng = f"{'>=' if self.lo_ok else '>'} {self.lo:g}"
        rng += f" and {'<=' if self.hi_ok else '<'} {self.hi:g}" if self.hi is not None else ""
        return f"must be {rng}, got '{v if text is None else text}'"

    def reason(self, v: Any) -> str | None:
        """Why the number `v` is out of range (None: it is fine), as recipes word it."""
        if self._ok(v):
            return None
        if self.hi is not None:
            return (
                f"must be in {'[' if self.lo_ok else '('}{self.lo:g}, {self.hi:g}{']' if self.hi_ok else ')'}"
            )
        if self.kind is int and self.lo_ok and self.lo == 1:
            return "must be > 0"
        return f"must be {'>=' if self.lo_ok else '>'} {self.lo:g}"


def number(
    kind: type, lo: float, *, lo_ok: bool = True, hi: float | None = None, hi_ok: bool = True
) -> Number:
    """An argparse type (and value check): an int/float within [lo, hi], NaN/inf refused."""
    return Number(kind, lo, lo_ok, hi, hi_ok)


POS_INT = number(int, 1)
NONNEG_INT = number(int, 0)
POS_FLOAT = number(float, 0, lo_ok=False)
NONNEG_FLOAT = number(float, 0)
UNIT = number(float, 0, hi=1)
FRACTION = number(float, 0, hi=1, hi_ok=False)  # [0, 1): a fraction to remove (all of it is no model)
SEED = number(int, 0)
OVERLAP = number(float, 0, hi=0.9)
OPSET = Number(
    int, MIN_OPSET, message=f"opset {{v}} is not supported: vitshrink exports opset {MIN_OPSET} or newer"
)


class _FractionOrAuto:
    """A FRACTION or the word 'auto' (prune's depth_ratio)."""

    __name__ = "fraction_or_auto"
    types = (float, int, str)

    def __call__(self, v: str) -> float | str:
        return "auto" if v == "auto" else FRACTION(v)

    def reason(self, v: Any) -> str | None:
        if isinstance(v, str):
            return None if v == "auto" else "must be a number in [0, 1) or 'auto'"
        ok = not isinstance(v, bool) and 0 <= v < 1
        return None if ok else "must be a number in [0, 1) or 'auto'"


fraction_or_auto = _FractionOrAuto()


class _Resolution:
    """The size a network runs at inside its graph (export/quantize --resolution): H or HxW pixels, or
    a fraction in (0, 1] of the deployed size (0.5 = half the side)."""

    __name__ = "resolution"
    types = (float, int, str, list)

    def __call__(self, v: str) -> float | tuple[int, int]:
        why = self.reason(v)
        if why:
            raise argparse.ArgumentTypeError(f"{why}, got '{v}'")
        return parse_resolution(v)

    def reason(self, v: Any) -> str | None:
        try:
            parse_resolution(v)
        except ModelError:
            return "must be H or HxW pixels, or a fraction in (0, 1] of the deployed size"
        return None


def parse_resolution(v: Any) -> float | tuple[int, int]:
    """--resolution as (H, W) pixels, or a float fraction in (0, 1]; ModelError otherwise."""
    if isinstance(v, bool):
        raise ModelError(f"resolution must be H[xW] pixels or a fraction, got {v!r}")
    if isinstance(v, float) or (isinstance(v, str) and "." in v and "x" not in v.lower()):
        try:
            f = float(v)
        except ValueError:
            raise ModelError(f"resolution must be H[xW] pixels or a fraction, got {v!r}") from None
        if not (math.isfinite(f) and 0 < f <= 1):
            raise ModelError(f"a resolution fraction must be in (0, 1], got {v!r}")
        return f
    return parse_image_size(v)


resolution = _Resolution()


def key_value_pairs(text: str, *, skip_empty: bool = False) -> list[tuple[str, str]]:
    """`k=v,k=v` -> [(k, v)] (keys stripped, values as written); ValueError names a part without '='.
    The one `key=value` parser: --data-opt (`key_values`) and compress budgets use it."""
    parts = text.split(",")
    if skip_empty:
        parts = [p.strip() for p in parts if p.strip()]
    out = []
    for part in parts:
        if "=" not in part:
            raise ValueError(f"expected key=value, got '{part}'")
        k, v = part.split("=", 1)
        out.append((k.strip(), v))
    return out


def key_values(text: str) -> dict[str, Any]:
    """An argparse type: `k=v,k=v` -> dict (values that read as JSON become numbers etc.)."""
    if not text:
        return {}
    try:
        pairs = key_value_pairs(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    out: dict[str, Any] = {}
    for k, v in pairs:
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v.strip()
    return out


def parse_image_size(text: str | int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """ "512" -> (512, 512), "512x384" -> (512, 384) (height x width); also ints and pairs."""
    if isinstance(text, int) and not isinstance(text, bool):
        parts: list[Any] = [text, text]
    elif isinstance(text, (tuple, list)):
        parts = list(text)
    else:
        parts = str(text).lower().replace("*", "x").split("x")
        parts = parts * 2 if len(parts) == 1 else parts
    try:
        h, w = (int(p) for p in parts)
    except (TypeError, ValueError):
        raise ModelError(f"image size must be H or HxW in pixels, got {text!r}") from None
    if h < 1 or w < 1:
        raise ModelError(f"image size must be positive, got {text!r}")
    return h, w


def image_size(text: str) -> tuple[int, int]:
    """An argparse type: H or HxW (height x width)."""
    try:
        return parse_image_size(text)
    except ModelError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _losses(v: Any) -> str | None:
    if isinstance(v, list) and not all(isinstance(x, str) for x in v):
        return "must be a loss name, a list of names or a {name: weight} mapping"
    if isinstance(v, dict) and not all(
        isinstance(k, str) and isinstance(w, int | float) and not isinstance(w, bool) for k, w in v.items()
    ):
        return "must map loss names to numeric weights"
    return None


def _granularity(v: Any) -> str | None:
    if v == "auto":
        return None
    parts = v.split(",") if isinstance(v, str) else v
    if not all(isinstance(p, str) for p in parts):
        return f"must be names from {', '.join(GRANULARITIES)}"
    bad = [p for p in parts if p.strip() not in GRANULARITIES]
    return f"unknown {bad} (choose from {', '.join(GRANULARITIES)})" if bad else None


# -- declarations -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Option:
    """One argument of a command (a keyword of its function), as the CLI and recipes expose it.

    name: the Python keyword, argparse dest and recipe key; flag: the CLI flag (default
    --name-with-dashes; `aliases` add more); positional: a positional CLI argument; required: a required
    CLI flag; parse: argparse type (a `Number` also gives the recipe type and range); choices;
    action: argparse action for flags ("store_false" for --no-x); nargs (the default stays the
    function's); metavar; cli / recipe: where it is exposed (API-only options have both False);
    group: a mutually exclusive CLI group; section: a titled CLI argument group (help layout);
    types / check: the recipe types and value check where `parse` does not give them;
    recipe_required: a recipe stage must give it; kwarg: the function's keyword when it differs from
    name (None and api False: a CLI-only argument the command's handler maps itself).
    """

    name: str
    default: Any
    help: str | None
    parse: Callable[[str], Any] | None = None
    choices: Sequence[Any] | None = None
    flag: str | None = None
    action: str | None = None
    nargs: str | None = None
    metavar: str | None = None
    cli: bool = True
    recipe: bool = True
    group: str | None = None  # mutually exclusive CLI group
    aliases: tuple[str, ...] = ()
    positional: bool = False
    required: bool = False
    section: str | None = None
    types: tuple[type, ...] | None = None
    check: Callable[[Any], str | None] | None = None
    recipe_required: bool = False
    kwarg: str | None = None
    api: bool = True

    @property
    def cli_flag(self) -> str:
        return self.name if self.positional else self.flag or "--" + self.name.replace("_", "-")

    @property
    def keyword(self) -> str:
        return self.kwarg or self.name

    @property
    def value_types(self) -> tuple[type, ...]:
        """The types a recipe (YAML) value may have."""
        if self.types is not None:
            return self.types
        if self.action in ("store_true", "store_false"):
            return (bool,)
        return getattr(self.parse, "types", (str,))

    @property
    def value_check(self) -> Callable[[Any], str | None] | None:
        return self.check or getattr(self.parse, "reason", None)


def check(o: Option, value: Any) -> str | None:
    """Why `value` (of one of `o.value_types`) is not allowed for `o` (None: it is): its choices and
    range. The one value check: recipes (after their type check), the CLI's types and `validate` use it."""
    if o.choices is not None and value not in o.choices:
        return f"must be one of {', '.join(map(str, o.choices))}"
    fn = o.value_check
    return fn(value) if fn is not None else None


def validate(options: Iterable[Option], values: Mapping[str, Any]) -> None:
    """Check the given keyword values of a stage function (None: not given) against their declarations;
    a bad one raises a one-line VitshrinkError ("recover temperature must be > 0, got 0.0")."""
    from ..errors import VitshrinkError

    for o in options:
        v = values.get(o.name)
        if o.name not in values or v is None:
            continue
        types = o.value_types
        if not (isinstance(v, types) and (bool in types or not isinstance(v, bool))):
            continue  # the API also takes e.g. tuples and paths; only values of the declared type are checked
        if reason := check(o, v):
            raise VitshrinkError(f"{o.name.replace('_', ' ')} {reason}, got {v!r}")


def _arg(name: str, default: Any, help: str | None, parse: Any = None, **kw: Any) -> Option:
    """A command argument that is not a recipe option (inputs, outputs, run settings)."""
    return Option(name, default, help, parse, recipe=False, **kw)
