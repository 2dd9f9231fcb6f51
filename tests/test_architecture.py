"""The layout promises of docs/ARCHITECTURE.md: small modules and functions, imports that run one way through the
stages, and the public builders at the package top."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cxr_fast"
# Lower layers never import higher ones: foundation < data < training < evaluation < the commands at the top.
LAYERS = {"constants": 0, "errors": 0, "config": 0, "metrics": 0, "calibration": 0, "files": 0, "data": 1,
          "training": 2, "evaluation": 3, "bench": 4, "demo": 4, "cli": 4, "__init__": 4, "__main__": 4}
MODULES = sorted(PACKAGE.rglob("*.py"))


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else "__init__"]


def _name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    return ".".join(part for part in relative.parts if part != "__init__")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_and_functions_stay_small(path):
    source = path.read_text()
    assert len(source.splitlines()) <= 400
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            assert node.end_lineno - node.lineno + 1 <= 60, f"{node.name} is over 60 lines"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_one_way_through_the_stages(path):
    name = _name(path)
    own = _layer(name) if name != "cxr_fast" else 4
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cxr_fast."):
            targets = [node.module]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.startswith("cxr_fast.")]
        else:
            continue
        for target in targets:
            assert _layer(target) <= own, f"{name} imports {target}, a later stage"
            if own == 0:
                assert _layer(target) == 0


def test_public_builders_import_from_the_top():
    from cxr_fast import DataConfig, RunConfig, create_loader, create_model, load_model

    assert callable(create_loader) and callable(create_model) and callable(load_model)
    assert RunConfig().data == DataConfig()
