"""The package's floors: every import goes down (or stays on its floor), and none makes a cycle.

Function-level imports count as much as the ones at the top: a hidden upward
import is still one.
"""

import ast
import importlib
import sys
import warnings
from pathlib import Path

import pytest

import unetile

pytestmark = pytest.mark.fast

PACKAGE = Path(unetile.__file__).parent
# Lowest first: a module may import its own floor and those below it.
FLOORS = [
    ("base", {"unetile", "unetile._moved", "unetile.io", "unetile.numbers"}),
    ("base", {"unetile.allocator", "unetile.precision"}),
    ("network", {"unetile.network"}),
    ("data", {"unetile.data"}),
    ("evaluate", {"unetile.evaluate"}),
    ("predict", {"unetile.predict"}),
    ("train", {"unetile.train"}),
    ("app", {"unetile.demo", "unetile.napari", "unetile.cli", "unetile.__main__"}),
]


def module_name(path: Path) -> str:
    parts = ["unetile", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def floor(module: str) -> int:
    for number, (_, prefixes) in enumerate(FLOORS):
        # The root package holds only the version; its modules are placed by name.
        if any(module == p or (p != "unetile" and module.startswith(p + ".")) for p in prefixes):
            return number
    raise AssertionError(f"{module} is on no floor: add it to FLOORS")


def imports(module: str) -> set[str]:
    """The unetile modules ``module`` imports, at any level of its code."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("unetile")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("unetile"):
                target = node.module
            else:
                continue
            for alias in node.names:
                # ``from .pkg import module`` names a module; otherwise the target is.
                candidate = f"{target}.{alias.name}"
                found.add(candidate if candidate in MODULES else target)
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: imports(module) for module in MODULES}


def test_every_module_is_on_a_floor():
    for module in MODULES:
        floor(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_floors(module):
    upward = sorted(t for t in GRAPH[module] if floor(t) > floor(module))
    assert not upward, f"{module} ({FLOORS[floor(module)][0]}) imports upward: {upward}"


def test_no_import_cycle():
    # Package __init__ files only gather their modules; the modules' own graph is checked.
    graph = {m: {t for t in ts if MODULES[t].name != "__init__.py"} for m, ts in GRAPH.items()}
    state: dict[str, int] = {}

    def visit(module, path):
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycle = path[path.index(target) :] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_layer_check_finds_an_upward_import(tmp_path, monkeypatch):
    bad = PACKAGE / "network" / "model.py"
    monkeypatch.setitem(MODULES, "unetile.network.model", tmp_path / "model.py")
    (tmp_path / "model.py").write_text(bad.read_text() + "\nfrom ..train import loop\n")
    assert "unetile.train.loop" in imports("unetile.network.model")
    assert floor("unetile.train.loop") > floor("unetile.network.model")


def test_old_module_paths_still_import_with_a_warning(monkeypatch):
    old_path = "unetile." + "metrics"  # spelled apart so that no tool rewrites it
    monkeypatch.delitem(sys.modules, old_path, raising=False)  # imported afresh
    with pytest.warns(DeprecationWarning, match="moved to unetile.evaluate.metrics"):
        old = importlib.import_module(old_path)
    assert old is importlib.import_module("unetile.evaluate.metrics")
    predict = importlib.import_module("unetile.predict")
    with pytest.warns(DeprecationWarning, match="unetile.predict.engine.resolve_device"):
        predict.resolve_device  # noqa: B018 - an old name of the package
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        predict.predict_to_files  # noqa: B018 - public: no warning
