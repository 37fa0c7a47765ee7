"""The package's modules form no import cycle of two: no module imports one that imports it
(function-level imports included), so each layer can be read and loaded on its own."""

from __future__ import annotations

import ast
import os

import fastneg

ROOT = os.path.dirname(fastneg.__file__)


def _modules() -> dict[str, str]:
    mods = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                mod = "fastneg." + os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                mods[mod.removesuffix(".__init__")] = path
    return mods


def _imports(mod: str, path: str, mods: dict[str, str]) -> set[str]:
    package = mod if path.endswith("__init__.py") else mod.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - (node.level - 1)] if node.level else []
            target = ".".join(base + ([node.module] if node.module else [])) if node.level else (node.module or "")
            found |= {t for t in [target] + [f"{target}.{a.name}" for a in node.names] if t in mods}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in mods}
    return found - {mod}


def test_no_two_modules_import_each_other() -> None:
    mods = _modules()
    graph = {m: _imports(m, p, mods) for m, p in mods.items()}
    assert "fastneg.mining.cli" in graph and graph["fastneg.tools.cli"]  # the walk found the package
    pairs = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if a in graph.get(b, ())
                    and not (a.startswith(b + ".") or b.startswith(a + "."))})  # a package and its own modules
    assert not pairs, pairs
