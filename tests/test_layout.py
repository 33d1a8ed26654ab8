"""The package's layout keeps its rule: arrows point down, no circles, small modules, every package says its rule.

    cli -> tasks -> serve -> inference -> training, explain -> data, models -> config -> leaves

Every import counts: at the top, inside a function (late) and under TYPE_CHECKING.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "cifar_cam"
LEAVES = ("errors", "io", "logs", "provenance", "viz")
# a package's layer: it may import its own layer's leaves and everything in a lower layer, nothing above
LAYERS = {
    "leaves": 0, "config": 1, "data": 2, "models": 2, "training": 3, "explain": 3, "inference": 4, "serve": 5,
    "tasks": 6, "cli": 7,
}
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path) -> set[str]:
    """The cifar_cam modules `path` imports, anywhere in it (a name imported from a package counts as its module
    when it is one)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cifar_cam") and not node.level:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("cifar_cam"))
    return found


def package_of(module: str) -> str:
    """'cifar_cam.training.budget.probe' -> 'training'; a leaf module -> 'leaves'; the root -> ''."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return ""
    return "leaves" if parts[1] in LEAVES else parts[1]


GRAPH = {name: {m for m in imports_of(path) if m != name} for name, path in MODULES.items()}


def test_every_module_sits_in_a_known_layer() -> None:
    unknown = {name for name in MODULES if package_of(name) not in (*LAYERS, "")}
    assert not unknown, f"modules outside the layers: {sorted(unknown)} (a new package needs a layer here)"


def test_no_module_imports_a_layer_above_it_or_a_sibling_package() -> None:
    breaches = []
    for name, deps in GRAPH.items():
        own = package_of(name)
        if own == "":  # cifar_cam/__init__ (the lazy public API) and __main__ may reach anything
            continue
        for dep in deps:
            theirs = package_of(dep)
            if theirs == "":
                breaches.append(f"{name} -> {dep} (the package root: import the module itself)")
            elif theirs != own and LAYERS[theirs] >= LAYERS[own]:
                breaches.append(f"{name} -> {dep} ({theirs} is not below {own})")
    assert not breaches, "\n".join(sorted(breaches))


def test_a_task_imports_no_other_task_than_the_shared_one() -> None:
    breaches = [f"{name} -> {dep}" for name, deps in GRAPH.items() if name.startswith("cifar_cam.tasks.")
                for dep in deps if dep.startswith("cifar_cam.tasks.") and dep != "cifar_cam.tasks.common"]
    assert not breaches, "\n".join(breaches)


def test_no_import_circle() -> None:
    # package -> its own modules is how a package re-exports; that edge is not a dependency of the modules
    graph = {n: {d for d in deps if not d.startswith(n + ".") and not n.startswith(d + ".")}
             for n, deps in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep):], dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name)):
            pytest.fail("import circle: " + " -> ".join(cycle))


def test_no_module_is_longer_than_it_should_be() -> None:
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by concern): {long}"


@pytest.mark.parametrize("package", sorted(p for p in LAYERS if p != "leaves") + ["training.budget"])
def test_each_package_docstring_says_what_it_owns_and_may_import(package: str) -> None:
    init = PACKAGE.joinpath(*package.split(".")) / "__init__.py"
    doc = ast.get_docstring(ast.parse(init.read_text())) or ""
    assert doc and "import" in doc.lower(), f"{init}: its docstring says what it owns and which packages it may import"
    assert len(doc.splitlines()) <= 3, f"{init}: two lines, not {len(doc.splitlines())}"
