"""The layout promises of docs/ARCHITECTURE.md: small modules and functions with few parameters, imports that run one
way through the stages, every option default in a config class, and the public builders at the package top."""

from __future__ import annotations

import ast
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cxr_fast"
# The stages, one folder each, in the order data flows; the modules at the package top are the foundation (layer 0)
# below them all, and the package's own __init__/__main__ sit at the top. A new module in a folder needs no edit here.
STAGES = ("data", "training", "evaluation", "bench", "pipelines", "cli")
MODULES = sorted(PACKAGE.rglob("*.py"))
SCRIPTS = sorted((ROOT / "tools").glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("__init__", "__main__"):
        return len(STAGES) + 1
    if (PACKAGE / parts[1]).is_dir():
        return 1 + STAGES.index(parts[1])
    return 0


def _name(path: Path, package: Path = PACKAGE) -> str:
    relative = path.relative_to(package.parent).with_suffix("")
    return ".".join(part for part in relative.parts if part != "__init__")


def test_every_stage_folder_is_listed():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(STAGES)


def _is_click_command(node: ast.FunctionDef) -> bool:
    return any("command" in ast.unparse(d) or "group" in ast.unparse(d) for d in node.decorator_list)


@pytest.mark.parametrize("path", MODULES + SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_and_functions_stay_small(path):
    source = path.read_text()
    assert len(source.splitlines()) <= 400
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            assert node.end_lineno - node.lineno + 1 <= 60, f"{node.name} is over 60 lines"
            names = [a.arg for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs]
            if names and names[0] in ("self", "cls"):
                names = names[1:]
            if not _is_click_command(node):
                assert len(names) <= 6, f"{node.name} takes {len(names)} parameters"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_one_way_through_the_stages(path):
    name = _name(path)
    own = _layer(name)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cxr_fast."):
            targets = [node.module]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.startswith("cxr_fast.")]
        else:
            continue
        for target in targets:
            assert _layer(target) <= own, f"{name} imports {target}, a later stage"


def _commands(group: click.Group, prefix: str = ""):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", command


def test_every_option_default_comes_from_a_config_class():
    from cxr_fast.cli import cli
    from cxr_fast.cli.options import ConfigOption
    from cxr_fast.settings import describe

    checked = 0
    for name, command in _commands(cli):
        for param in command.params:
            if not isinstance(param, click.Option) or param.name == "help":
                continue
            if isinstance(param, ConfigOption):
                default, _field = describe(param.config_class, param.config_path)
                assert param.default in (default, str(default)), f"{name} {param.opts[0]}"
                checked += 1
            else:  # a path, a plain switch or a required value: no default of its own
                unset = param.default in (None, False) or type(param.default).__name__ == "Sentinel"
                assert unset or param.required, f"{name} {param.opts[0]} has a default"
    assert checked > 50


def test_public_builders_import_from_the_top():
    from cxr_fast import DataConfig, LoaderSpec, RunConfig, create_loader, create_model, load_model

    assert callable(create_loader) and callable(create_model) and callable(load_model)
    assert RunConfig().data == DataConfig() and LoaderSpec("shards", "train").split == "train"


def test_no_class_list_outside_the_data_set_descriptions():
    """Class names travel manifest → checkpoint → evaluation: a finding's name as a string literal belongs to a
    description (or the synthetic pictures drawn for NIH's findings), nowhere else. ("No Finding", NIH's word for
    no positive label, is what `predict` and the report write when no class is called: `report.NONE_CALLED`.)"""
    from cxr_fast.data.datasets import DATASETS, nih

    names = {c for module in DATASETS.values() for c in (module.CLASSES or ())} - {nih.NO_FINDING}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if (PACKAGE / "data" / "datasets") in path.parents or (PACKAGE / "data" / "synth") in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.value!r}")
    assert not found, found


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module → the package's modules it imports, anywhere in the file (a lazy import inside a function counts): a
    `from X import name` where name is a module of X is an edge to that module, else to X."""
    modules = {_name(path, package): path for path in sorted(package.rglob("*.py"))}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in modules:
                for alias in node.names:
                    edges.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module)
            elif isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in modules}
        graph[name] = edges - {name}
    return graph


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` (the modules along it, the first repeated at the end), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (circle := visit(target)):
                return circle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (circle := visit(node)):
            return circle
    return None


def test_no_import_circle_anywhere_lazy_imports_included(tmp_path):
    assert find_circle(import_graph(PACKAGE)) is None
    planted = tmp_path / "cxr_fast" / "data"
    planted.mkdir(parents=True)
    (planted.parent / "__init__.py").write_text("")
    (planted / "__init__.py").write_text("")
    (planted / "painter.py").write_text("def paint():\n    from cxr_fast.data import layouts\n")
    (planted / "layouts.py").write_text("from cxr_fast.data.painter import paint\n")
    assert find_circle(import_graph(planted.parent)) == ["cxr_fast.data.layouts", "cxr_fast.data.painter",
                                                         "cxr_fast.data.layouts"]


def unread_fields(classes, sources: str) -> list[str]:
    """Config fields that no code reads (`.name`) and no flag or YAML path names (`"section.name"`)."""
    import dataclasses
    import re

    return [f"{cls.__name__}.{f.name}" for cls in classes for f in dataclasses.fields(cls)
            if not re.search(rf"\.{f.name}\b|[\"']([a-z_]+\.)*{f.name}[\"']", sources)]


def test_every_config_field_is_read_somewhere():
    import dataclasses

    from cxr_fast import config
    from cxr_fast.settings import Checked

    classes = [c for c in vars(config).values() if isinstance(c, type) and issubclass(c, Checked) and c is not Checked]
    sources = "\n".join(p.read_text() for p in MODULES if p.name != "config.py")
    assert unread_fields(classes, sources) == []
    planted = dataclasses.make_dataclass("Planted", [("forgotten_knob", int, 1)])
    assert unread_fields([planted], sources) == ["Planted.forgotten_knob"]


def test_one_image_contract():
    """The 8-bit scale and the gray normalisation live in the preprocessing spec alone: no module that reads, stores,
    loads or scores an image derives them (the synthetic painter draws its pictures in 8 bits, and is left out)."""
    import re

    spec = PACKAGE / "data" / "images" / "preprocess.py"
    found = [f"{path.relative_to(PACKAGE)}" for path in MODULES if path != spec and
             (PACKAGE / "data" / "synth") not in path.parents and
             re.search(r"GRAY_MEAN|GRAY_STD|\b255\.0\b|, 0, 255\)|/ 255\b", path.read_text())]
    assert found == []


def test_every_declared_flag_is_an_option_of_some_command():
    """A field that declares a flag is reachable by it; a field without one is YAML-only on purpose."""
    import dataclasses

    from cxr_fast import config
    from cxr_fast.cli import cli
    from cxr_fast.cli.options import ConfigOption
    from cxr_fast.settings import Checked, describe

    def owner(cls, path):  # the config class that holds the field a dotted path ends in
        head, _, leaf = path.rpartition(".")
        return (type(describe(cls, head)[0]) if head else cls).__name__, leaf

    offered = {owner(p.config_class, p.config_path) for _name, command in _commands(cli) for p in command.params
               if isinstance(p, ConfigOption)}
    classes = [c for c in vars(config).values() if isinstance(c, type) and issubclass(c, Checked) and c is not Checked]
    missing = [f"{cls.__name__}.{f.name} ({f.metadata['flag']})" for cls in classes for f in dataclasses.fields(cls)
               if f.metadata.get("flag") and (cls.__name__, f.name) not in offered]
    assert missing == []


def test_no_folder_holds_more_than_twelve_modules():
    folders = {path.parent for path in MODULES}
    crowded = {str(f.relative_to(PACKAGE)): n for f in folders
               if (n := len([p for p in f.glob("*.py") if p.name != "__init__.py"])) > 12}
    assert crowded == {}
