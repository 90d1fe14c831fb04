"""The package layout docs/ARCHITECTURE.md describes: subpackages in one order of imports, no import cycle, DeepSpeed
only where the page says, and the old import paths kept for one release."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "adept_ds"
ARCHITECTURE = PACKAGE.parent / "docs" / "ARCHITECTURE.md"
ORDER = ("runtime", "model", "data", "probe", "run", "training", "evaluation")
"""Each subpackage imports only those before it (model and data do not import each other)."""
TOP_LEVEL = {"__init__", "cli", "train", "pipeline", "expand", "engine"}
"""The entry points, the demo pipeline, and the re-exports of moved modules."""
DEEPSPEED_MODULES = {
    "probe/runtime.py",
    "run/zeropp.py",
    "runtime/distributed.py",
    "training/engine.py",
    "training/export.py",
    "training/frozen_weights.py",
    "training/lr.py",
    "training/universal.py",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports(path: Path) -> set[str]:
    """The adept_ds modules a file imports, anywhere in it (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("adept_ds"):
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                found.add(name if name in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("adept_ds"))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and isinstance(node.args[0], ast.Constant):
            found.add(node.args[0].value)  # the re-export modules
    return found & MODULES.keys()


def test_the_top_level_keeps_only_entry_points_and_every_module_lives_in_a_known_subpackage():
    assert {path.stem for path in PACKAGE.glob("*.py")} == TOP_LEVEL
    assert {path.name for path in PACKAGE.iterdir() if (path / "__init__.py").is_file()} == set(ORDER)


def test_no_module_imports_itself_back_through_others():
    graph = {name: imports(path) - {name} for name, path in MODULES.items()}
    # The package __init__ of a subpackage may name its own modules lazily (probe's re-exports): not an edge back.
    graph["adept_ds.probe"] = set()
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            assert state.get(target) != 1, "import cycle: " + " -> ".join([*trail, name, target])
            if target not in state:
                visit(target, [*trail, name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_subpackages_import_only_those_before_them():
    for name, path in MODULES.items():
        parts = name.split(".")
        if len(parts) < 3:
            continue
        rank = ORDER.index(parts[1])
        for target in imports(path):
            other = target.split(".")[1]
            if other in ORDER and other != parts[1]:
                assert ORDER.index(other) < rank, f"{name} imports {target}: {parts[1]}/ may import only {ORDER[:rank]}"


def imports_deepspeed(node: ast.AST) -> bool:
    """An import statement of deepspeed, or a call of runtime.distributed.import_deepspeed (which imports it lean)."""
    if isinstance(node, ast.Import):
        return any(alias.name.split(".")[0] == "deepspeed" for alias in node.names)
    if isinstance(node, ast.ImportFrom):
        return (node.module or "").split(".")[0] == "deepspeed"
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "import_deepspeed"


def test_deepspeed_is_imported_only_where_the_architecture_page_says():
    users = {
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if any(imports_deepspeed(node) for node in ast.walk(ast.parse(path.read_text())))
    }
    assert users == DEEPSPEED_MODULES
    page = ARCHITECTURE.read_text()
    assert all(f"`{module}`" in page for module in DEEPSPEED_MODULES)
    assert "docs/ARCHITECTURE.md" in (PACKAGE.parent / "README.md").read_text()


OLD_PATHS = """
import adept_ds.expand, adept_ds.model.expand, adept_ds.engine, adept_ds.training.engine
assert adept_ds.expand is adept_ds.model.expand and adept_ds.engine is adept_ds.training.engine
from adept_ds.probe import ProbeRuntime, layers_from_probe, probe_model, read_probe_result
import adept_ds.probe.layers, adept_ds.probe.runtime
assert layers_from_probe is adept_ds.probe.layers.layers_from_probe and ProbeRuntime is adept_ds.probe.runtime.ProbeRuntime
assert not hasattr(adept_ds.probe, "no_such_name")
print("old paths ok")
"""


@pytest.mark.parametrize("first", ["adept_ds.expand", "adept_ds.engine", "adept_ds.probe"])
def test_moved_modules_keep_their_old_import_paths_in_a_fresh_interpreter(first):
    """Each old path imported first, before anything else of the package has loaded the new modules."""
    import subprocess
    import sys

    code = f"import {first}\n{OLD_PATHS}"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "old paths ok" in result.stdout, result.stderr[-2000:]
