"""The packages' layering: no import circle among chatapp's and engine's modules, nor among their
subpackages (function-local imports included); engine imports nothing of chatapp, kernels nothing
of either."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("chatapp", "engine", "kernels")


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in the file)."""
    modules = {_module(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def _circle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` (as a path that ends where it starts), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def _unit(module: str) -> str:
    """The subpackage a module belongs to (engine.model, chatapp.tui, kernels), or the module
    itself when it sits at a package's top (engine.session, chatapp.cli)."""
    parts = module.split(".")
    if parts[0] == "kernels" or len(parts) == 1:
        return parts[0]
    return ".".join(parts[:2]) if len(parts) > 2 or (ROOT / parts[0] / parts[1]).is_dir() else module


def test_no_import_circle():
    circle = _circle(import_graph())
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_no_circle_between_subpackages():
    units: dict[str, set[str]] = {}
    for module, deps in import_graph().items():
        units.setdefault(_unit(module), set()).update(_unit(d) for d in deps)
    for unit, deps in units.items():
        deps.discard(unit)
    circle = _circle(units)
    assert circle is None, "import circle between subpackages: " + " -> ".join(circle)


def test_imports_point_down():
    for module, deps in import_graph().items():
        top = module.split(".")[0]
        below = {"chatapp": PACKAGES, "engine": ("engine", "kernels"), "kernels": ("kernels",)}[top]
        wrong = sorted(d for d in deps if d.split(".")[0] not in below)
        assert not wrong, f"{module} imports {wrong}"
