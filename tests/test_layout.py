"""The layout by stage: imports only point down the data flow, and no files import each other in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Lowest first: a package may import its own stage and those before it, never one after it.
STAGES = (
    "models.files",
    "models.cli",
    "models.data",
    "models.nn",
    "models.evaluation",
    "models.training",
    "ray_app.train",
    "tuning",
    "ray_app.store",
    "ray_app.serve",
    "ray_app.batch",
    "gradio_demo",
    "main_job",
)
PACKAGES = ("models", "ray_app", "tuning", "gradio_demo", "main_job")


def stage_of(module: str) -> int | None:
    best = None
    for i, stage in enumerate(STAGES):
        if module == stage or module.startswith(stage + "."):
            best = i
    return best


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Every project module -> the project modules it imports (at module level or inside a function)."""
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    known = {module_name(p) for p in files}
    out: dict[str, set[str]] = {}
    for p in files:
        found = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    found.add(full if full in known else node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        out[module_name(p)] = {m for m in found if m in known} - {module_name(p)}
    return out


def test_every_module_belongs_to_a_stage():
    assert not [m for m in imports() if stage_of(m) is None and m not in PACKAGES]


def test_no_import_points_to_a_later_stage():
    bad = [
        f"{m} -> {dep}"
        for m, deps in imports().items()
        for dep in deps
        if stage_of(m) is not None and stage_of(dep) is not None and stage_of(dep) > stage_of(m)
    ]
    assert not bad, "imports against the data flow:\n" + "\n".join(sorted(bad))


def test_no_import_cycle_between_files():
    graph = imports()
    # A package's __init__ is not a file of code here: every one of them is a docstring or re-exports.
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for dep in sorted(graph.get(m, ())):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(path[path.index(dep) :] + [dep]) if dep in path else f"{m} -> {dep}")
            elif dep not in state:
                visit(dep, path + [dep])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize(
    "package",
    [
        "models.nn",
        "models.evaluation",
        "models.training",
        "ray_app.train",
        "ray_app.serve",
        "ray_app.batch",
        "ray_app.store",
        "main_job",
    ],
)
def test_stage_packages_have_a_docstring(package):
    init = ROOT / package.replace(".", "/") / "__init__.py"
    assert ast.get_docstring(ast.parse(init.read_text())), f"{init}: say what the package holds"
