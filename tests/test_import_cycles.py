"""No import circles between vitshrink's modules, counting imports inside functions too.

A lazy import inside a function hides a circle from the interpreter but not from the reader: two
modules that need each other are one module, or share a piece that belongs in a third. Imports of a
module's own parent packages are left out (Python initialises those first, whatever the module does).
Importing `a.b.c` runs `a.b`'s __init__ first, so it counts as importing `a.b` too: a lazy
`from .deploy._meta import x` inside a function loads all of `deploy` at run time, and whatever that
imports must not lead back.
"""

from __future__ import annotations

import ast
from pathlib import Path

import vitshrink

SRC = Path(vitshrink.__file__).parent


def _modules() -> dict[str, tuple[Path, bool]]:
    mods = {}
    for f in SRC.rglob("*.py"):
        parts = ["vitshrink", *f.relative_to(SRC).with_suffix("").parts]
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the vitshrink modules it imports anywhere in its body."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for mod, (path, is_pkg) in mods.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - node.level + 1] + ([node.module] if node.module else [])
                    target = ".".join(base)
                else:
                    target = node.module or ""
                # `from pkg import sub` depends on the submodule; `from pkg import name` on pkg
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
                names = subs if len(subs) == len(node.names) else [target, *subs]
            else:
                continue
            # importing a.b.c initialises a.b first: the package's __init__ runs at run time too
            names += [".".join(n.split(".")[:i]) for n in names for i in range(2, n.count(".") + 1)]
            deps |= {n for n in names if n in mods and n != mod and not mod.startswith(n + ".")}
        graph[mod] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_the_checker_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    g = import_graph()
    assert "vitshrink.compress.runner" in g["vitshrink.demo"]  # lazy imports count
    assert "vitshrink.deploy.tiling" in g["vitshrink.deploy._base"]  # `from . import tiling`
    # `from ..deploy._meta import ...` runs deploy/__init__ (runtime, predict, ...) too
    assert {"vitshrink.deploy", "vitshrink.deploy._meta"} <= g["vitshrink.quantize.files"]


def test_no_import_circles():
    found = cycles(import_graph())
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)
