"""The package's layering: every import (module level or inside a function) runs down the layers."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "labkit"

# Lower number = lower layer; a module may import its own layer and the layers below.
# ``labkit.notebook`` (setup / record / show_source) sits at the bottom so that
# ``labkit.show_source`` works everywhere; it imports nothing of labkit but ``labkit.device``.
LAYERS = {
    "labkit": 0,
    "labkit._validation": 0,
    "labkit.files": 0,
    "labkit.notebook": 0,
    "labkit.data": 1,
    "labkit.nn": 1,
    "labkit.anchors": 2,
    "labkit.boxes": 2,
    "labkit.losses": 2,
    "labkit.assigners": 3,
    "labkit.heads": 4,
    "labkit.detr": 4,
    "labkit.codetr": 5,
    "labkit.detectors": 6,
    "labkit.engine": 7,
    "labkit.recipes": 8,
    "labkit.lessons": 9,
    "labkit.viz": 9,
    "labkit.convert": 9,
    "labkit.zoo": 9,
    "labkit.engine.cli": 10,
    "labkit.run_notebooks": 10,
    "labkit.grading": 10,
    "labkit.cli": 10,
    "labkit.__main__": 10,
}


def layer_of(module: str) -> int:
    """The layer of ``module``: its longest prefix in ``LAYERS``."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in LAYERS:
            return LAYERS[prefix]
    raise KeyError(f"{module} has no layer; add it to LAYERS")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def labkit_imports(path: Path) -> list[str]:
    """Every ``labkit...`` module ``path`` imports, at module level or inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith("labkit"):
                found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("labkit")]
    return found


MODULES = sorted(ROOT.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_run_down_the_layers(path):
    name = module_name(path)
    upward = [m for m in labkit_imports(path) if layer_of(m) > layer_of(name)]
    assert upward == [], f"{name} (layer {layer_of(name)}) imports up: {upward}"


def test_the_checker_sees_an_upward_import(tmp_path):
    """The rule can fail: a head importing the engine is reported."""
    assert layer_of("labkit.heads.fcos") < layer_of("labkit.engine.train")
    fake = tmp_path / "mod.py"
    fake.write_text("def f():\n    from labkit.engine.train import train\n")
    assert labkit_imports(fake) == ["labkit.engine.train"]
