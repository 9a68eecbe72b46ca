"""The layout the architecture doc promises: imports flow one way, no module imports one that imports it
back, and no source module outgrows 550 lines. Read from the source (``ast``), lazy imports included."""

from __future__ import annotations

import ast
import collections

from tests.support.paths import ROOT

PACKAGES = ("models", "data_pipeline", "evaluation", "trainer", "launch")
# What each package may import of ours: launch → trainer → (evaluation → data_pipeline), models.
ALLOWED = {
    "models": set(),
    "data_pipeline": set(),
    "evaluation": {"data_pipeline"},
    "trainer": {"models", "data_pipeline", "evaluation"},
    "launch": {"models", "data_pipeline", "evaluation", "trainer"},
}
MAX_LINES = 550


def modules() -> dict[str, ast.Module]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            found[name] = ast.parse(path.read_text(), str(path))
    return found


def imports() -> dict[str, set[str]]:
    """module -> the modules of ours it imports (``from package import module`` counted as the module)."""
    found = modules()
    edges = collections.defaultdict(set)
    for name, tree in found.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            edges[name] |= {t for t in targets if t in found and t != name}
    return edges


def test_imports_flow_one_way():
    wrong = [
        f"{module} imports {target}"
        for module, targets in imports().items()
        for target in targets
        if target.split(".")[0] != module.split(".")[0]
        and target.split(".")[0] not in ALLOWED[module.split(".")[0]]
    ]
    assert not wrong, wrong


def test_no_import_cycle():
    edges = imports()
    # a package's __init__ importing its own modules is how a package states its interface, not a cycle
    graph = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in edges.items()}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in list(graph):
        if node not in index:
            visit(node)
    assert not cycles, cycles


def test_no_source_module_over_550_lines():
    long = {
        str(path.relative_to(ROOT)): lines
        for package in (*PACKAGES, "benchmarks")
        for path in (ROOT / package).rglob("*.py")
        if (lines := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, long
