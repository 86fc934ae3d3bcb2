"""The package's shape: every module imports on its own, and dependencies point one way."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.structure.imports import module_imports, modules, package_graph, unit_of

# A room knows only the rooms below it (architecture.md); these are the rules the code keeps.
FORBIDDEN = {
    "providers": {"jobs", "api", "gateway", "server", "config", "provider_config"},
    "jobs": {"api", "gateway", "server", "config"},
    "stages": {"jobs", "providers"},
    "gateway": {"api", "jobs", "providers"},  # the HTTP shim is a gRPC client of the service
}
TRANSPORT = ("grpc", "grpc_status", "grpc_health", "grpc_reflection", "imagetasks")


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for nxt in graph.get(todo.pop(), set()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_every_module_imports_alone() -> None:
    """Each module, imported first in an interpreter holding no other ``aiserver`` module, so an
    import that only works after another (a cycle resolved by luck) fails here."""
    script = textwrap.dedent(
        """
        import importlib, sys, traceback
        failed = []
        for name in sys.argv[1:]:
            for loaded in [m for m in sys.modules if m == "aiserver" or m.startswith("aiserver.")]:
                del sys.modules[loaded]
            try:
                importlib.import_module(name)
            except BaseException:
                failed.append(name + ": " + traceback.format_exc(limit=3))
        print("\\n".join(failed))
        sys.exit(1 if failed else 0)
        """
    )
    names = [m for m in modules() if not m.endswith("__main__")]  # __main__ runs the CLI
    assert len(names) > 80
    done = subprocess.run(
        [sys.executable, "-c", script, *names],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_package_graph_has_no_cycle() -> None:
    graph = dict(package_graph())
    cycles = sorted(unit for unit in graph if unit in reachable(graph, unit))
    assert cycles == [], {unit: sorted(graph[unit]) for unit in cycles}


def test_dependencies_point_down() -> None:
    graph = package_graph()
    broken = {
        unit: sorted(graph.get(unit, set()) & banned)
        for unit, banned in FORBIDDEN.items()
        if graph.get(unit, set()) & banned
    }
    assert broken == {}


def test_nothing_below_the_api_imports_grpc() -> None:
    graph = dict(package_graph())
    below = reachable(graph, "api") - {"api"}
    assert {"jobs", "providers", "artifacts", "imaging", "stages"} <= below
    offenders = {
        module: sorted(i for i in module_imports(module) if i.split(".")[0] in TRANSPORT)
        for module in modules()
        if unit_of(module) in below
    }
    assert {m: found for m, found in offenders.items() if found} == {}


def test_the_checks_see_imports() -> None:
    """The graph is not vacuous: known edges are in it, type-checking-only ones are not."""
    graph = package_graph()
    assert {"providers", "errors", "stages"} <= graph["jobs"]
    assert "grpc" in module_imports("aiserver.server")
    assert "aiserver.jobs.manager" not in module_imports("aiserver.metrics")  # TYPE_CHECKING
    assert "aiserver.providers.comfy.settings" in module_imports("aiserver.config")
