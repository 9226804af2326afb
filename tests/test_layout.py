"""The package's shape: imports go one way (no cycle anywhere, imports inside functions included), no module
is over 500 lines, the math imports nothing of grpo, and the plain path never imports the speed code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "grpo"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imported(name: str) -> set[str]:
    """The grpo modules ``name`` imports anywhere in its code (not under ``if TYPE_CHECKING:``)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {
        id(sub)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for sub in ast.walk(node)
    }
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in found if m in MODULES and m != name and not m.startswith(name + ".")}


GRAPH = {name: imported(name) for name in MODULES}


def test_no_import_cycles():
    """Depth-first search for a path back to where it started."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = "open"
        stack.append(name)
        for dependency in sorted(GRAPH[name]):
            if state.get(dependency) == "open":
                cycle = [*stack[stack.index(dependency) :], dependency]
                pytest.fail("import cycle: " + " → ".join(cycle))
            if dependency not in state:
                visit(dependency)
        stack.pop()
        state[name] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


def test_no_module_is_over_500_lines():
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in MODULES.items()}
    assert {name: size for name, size in sizes.items() if size > 500} == {}


def test_the_math_imports_torch_alone():
    for name, path in MODULES.items():
        if name.startswith("grpo.algo"):
            assert all(m.startswith("grpo.algo") for m in GRAPH[name]), (name, GRAPH[name])
            third_party = {
                node.module.split(".")[0] if isinstance(node, ast.ImportFrom) else alias.name.split(".")[0]
                for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                if isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "level", 0)
                for alias in node.names
            }
            allowed = {"torch", "grpo", "__future__", "math", "typing", "collections", "dataclasses"}
            assert third_party <= allowed, (name, third_party - allowed)


@pytest.mark.parametrize(
    "lower", ["grpo.algo", "grpo.config", "grpo.data", "grpo.models", "grpo.rollout", "grpo.agents"]
)
def test_the_plain_path_never_imports_the_speed_code_or_what_is_built_on_it(lower):
    above = ("grpo.accel", "grpo.train", "grpo.runs", "grpo.cli")
    for name in MODULES:
        if name.startswith(lower):
            assert not {m for m in GRAPH[name] if m.startswith(above)}, (name, GRAPH[name])
