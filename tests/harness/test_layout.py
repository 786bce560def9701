"""The house plan: harness/ reads as floors (engine, zoo, suite, cli) and no import climbs or cycles.

Every module's imports are read with `ast`, function-level ones included, so a lazy import inside a
function counts as much as one at the top of the file.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"harness": "neuronbench.harness", "tasks": "neuronbench.tasks",
            "baselines": "neuronbench.baselines", "leaderboard": "neuronbench.leaderboard"}

# Floors, bottom to top: a module may import its own room and any lower floor, nothing else.
# The root package holds only `__version__`. The `evaluate` metric modules live in the engine
# (harness/engine/hf_metrics, one folder each, as package data). Tasks and methods are plug-ins on
# the suite: neither imports the other; the leaderboard replays both; the command line stands on everything.
FLOORS = {"harness": 0, "harness.engine": 1, "harness.zoo": 2, "harness.suite": 3,
          "baselines": 4, "tasks": 4, "leaderboard": 5, "harness.cli": 6}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    parts[0] = PACKAGES[parts[0]]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for top in PACKAGES for p in sorted((ROOT / top).rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            source = ".".join(base + ([node.module] if node.module else []))
            found.add(source)
            found.update(f"{source}.{a.name}" for a in node.names)  # `from pkg import module`
    return {m for m in found if m in known and m != name}


def room(name: str) -> str:
    parts = name.split(".")[1:]  # drop "neuronbench"
    if parts[0] == "harness" and len(parts) > 1:
        return ".".join(parts[:2])
    return parts[0]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    top = stack.pop()
                    on.discard(top)
                    comp.append(top)
                    if top == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_every_module_has_a_floor(graph):
    assert {room(m) for m in graph} <= set(FLOORS), f"rooms without a floor: {set(map(room, graph)) - set(FLOORS)}"


def test_no_import_cycles(graph):
    assert cycles(graph) == []


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_floor_imports_a_higher_one_or_a_neighbour(graph):
    bad = [f"{m} ({room(m)}) imports {d} ({room(d)})" for m, deps in sorted(graph.items())
           for d in sorted(deps) if room(d) != room(m) and FLOORS[room(d)] >= FLOORS[room(m)]]
    assert bad == []


def test_the_import_reader_sees_lazy_and_relative_imports(tmp_path):
    path = tmp_path / "mod.py"
    path.write_text("from . import b\n\ndef f():\n    from ..x import y\n    import neuronbench.z\n")
    known = {"neuronbench.p.b", "neuronbench.x.y", "neuronbench.z", "neuronbench.p.unused"}
    assert imports("neuronbench.p.mod", path, known) == known - {"neuronbench.p.unused"}


MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 50


def test_no_module_over_400_lines_and_no_function_over_50():
    """Rooms stay small: a module splits where the split has a name, a function where a step does."""
    long_modules, long_functions = [], []
    for name, path in modules().items():
        source = path.read_text()
        if len(source.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(f"{name}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1  # from `def` to its last line
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}.{node.name}: {length} lines")
    assert long_modules == [] and long_functions == []
