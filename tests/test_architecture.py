"""The package's imports go one way: kernels -> ops -> nn -> boosting -> integrations -> cli/tools.

Every ``xgblora_fast`` import of every module (at the top or inside a function) is read from its
source with ``ast``; a module may import its own layer and the layers before it, never a later
one (docs/architecture.md).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "xgblora_fast"
LAYERS = {"kernels": 0, "ops": 1, "nn": 2, "boosting": 3, "integrations": 4, "cli": 5, "tools": 5}


def imported_layers(source: str) -> list[tuple[int, str]]:
    """``(line, layer)`` of every import of ``xgblora_fast.<layer>...`` in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # ``from xgblora_fast import ops`` names the layer in the imported names.
            if node.module == "xgblora_fast":
                names = [f"xgblora_fast.{alias.name}" for alias in node.names]
            else:
                names = [node.module]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "xgblora_fast" and len(parts) > 1 and parts[1] in LAYERS:
                found.append((node.lineno, parts[1]))
    return found


def backward_imports(layer: str, source: str) -> list[str]:
    return [
        f"line {line}: {layer} imports {other}"
        for line, other in imported_layers(source)
        if LAYERS[other] > LAYERS[layer]
    ]


def test_every_module_imports_only_its_layer_and_earlier_ones():
    modules = sorted(p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE)
    assert {p.relative_to(PACKAGE).parts[0] for p in modules} == set(LAYERS)
    found = {
        str(p.relative_to(PACKAGE)): backward_imports(
            p.relative_to(PACKAGE).parts[0], p.read_text()
        )
        for p in modules
    }
    assert {name: bad for name, bad in found.items() if bad} == {}


def test_the_checker_sees_imports_at_the_top_and_inside_functions():
    source = (
        "from xgblora_fast.ops.checks import TOL\n"
        "import xgblora_fast.boosting.booster as b\n"
        "def f():\n"
        "    from xgblora_fast import cli\n"
        "    from xgblora_fast.kernels import merge\n"
    )
    assert backward_imports("nn", source) == [
        "line 2: nn imports boosting",
        "line 4: nn imports cli",
    ]
    assert backward_imports("cli", source) == []
