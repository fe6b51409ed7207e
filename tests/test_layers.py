"""The package's structure: imports go one way down the layers (docs/architecture.md)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "jisac"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> tuple[set[str], list[str]]:
    """``(jisac modules imported anywhere in the file, those imported inside a function)``."""
    tree = ast.parse(path.read_text())
    found, nested = set(), []
    known = {_module_name(p) for p in PACKAGE.rglob("*.py")}

    def names(node) -> set[str]:
        out = set()
        if isinstance(node, ast.Import):
            out = {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from jisac import align`` imports the module jisac.align; ``from jisac.io import outputs`` the
            # module jisac.io.outputs; ``from jisac.rows import Rows`` the module jisac.rows
            out = {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                   for a in node.names}
        return {m for m in out if m in known}

    for node in ast.walk(tree):
        found |= names(node)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                nested += sorted(names(inner))
    return found, nested


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        found, _ = _imports(path)
        # a package's __init__ that re-exports its modules is not an import of the package by them
        graph[name] = {m for m in found if m != name and not (name.startswith(m + ".") and m != "jisac")}
    return graph


def test_no_import_circle_inside_the_package():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_no_package_import_hidden_inside_a_function():
    hidden = {}
    for path in PACKAGE.rglob("*.py"):
        _, nested = _imports(path)
        if nested:
            hidden[_module_name(path)] = nested
    assert hidden == {}, f"imports of jisac modules inside functions (they hide the layering): {hidden}"


def test_every_module_says_its_layer_first():
    layers = ("Data layer", "Algorithm layer", "Execution layer", "Workflow layer", "Configuration layer",
              "Interface layer", "Formats layer")
    missing = []
    for path in PACKAGE.rglob("*.py"):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if path.name not in ("__main__.py",) and not doc.startswith(layers):
            missing.append(_module_name(path))
    assert missing == [], f"module docstrings that do not name their layer first: {sorted(missing)}"
