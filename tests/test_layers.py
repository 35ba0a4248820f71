"""The package's layering holds in its imports: no import cycle, no import of a higher layer.

Read from the source with `ast` (every import, including those inside functions), so the test does not depend
on what a run happens to import. Layers, top to bottom (README, "Architecture"):

    cli -> demo -> {eval, bench} -> train -> config -> loss -> data -> models -> parallel

`config_reference` (the generator of configs/REFERENCE.md, which documents the schemas of `config`, `eval`'s
compare files and `bench`'s sweeps) stands above `eval` and `bench`, beside `demo`.

`config_schema`, `config_paths`, `plural`, `lost_signals`, `atomic_file`, `json_object`, `output_dir`,
`subcommand`, `argument_parser`, `mesh_sizes` and `third_party_logs` serve every layer: they import nothing
of the package but each other (`third_party_logs` checks its directory with `output_dir` and counts with
`plural`, `argument_parser` reads `subcommand`'s name of the overrides).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nextquill_jax"

LAYER_OF = {
    "cli": 9,
    "demo": 8,
    "config_reference": 8,
    "eval": 7,
    "bench": 7,
    "train": 6,
    "config": 5,
    "loss": 4,
    "data": 3,
    "models": 2,
    "parallel": 1,
    "config_schema": 0,
    "config_paths": 0,
    "plural": 0,
    "lost_signals": 0,
    "atomic_file": 0,
    "json_object": 0,
    "output_dir": 0,
    "subcommand": 0,
    "argument_parser": 0,
    "third_party_logs": 0,
    "mesh_sizes": 0,
    "": 0,  # the package's own __init__ (its version string)
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The package modules `path` imports; `from pkg import name` counts as pkg.name when that is a module."""
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                origin = ".".join([*base, *([node.module] if node.module else [])])
            else:
                origin = node.module or ""
            found.add(origin)
            found.update(f"{origin}.{a.name}" for a in node.names if f"{origin}.{a.name}" in modules)
    return {m for m in found if m in modules and m != this}


def top_of(module: str) -> str:
    """The subpackage or top-level module `module` belongs to ("" for the package itself)."""
    return module.removeprefix("nextquill_jax").removeprefix(".").split(".")[0]


def layer(module: str) -> int:
    return LAYER_OF[top_of(module)]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imported_modules(p, modules) for p in paths}


def test_every_module_has_a_layer(graph):
    unknown = sorted(m for m in graph if top_of(m) not in LAYER_OF)
    assert unknown == [], f"give these a layer in LAYER_OF: {unknown}"


def test_no_module_imports_a_higher_or_peer_layer(graph):
    wrong = [
        f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
        for m, deps in graph.items()
        for d in deps
        if top_of(d) != top_of(m) and layer(d) >= layer(m) and layer(d) > 0
    ]
    assert wrong == []


def test_no_import_cycle(graph):
    cycles = []
    state: dict[str, int] = {}  # 1 on the current path, 2 finished

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join([*path[path.index(dep) :], dep]))
            elif dep not in state:
                visit(dep, [*path, dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_checks_see_a_violation():
    """The graph walk finds an upward import and a cycle when there is one (so the tests above can fail)."""
    fake = {
        "nextquill_jax.models.a": {"nextquill_jax.train.b"},
        "nextquill_jax.train.b": {"nextquill_jax.models.a"},
    }
    assert layer("nextquill_jax.train.b") > layer("nextquill_jax.models.a")
    with pytest.raises(AssertionError):
        test_no_import_cycle(fake)
    with pytest.raises(AssertionError):
        test_no_module_imports_a_higher_or_peer_layer(fake)
