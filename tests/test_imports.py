"""Imports inside relreg run one way, bottom to top, and never in a circle.

The layers (docs/architecture.md): validate / io <- explain / models / viz <- metrics / losses <-
data <- lightning / masks / baselines <- evaluation / demo <- cli. Every ``import`` statement in
``relreg/`` (also the ones inside functions) is read with ``ast``; none may reach a higher layer,
and the graph of module-to-module imports has no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "relreg"

LAYERS = {
    "relreg.validate": 0,
    "relreg.io": 0,
    "relreg.quiet": 0,
    "relreg.registry": 0,
    "relreg.explain": 1,
    "relreg.models": 1,
    "relreg.viz": 1,
    "relreg.metrics": 2,
    "relreg.losses": 2,
    "relreg.objective": 3,
    "relreg.data": 3,
    "relreg.lightning": 4,
    "relreg.masks": 4,
    "relreg.baselines": 4,
    "relreg.evaluation": 5,
    "relreg.demo": 5,
    "relreg.cli": 6,
    "relreg": 7,
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The relreg modules that ``name`` imports, resolved to modules (a ``from package import
    submodule`` counts as the submodule)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "relreg"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "relreg":
                continue
            subs = {f"{module}.{a.name}" for a in node.names} & known
            found |= subs or {module}
            if len(subs) < len(node.names):
                found.add(module)
    return found & known


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) - {name} for name, path in modules.items()}


def _layer(module: str) -> int:
    key = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len)
    return LAYERS[key]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle ``[a, b, ..., a]`` of the graph, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_every_module_has_a_layer():
    assert all(_layer(m) >= 0 for m in _modules())
    assert "relreg.metrics.accuracy" in _modules() and "relreg.io" in _modules()


def test_no_module_imports_from_a_layer_above_it():
    upward = [
        f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
        for m, deps in _graph().items()
        for d in sorted(deps)
        if _layer(d) > _layer(m)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycle_inside_relreg():
    cycle = find_cycle(_graph())
    assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize(
    "graph, has_cycle",
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, False),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True),
        ({"a": {"a"}}, True),
        ({"a": {"b", "c"}, "b": {"c"}, "c": set()}, False),
    ],
)
def test_cycle_finder_on_known_graphs(graph, has_cycle):
    assert (find_cycle(graph) is not None) == has_cycle


def test_the_import_reader_sees_function_level_and_relative_imports(tmp_path):
    code = "from .sibling import x\n\ndef f():\n    from relreg.cli import main\n"
    (tmp_path / "mod.py").write_text(code)
    found = _imports(
        "relreg.explain.mod", tmp_path / "mod.py", {"relreg.explain.sibling", "relreg.cli"}
    )
    assert found == {"relreg.explain.sibling", "relreg.cli"}


def test_the_explain_subpackage_is_not_shadowed_by_its_function():
    import relreg
    import relreg.explain as explain_package

    assert explain_package.__name__ == "relreg.explain"
    assert relreg.explain is explain_package and callable(relreg.explain.explain)
    assert relreg.list_explainers() == explain_package.list_explainers()


def test_moved_names_are_gone_without_forwards():
    import relreg.data
    import relreg.losses

    for module, name in (
        (relreg.data, "accuracy_targets"),
        (relreg.losses, "RelevanceLoss"),
        (relreg.losses, "relevance_loss"),
    ):
        with pytest.raises(AttributeError, match=f"no attribute '{name}'"):
            getattr(module, name)
