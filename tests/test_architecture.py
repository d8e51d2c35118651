"""The package's layout holds: each layer imports only what lies below it, no module reaches into
another module's private names, and the core stays free of transformers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nmsparse_hf"
CORE = {
    "errors",
    "config",
    "masks",
    "schedule",
    "autograd",
    "targets",
    "names",
    "sparsifier",
    "one_shot",
}
# layer -> the top-level parts of nmsparse_hf it may import (docs/ARCHITECTURE.md)
ALLOWED = {
    "core": CORE | {"__init__"},
    "export": CORE | {"export", "__init__"},
    "integrations": CORE | {"export", "integrations", "__init__"},
    "data": CORE | {"data"},
    "recipes": CORE | {"export", "integrations", "data", "recipes", "__init__"},
    "cli": CORE | {"export", "integrations", "data", "recipes", "__init__"},
    # the package's public face re-exports (lazily) from every layer
    "api": CORE | {"export", "integrations", "data", "recipes", "__init__"},
}


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "metric_scripts" not in p.parts)


def layer_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE).parts
    if len(rel) > 1:
        return rel[0]
    return {"cli.py": "cli", "__init__.py": "api"}.get(rel[0], "core")


def imports_of(path: Path):
    """(top-level nmsparse_hf part, imported names, line) of every package-internal import."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = path.relative_to(PACKAGE).parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1])
                parts = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "nmsparse_hf":
                parts = node.module.split(".")[1:]
            else:
                continue
            top = parts[0] if parts else "__init__"
            names = [a.name for a in node.names]
            if not parts:  # `from . import x` / `from .. import x`: x is a module or a name
                top = (
                    names[0]
                    if (PACKAGE / names[0]).exists() or (PACKAGE / f"{names[0]}.py").exists()
                    else "__init__"
                )
            yield top.removesuffix(".py"), names, node.lineno


@pytest.mark.parametrize("path", modules(), ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_layers_import_only_what_lies_below(path):
    layer = layer_of(path)
    for top, _names, line in imports_of(path):
        assert top in ALLOWED[layer], f"{path.name}:{line} ({layer}) imports nmsparse_hf.{top}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_no_module_imports_private_names_of_another(path):
    for _, names, line in imports_of(path):
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        assert not private, f"{path.name}:{line} imports private names {private}"


@pytest.mark.parametrize("name", sorted(CORE))
def test_the_core_imports_no_transformers_at_module_level(name):
    """(`import nmsparse_hf` stays light: tests/test_export.py checks it in a fresh process.)"""
    tree = ast.parse((PACKAGE / f"{name}.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Import):
            roots = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            roots = [node.module.split(".")[0]]
        else:
            continue
        assert not {"transformers", "accelerate", "datasets", "timm"} & set(roots), (
            f"{name}.py:{node.lineno} imports {roots}"
        )
