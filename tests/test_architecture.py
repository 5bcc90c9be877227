"""The package's shape, checked so it stays the one ARCHITECTURE.md describes: imports run one way
between the folders, no module imports itself back through a circle, modules and functions stay
readable sizes, and no module reaches into another's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sqa_search"

# a folder may import the folders listed after it, never one listed before it
LAYERS = ["cli", "decide", "search", "speed", "quality", "layer", "base"]
BASE = {"common", "errors", "_format", "_figures", "__init__"}  # shared, at the bottom
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _folder(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "base"  # the package's own __init__
    return parts[1] if parts[1] in LAYERS else "base"


def _imports(module: str, path: Path, known: set[str]):
    """(imported module, imported names, line) for every sqa_search import, resolved."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("sqa_search"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in known:  # `from . import cost`: the module itself
                    yield sub, [], node.lineno
                else:
                    yield target, [alias.name], node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("sqa_search"):
                    yield alias.name, [], node.lineno


def _graph():
    mods = _modules()
    known = set(mods)
    return mods, {m: list(_imports(m, p, known)) for m, p in mods.items()}


def test_folders_import_one_way():
    _, graph = _graph()
    wrong = []
    for module, imports in graph.items():
        mine = LAYERS.index(_folder(module))
        for target, _, line in imports:
            if target == "sqa_search":
                continue  # __version__
            theirs = LAYERS.index(_folder(target))
            if theirs < mine:
                wrong.append(f"{module}:{line} imports {target} ({_folder(module)}/ may not import {_folder(target)}/)")
    assert not wrong, "\n".join(wrong)


def test_layer_imports_nothing_outside_layer():
    """layer/ is inlined into exported modules: it may import only itself, torch and the stdlib."""
    _, graph = _graph()
    wrong = [f"{m}:{line} imports {t}" for m, imports in graph.items() if _folder(m) == "layer"
             for t, _, line in imports if _folder(t) != "layer"]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    _, graph = _graph()
    edges = {m: {t for t, _, _ in imports if t in graph and t != m and t != "sqa_search"} for m, imports in graph.items()}
    # package __init__ files re-export lazily; an edge into a package is an edge into its __init__
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == "open":
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "\n".join(cycles)


def test_no_private_name_crosses_modules():
    _, graph = _graph()
    wrong = [f"{m}:{line} imports {name} from {t}" for m, imports in graph.items()
             for t, names, line in imports for name in names
             if name.startswith("_") and not name.startswith("__") and t != m]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("module", sorted(_modules()))
def test_module_and_function_sizes(module):
    path = _modules()[module]
    text = path.read_text()
    lines = len(text.splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.relative_to(PACKAGE.parent)} has {lines} lines (at most {MAX_MODULE_LINES})"
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
            for node in ast.walk(ast.parse(text))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path.relative_to(PACKAGE.parent)}: functions over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"
