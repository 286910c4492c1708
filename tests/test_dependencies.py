"""Every third-party package the library imports is declared in pyproject.toml.

A plain `pip install .` installs only what is declared; an undeclared import works on a machine
where something else pulled it in and fails with ModuleNotFoundError elsewhere (click was such a
case: typer stopped depending on it)."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# Modules that may import an optional extra (they name it in their error when missing).
TEXT_MODULES = ("cgtools/text/", "cgtools/cli/tokenize.py", "cgtools/cli/detokenize.py",
                "cgtools/cli/perplexity.py")
IMAGES_MODULES = ("cgtools/images/", "cgtools/cli/images.py", "cgtools/cli/mmd.py")
EXTRA_MODULES = {"text": TEXT_MODULES, "images": IMAGES_MODULES}


def _top_level_imports(root: Path) -> dict[str, list[str]]:
    """{top-level module: files importing it} over every module of the package, including
    imports inside functions (the CLI imports lazily)."""
    found: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                files = found.setdefault(name.split(".")[0], [])
                if str(path.relative_to(ROOT)) not in files:
                    files.append(str(path.relative_to(ROOT)))
    return found


def test_every_third_party_import_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = lambda deps: {_canonical(re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0]) for d in deps}  # noqa: E731
    core = names(project["dependencies"])
    extras = {extra: (prefixes, core | names(project["optional-dependencies"][extra]))
              for extra, prefixes in EXTRA_MODULES.items()}
    owners = packages_distributions()
    imports = _top_level_imports(ROOT / "cgtools")
    third_party = {m: f for m, f in imports.items()
                   if m not in sys.stdlib_module_names and m != "cgtools" and m != "__future__"}
    assert {"torch", "typer", "click", "pyarrow"} <= set(third_party)  # the scan sees real imports
    missing = {}
    for module, files in third_party.items():
        dists = {_canonical(d) for d in owners.get(module, [module])}
        for where in files:
            declared = next((deps for prefixes, deps in extras.values() if where.startswith(prefixes)), core)
            if not dists & declared:
                missing[module] = (sorted(dists), where)
    assert not missing, (f"imported but not declared in pyproject.toml ([project.dependencies], or the "
                         f"extra of {EXTRA_MODULES}): {missing}")
