"""Imports run one way (ARCHITECTURE.md): main, tools -> cli -> tasks -> {models, data, train, econ}
-> {nn, merging, metrics}, and jdjax.io (workdir I/O through etils.epath) below them all; configs
import only configs and ml_collections. The test reads the AST
of every module, so lazy imports inside functions count too."""

import ast
import os

import pytest

from jdjax.testing import REPO_ROOT

# package (first part below jdjax) -> the jdjax packages it may import besides itself
ALLOWED = {
    "main": {"io", "cli", "tasks", "models", "data", "train", "econ", "nn", "merging", "metrics"},
    "tools": {"io", "cli", "tasks", "models", "data", "train", "econ", "nn", "merging", "metrics"},
    "cli": {"io", "tasks", "train"},
    "tasks": {"io", "models", "data", "train", "econ", "nn", "merging", "metrics"},
    "models": {"io", "nn", "merging", "metrics"},
    "data": {"io", "nn", "merging", "metrics"},
    "train": {"io", "data", "nn", "merging", "metrics"},  # the loop reads its batches through data.pipeline
    "econ": {"io", "nn", "merging", "metrics"},
    "nn": {"io", "merging", "metrics"},  # the ViT blocks call the merging kernels
    "merging": set(),
    "io": set(),
    "metrics": set(),
    "testing": set(),
}


def jdjax_imports(path: str) -> list[tuple[int, str]]:
    """(line, 'jdjax.x.y') for every import of a jdjax module in the file."""
    tree = ast.parse(open(path).read(), path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "jdjax"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "jdjax":  # from jdjax import tasks, cli
                out += [(node.lineno, f"jdjax.{a.name}") for a in node.names]
            elif node.module.split(".")[0] == "jdjax":
                out.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            out.append((node.lineno, "relative"))
    return out


def package_of(module: str) -> str:
    """'jdjax.train.loop' -> 'train'; 'jdjax.main' -> 'main'."""
    return module.split(".")[1].removesuffix(".py")


def sources(folder: str):
    root = os.path.join(REPO_ROOT, folder)
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                yield os.path.join(dirpath, f)


def violations() -> list[str]:
    out = []
    for path in sources("jdjax"):
        rel = os.path.relpath(path, REPO_ROOT)
        parts = rel.split(os.sep)
        own = parts[1].removesuffix(".py") if len(parts) > 1 else ""
        if own == "__init__":
            continue
        assert own in ALLOWED, f"{rel}: package {own!r} has no place in the layering; add it to ALLOWED"
        for line, module in jdjax_imports(path):
            if module == "relative":
                out.append(f"{rel}:{line}: relative import (use absolute jdjax.* imports)")
                continue
            if module == "jdjax":
                continue
            target = package_of(module)
            if target != own and target not in ALLOWED[own]:
                out.append(f"{rel}:{line}: {own} imports {module} ({target} is not below {own})")
    return out


def test_jdjax_imports_point_down():
    assert violations() == []


def test_nothing_in_jdjax_imports_main_or_tools():
    bad = [f"{os.path.relpath(p, REPO_ROOT)}:{line}: {m}" for p in sources("jdjax")
           if os.sep + "tools" + os.sep not in p for line, m in jdjax_imports(p)
           if m.startswith(("jdjax.main", "jdjax.tools"))]
    assert bad == []


def test_configs_import_only_configs_and_ml_collections():
    bad = []
    for path in sources("configs"):
        for node in ast.walk(ast.parse(open(path).read(), path)):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                if name.split(".")[0] not in ("configs", "ml_collections", "__future__"):
                    bad.append(f"{os.path.relpath(path, REPO_ROOT)}:{node.lineno}: imports {name}")
    assert bad == []


@pytest.mark.parametrize("source, expected", [
    ("from jdjax.tasks import ctr\n", [(1, "jdjax.tasks")]),
    ("def f():\n    from jdjax import main as m\n", [(2, "jdjax.main")]),
    ("import jdjax.tools.convert\n", [(1, "jdjax.tools.convert")]),
    ("import numpy\nfrom . import x\n", [(2, "relative")]),
])
def test_the_walker_sees_every_kind_of_import(tmp_path, source, expected):
    path = tmp_path / "m.py"
    path.write_text(source)
    assert jdjax_imports(str(path)) == expected
