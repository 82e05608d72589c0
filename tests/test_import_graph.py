"""The packages' modules import one another without a cycle, counting imports inside functions too (a deferred
import hides a cycle from Python, not from a reader)."""

import ast

from conftest import REPO

PACKAGES = ("agents", "atommem_env", "atommem_verifiers", "atommem_trl")


def _module_name(path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of the same packages it imports anywhere in its file."""
    files = {_module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}
    graph = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
                stem = ".".join([*base, node.module] if node.module else base)
                targets = [stem, *(f"{stem}.{alias.name}" for alias in node.names)]
            else:
                continue
            graph[name] |= {t for t in targets if t in files and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done, path = set(), []

    def visit(node):
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        path.append(node)
        for nxt in sorted(graph[node]):
            if (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        done.add(node)
        return None

    return next((c for c in map(visit, sorted(graph)) if c), None)


def test_no_module_imports_a_module_that_imports_it_back():
    graph = import_graph()
    assert "agents.vllm_backend" in graph["agents.backends"]  # deferred imports are seen
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_deferred_cycle():
    cycle = find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()})
    assert cycle == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": set()}) is None
