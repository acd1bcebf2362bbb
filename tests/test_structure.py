"""The shape of the code base: no import circle among the library's modules (imports inside
functions count: a deferred import is still an arrow back up), and nothing under
benchmarks/ or examples/ reaching into the command line's module."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"spsft_jax": ROOT / "spsft_jax", "spsft_jax.interop": ROOT / "interop"}


def _module_files() -> dict[str, Path]:
    files = {}
    for package, folder in PACKAGES.items():
        for f in folder.glob("*.py"):
            files[package if f.stem == "__init__" else f"{package}.{f.stem}"] = f
    return files


def _imports(path: Path) -> set[str]:
    """Every `spsft_jax` module `path` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("spsft_jax"):
            if node.module in PACKAGES:  # `from spsft_jax import llama` names a module
                found |= {f"{node.module}.{a.name}" for a in node.names}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("spsft_jax")}
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the library modules it imports (package `__init__`s left out: they gather)."""
    files = _module_files()
    modules = {m for m in files if m not in PACKAGES}
    return {m: {d for d in _imports(files[m]) if d in modules and d != m} for m in modules}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_library_has_no_import_circle():
    graph = import_graph()
    assert len(graph) > 20 and "spsft_jax.layerwise" in graph["spsft_jax.train"]
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_scripts_do_not_import_the_command_line_module():
    offenders = [str(f.relative_to(ROOT)) for folder in ("benchmarks", "examples")
                 for f in (ROOT / folder).rglob("*.py")
                 if any(m == "spsft_jax.cli" or m.startswith("spsft_jax.cli_") for m in _imports(f))]
    assert offenders == []
