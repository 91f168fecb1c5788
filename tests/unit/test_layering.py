"""methods/ is layered one way: core at the bottom, then data, models, attacks, and defenses on top; a layer
imports only its own and the layers below it, no module imports itself back round a cycle, and nothing in
methods/ imports ray, mlflow or the orchestrator (docs/architecture.md). Read from the source with `ast`, so an
import counts wherever it sits: at the top, inside a function (lazy) or under `if TYPE_CHECKING:`."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("core", "data", "models", "attacks", "defenses")
# The root package wires the layers together (it declares every method), so it sits above all of them.
TOP = len(LAYERS)
FORBIDDEN = ("ray", "mlflow", "orchestrator")


class Import(NamedTuple):
    path: str
    line: int
    module: str  # the importing module
    target: str  # the imported module (or, for a name that is no module, the module it comes from)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, module: str, is_package: bool, path: str, known: set[str]) -> list[Import]:
    """Every import statement of `source`, relative ones resolved against `module`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [Import(path, node.lineno, module, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".")
                package = package[: len(package) - node.level + (1 if is_package else 0)]
                base = ".".join(package + ([node.module] if node.module else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.append(Import(path, node.lineno, module, submodule if submodule in known else base))
    return found


def package_imports(package: str) -> list[Import]:
    files = sorted((ROOT / package).rglob("*.py"))
    known = {module_name(f) for f in files}
    return [
        imp
        for f in files
        for imp in imports_of(f.read_text(), module_name(f), f.name == "__init__.py", str(f.relative_to(ROOT)), known)
    ]


def layer(module: str) -> int:
    parts = module.split(".")
    if parts == ["methods"]:
        return TOP
    assert parts[1] in LAYERS, f"{module} is in no layer: place methods/{parts[1]} in LAYERS"
    return LAYERS.index(parts[1])


def methods_imports() -> list[Import]:
    return package_imports("methods")


def in_methods(module: str) -> bool:
    return module == "methods" or module.startswith("methods.")


def cycles(edges: dict[str, set[str]]) -> list[tuple[list[str], set[str]]]:
    """Each set of modules that import each other round (a strongly connected component, Tarjan's algorithm) with
    one cycle through it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for succ in sorted(edges.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = set()
            while node not in component:
                component.add(stack.pop())
            if len(component) > 1 or node in edges.get(node, ()):
                found.append((cycle_through(node, component, edges), component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def cycle_through(start: str, component: set[str], edges: dict[str, set[str]]) -> list[str]:
    """The shortest path from `start` back to itself inside its component (breadth first)."""
    paths = {succ: [start, succ] for succ in sorted(edges[start]) if succ in component}
    frontier = list(paths)
    while start not in paths:
        node = frontier.pop(0)
        for succ in sorted(edges[node]):
            if succ in component and succ not in paths:
                paths[succ] = paths[node] + [succ]
                frontier.append(succ)
    return paths[start]


def test_the_walker_sees_lazy_type_checking_and_relative_imports():
    source = (
        "from typing import TYPE_CHECKING\nfrom . import engine, accuracy\nfrom ..data import configs\n"
        "if TYPE_CHECKING:\n    from methods.attacks.base import Backdoor\n"
        "def run():\n    import methods.defenses.shared.canary\n"
    )
    known = {"methods.core.engine", "methods.data.configs", "methods.attacks.base", "methods.defenses.shared.canary"}
    found = imports_of(source, "methods.core.method", False, "method.py", known)
    assert sorted((imp.line, imp.target) for imp in found if in_methods(imp.target)) == [
        (2, "methods.core"),
        (2, "methods.core.engine"),
        (3, "methods.data.configs"),
        (5, "methods.attacks.base"),
        (7, "methods.defenses.shared.canary"),
    ]
    assert [imp.target for imp in imports_of("from . import x\n", "methods.core", True, "", set())] == ["methods.core"]


def assert_no_import_cycle(package: str) -> None:
    edges: dict[str, set[str]] = {}
    for imp in package_imports(package):
        if (imp.target == package or imp.target.startswith(f"{package}.")) and imp.target != imp.module:
            edges.setdefault(imp.module, set()).add(imp.target)
    found = cycles(edges)
    shown = [
        f"{' -> '.join(cycle)} ({len(knot)} modules import each other round: {', '.join(sorted(knot))})"
        for cycle, knot in found
    ]
    assert not found, f"import cycles in {package}/:\n" + "\n".join(shown)


def test_methods_has_no_import_cycle():
    assert_no_import_cycle("methods")


def test_orchestrator_has_no_import_cycle():
    """One job per module (docs/architecture.md) only holds if no two of them need each other: a table module
    that reached back into the study that renders it, or a sweep runner and a placement that called each other,
    made every change to one a change to the other."""
    assert_no_import_cycle("orchestrator")


def test_every_import_goes_down_the_layers():
    upward = [
        f"{imp.path}:{imp.line} imports {imp.target} ({LAYERS[layer(imp.module)]} may not import "
        f"{'the root package' if layer(imp.target) == TOP else LAYERS[layer(imp.target)]})"
        for imp in methods_imports()
        if in_methods(imp.target) and layer(imp.target) > layer(imp.module)
    ]
    assert not upward, f"imports against the layer order {' < '.join(LAYERS)}:\n" + "\n".join(upward)


def test_methods_imports_neither_ray_nor_mlflow_nor_the_orchestrator():
    bad = [
        f"{imp.path}:{imp.line} imports {imp.target}"
        for imp in methods_imports()
        if imp.target.split(".")[0] in FORBIDDEN
    ]
    assert not bad, "methods/ must run on a box with torch alone:\n" + "\n".join(bad)
