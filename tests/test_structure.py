"""The code's shape, checked: no import cycle in operator/ or runtime/, and nothing the operator
imports reaches for torch, even inside a function (the operator image has none; that every operator
module imports without it, loading only the runtime's contract package, is
tests/operator/test_operator_imports.py).

The import graph is read from the source with `ast`, not by importing it: every `import` and
`from ... import` counts, at module level, inside functions and under `if TYPE_CHECKING:` (a
function-local or type-only import hides a cycle from the interpreter, not from the design: the
scheduler that names the server's state type depends on the server).
`from package import name` is an edge to the submodule `package.name` when there is one, else to the
package itself. Importing `a.b.c` also runs `a/__init__.py` and `a/b/__init__.py`; those implicit
edges to parent packages are not counted (an `__init__` that re-exports is written that way on
purpose), an explicit `from a.b import name` is.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = [REPO / "operator", REPO / "runtime"]
TORCH_STACK = ("torch", "diffusers", "cache_dit", "torchao", "transformers")


def _modules() -> dict[str, Path]:
    """Every module under operator/ and runtime/ (package directories hold an __init__.py)."""
    found: dict[str, Path] = {}
    for root in ROOTS:
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if not all((root / Path(*parts[:i]) / "__init__.py").exists() for i in range(1, len(parts))):
                continue  # a script beside the packages, not a module
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of `modules` that module `name` imports (anywhere in its body)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    targets: set[str] = set()

    def known(module: str) -> str | None:
        """`module` if it is ours, else its nearest parent that is (`a.b.C` as an attribute path)."""
        while module:
            if module in modules:
                return module
            module = module.rpartition(".")[0]
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if (hit := known(alias.name)) is not None:
                    targets.add(hit)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:
                    targets.add(sub)  # `from package import submodule`
                elif (hit := known(base)) is not None:
                    targets.add(hit)
    targets.discard(name)
    return targets


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            advanced = False
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                out.append(sorted(component))
    return out


def _a_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One concrete cycle through the component's first module: the shortest way back to it."""
    members = set(component)
    start = component[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & members):
                if nxt == start:
                    return [*paths[node], start]
                if nxt not in paths:
                    paths[nxt] = [*paths[node], nxt]
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle in {component}")


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per group of modules that reach each other (a strongly connected component)."""
    return [_a_cycle(graph, c) for c in _strongly_connected(graph) if len(c) > 1]


def test_the_import_graph_is_read_from_every_module():
    """The graph the cycle test reads is complete: both packages, function-local imports counted,
    `from package import submodule` resolved to the submodule."""
    graph = import_graph()
    assert "diffusion_operator" in graph and "diffusion_runtime" in graph
    assert all(target in graph for targets in graph.values() for target in targets)
    assert sum(len(t) for t in graph.values()) > len(graph)  # edges were found at all
    # the cycle finder itself, on a known graph: a -> b -> c -> a, c -> d, d -> d (self edges are
    # dropped when the graph is read)
    toy = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"f"}, "f": {"e"}}
    assert sorted(import_cycles(toy)) == [["a", "b", "c", "a"], ["e", "f", "e"]]


def test_no_import_cycles_in_operator_and_runtime():
    """No module of operator/ or runtime/ reaches itself through its imports, counting function-local
    ones (a cycle hidden in a function is still one)."""
    graph = import_graph()
    groups = [c for c in _strongly_connected(graph) if len(c) > 1]
    report = "\n".join(
        f"{' -> '.join(_a_cycle(graph, group))}\n  (the group: {', '.join(group)};"
        f" its edges: {', '.join(f'{a} -> {b}' for a in group for b in sorted(graph[a] & set(group)))})"
        for group in groups
    )
    print(report)
    assert not groups, f"{len(groups)} import cycle group(s), one cycle shown for each:\n{report}"


def _reached_from(graph: dict[str, set[str]], prefix: str) -> set[str]:
    reached: set[str] = set()
    todo = [m for m in graph if m == prefix or m.startswith(prefix + ".")]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo += graph[module]
    return reached


def test_nothing_the_operator_imports_reaches_for_torch_even_inside_a_function():
    """The static side of the no-torch import below: no module the operator reaches (its own and the
    runtime's it imports, function-local imports counted) imports the torch stack anywhere, not even
    in a function the operator never calls today."""
    graph = import_graph()
    modules = _modules()
    found = []
    for module in sorted(_reached_from(graph, "diffusion_operator")):
        for node in ast.walk(ast.parse(modules[module].read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            found += [f"{module}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in TORCH_STACK]
    runtime = sorted(
        m for m in _reached_from(graph, "diffusion_operator") if m.startswith("diffusion_runtime")
    )
    print(f"runtime modules the operator reaches: {runtime}")
    assert not found, "\n".join(found)


def test_the_front_door_never_imports_torch():
    """The front door (a CPU Deployment, docs/queue.md) serves the API from the runtime image without the
    torch stack: importing it and building its app loads none of it."""
    code = (
        "import sys\n"
        "import diffusion_runtime.queue.frontdoor, diffusion_runtime.cli\n"
        f"loaded = sorted(m for m in {TORCH_STACK!r} if m in sys.modules)\n"
        "print(','.join(loaded))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"the front door imports {out.stdout.strip()}"
