"""The static import graph of ``aiserver``: which module imports which, outside type checking."""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

import aiserver

__all__ = ["ROOT", "module_imports", "modules", "package_graph", "unit_of"]

ROOT = Path(aiserver.__file__).parent


def modules() -> list[str]:
    """Every module of the package, dotted (``aiserver.jobs.store``)."""
    names = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(parts))
    return names


def _path_of(module: str) -> Path:
    base = ROOT.parent.joinpath(*module.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node except the bodies of ``if TYPE_CHECKING:`` blocks."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def module_imports(module: str) -> set[str]:
    """Modules ``module`` imports at run time (lazy imports in functions included)."""
    path = _path_of(module)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    known = set(modules())
    return {name for name in found if name in known or not name.startswith("aiserver")}


def unit_of(module: str) -> str:
    """The package-level unit: ``aiserver.jobs.store`` -> ``jobs``, ``aiserver.config`` ->
    ``config`` (a top-level module is its own unit)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def package_graph() -> Mapping[str, set[str]]:
    """Unit -> units it imports (aiserver's own only, self-imports left out)."""
    graph: dict[str, set[str]] = {}
    for module in modules():
        unit = unit_of(module)
        targets = graph.setdefault(unit, set())
        for imported in module_imports(module):
            if imported.startswith("aiserver.") and unit_of(imported) != unit:
                targets.add(unit_of(imported))
    return graph
