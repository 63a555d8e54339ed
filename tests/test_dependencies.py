"""Every third-party package that jdjax/ or tests/ imports is declared in setup.py (library code in
install_requires or an extra that names its use, tests in the test extra)."""

import ast
import importlib.metadata
import os
import re
import sys

from jdjax.testing import REPO_ROOT

# imported name -> why it needs no declaration of its own
PROVIDED = {"jdjax": "this package", "configs": "the repository's configs", "benchmarks": "the repository",
            "pytest": "declared", "tensorflow": "only inside tfds' own prepare step (never imported here)"}


def imported_top_level(folder: str) -> set[str]:
    names = set()
    for dirpath, _, files in os.walk(os.path.join(REPO_ROOT, folder)):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                for node in ast.walk(ast.parse(open(path).read(), path)):
                    if isinstance(node, ast.Import):
                        names |= {a.name.split(".")[0] for a in node.names}
                    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                        names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "__future__"}


def declared(section: str) -> set[str]:
    """Normalised distribution names in setup.py's install_requires ('install') or extras ('extras')."""
    text = open(os.path.join(REPO_ROOT, "setup.py")).read()
    constants = dict(re.findall(r'^([A-Z_]+) = "([^"]+)"', text, re.M))
    body = re.sub(r'^[A-Z_]+ = "[^"]+"', "", text, flags=re.M).split("extras_require")[0 if section == "install" else 1]
    reqs = re.findall(r'"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?[<>=~!]', body) + [
        re.split(r"[<>=~!\[]", constants[c])[0] for c in re.findall(r"\b([A-Z_]+),", body) if c in constants]
    return {re.sub(r"[-_.]+", "-", r).lower() for r in reqs}


def missing(folder: str, allowed: set[str]) -> list[str]:
    dists = importlib.metadata.packages_distributions()
    out = []
    for name in sorted(imported_top_level(folder)):
        if name in PROVIDED:
            continue
        options = {re.sub(r"[-_.]+", "-", d).lower() for d in dists.get(name, [name])}
        if not options & allowed:
            out.append(f"{folder} imports {name!r} (from {sorted(options)}), not declared in setup.py")
    return out


def test_library_imports_are_declared():
    assert missing("jdjax", declared("install") | declared("extras")) == []


def test_test_imports_are_declared():
    assert missing("tests", declared("install") | declared("extras")) == []


def test_one_torch_constraint():
    text = open(os.path.join(REPO_ROOT, "setup.py")).read()
    assert len(re.findall(r'"torch[<>=~!]', text)) == 1
