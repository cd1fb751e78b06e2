"""Declared dependencies equal used ones: every third-party import is declared in pyproject.toml, and every
declared dependency is imported somewhere or is in the short list of those used without an import statement."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CODE = ("tasks", "flows", "benchmarks", "tests")

# Declared but used without an import statement of ours, each with why.
IMPLICIT = {
    "pylibjpeg": "pydicom's pixel-data plugin manager (JPEG family decoding)",
    "pylibjpeg-openjpeg": "pydicom decodes JPEG 2000 through it",
    "pylibjpeg-libjpeg": "pydicom decodes JPEG / JPEG-LS through it",
    "pylibjpeg-rle": "pydicom decodes RLE Lossless through it",
    "python-gdcm": "pydicom's GDCM pixel handler (second decoder)",
    "onnx": "torch.onnx.export writes the model through it",
    "fastapi": "a version pin: prefect 3.8.8's server breaks with fastapi >= 0.155",
    "pydicom-data": "test data: pydicom finds its files through an entry point",
    "dvc": "run as a command (python -m dvc) by the flow, make and the tests",
    "pytest": "the test runner",
    "ruff": "the linter (make lint)",
}


# Imported only inside a try block, for a feature that works without them.
OPTIONAL_IMPORTS = {"medmnist": "tasks/sources/medmnist.py: the package's download, used only when online"}


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].strip().lower().replace("_", "-")


def declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + [r for group in project["optional-dependencies"].values() for r in group]
    return {_name(r) for r in reqs}


def imported_top_levels() -> dict[str, list[str]]:
    """Top-level module name -> files importing it, for every non-project, non-stdlib import."""
    found: dict[str, list[str]] = {}
    for folder in CODE:
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    top = name.split(".")[0]
                    if top in ("tasks", "flows", "tests", "benchmarks") or top in sys.stdlib_module_names:
                        continue
                    found.setdefault(top, []).append(str(path.relative_to(REPO)))
    return found


def test_every_import_is_declared():
    dists = packages_distributions()
    wanted = declared()
    missing = {}
    for top, files in imported_top_levels().items():
        names = {d.lower().replace("_", "-") for d in dists.get(top, [])}
        if not names & wanted and top not in OPTIONAL_IMPORTS:
            missing[top] = (sorted(names), sorted(set(files))[:3])
    assert not missing, f"imported but not declared in pyproject.toml (module: (distributions, files)): {missing}"


def test_every_declared_dependency_is_used():
    dists = packages_distributions()
    used = {d.lower().replace("_", "-") for top in imported_top_levels() for d in dists.get(top, [])}
    unused = sorted(declared() - used - set(IMPLICIT))
    assert not unused, f"declared in pyproject.toml but never imported (drop them or say why in IMPLICIT): {unused}"
    stale = sorted(set(IMPLICIT) - declared())
    assert not stale, f"IMPLICIT lists packages that are no longer declared: {stale}"
