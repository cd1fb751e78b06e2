"""The architecture, checked by ``ast`` over tasks/ and flows/ (every import: top level, lazy, TYPE_CHECKING).

* Libraries live in their rooms: pydicom only in tasks/dicom/, mlflow only in tasks/tracking.py and the pyfunc
  wrapper MLflow loads, prefect never in tasks/; flows/ take nothing from tasks/ but tasks.config (flows
  orchestrate, DVC runs the stages).
* No import cycles among project modules.
* No upward imports: a module imports its own layer or lower (LAYERS below); stage modules import no other stage,
  and nothing in tasks/ or flows/ imports a stage module (DVC and the tests run them).
* tasks/coreml/pyfunc.py imports nothing from the project: MLflow loads it as a standalone file.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import pytest

from tests.test_dvc_contract import REPO, Import, imports_of, module_file, module_name, project_files

STAGE_MODULES = ("synth", "ingest", "preprocess", "train", "evaluate", "export", "promote")

# bottom to top; a module (or a package and everything under it) may import its own layer or lower
LAYERS: tuple[tuple[str, ...], ...] = (
    ("tasks", "tasks.config", "tasks.provenance"),  # schema, hashes: no project imports but the schema
    # leaf services: numbers, MLflow, DICOM files, spatial transforms, the evaluate stage's file layout
    ("tasks.metrics", "tasks.segmetrics", "tasks.tracking", "tasks.dicom", "tasks.spatial", "tasks.evaluate_files"),
    ("tasks.sources", "tasks.models"),  # where images come from; networks and their fitting
    ("tasks.coreml", "tasks.reporting", "tasks.evaluate_seg"),  # built on models / tracking (and the segmentation
    # evaluation, which the evaluate stage hands a segmentation task to)
    tuple(f"tasks.{s}" for s in STAGE_MODULES),  # one module per DVC stage
)

# (library, who may import it, why)
LIBRARY_ROOMS = (
    ("pydicom", ("tasks/dicom/",), "DICOM in and out lives in tasks/dicom/"),
    ("mlflow", ("tasks/tracking.py", "tasks/coreml/pyfunc.py"), "MLflow lives in tasks/tracking.py (+ the pyfunc)"),
    ("prefect", ("flows/",), "tasks/ never imports Prefect; flows/ orchestrate"),
)


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def all_imports(path: Path) -> Iterator[tuple[str, int, str]]:
    """(top-level package, line, statement) of every absolute import in ``path``, wherever it is."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], node.lineno, f"import {alias.name}"
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0], node.lineno, f"from {node.module} import ..."


def layer_of(module: str) -> int | None:
    """The index in LAYERS of ``module`` (a listed module, or anything under a listed package), or None."""
    best: tuple[int, int] | None = None  # (length of the matching name, layer): the most specific entry wins
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > best[0]):
                best = (len(name), i)
    return None if best is None else best[1]


def project_imports() -> list[Import]:
    """Every project import of every project file."""
    return [imp for path in project_files() for imp in imports_of(path)]


def _where(imp: Import) -> str:
    return f"{_rel(module_file(imp.source))}:{imp.line} `{imp.text}`"


FILES = [_rel(p) for p in project_files()]


def test_project_is_scanned() -> None:
    """The scan sees the modules the rules are about (a broken walker would pass every rule vacuously)."""
    mods = {module_name(REPO / f) for f in FILES}
    expected = {"tasks.config", "tasks.tracking", "tasks.dicom.read", "tasks.coreml.pyfunc", "flows.pipeline"}
    assert expected <= mods, f"missing from the scan: {sorted(expected - mods)}"
    assert len(project_imports()) > 30, "the import scan found almost nothing: the walker is broken"


@pytest.mark.parametrize("library, allowed, why", LIBRARY_ROOMS, ids=[r[0] for r in LIBRARY_ROOMS])
def test_library_lives_in_its_room(library: str, allowed: tuple[str, ...], why: str) -> None:
    bad = [
        f"{f}:{line} `{text}`"
        for f in FILES
        if not any(f == a or (a.endswith("/") and f.startswith(a)) for a in allowed)
        for top, line, text in all_imports(REPO / f)
        if top == library
    ]
    assert not bad, f"{library} imported outside {', '.join(allowed)} ({why}):\n  " + "\n  ".join(bad)


def test_every_project_import_resolves() -> None:
    bad = [_where(i) + f": no module {i.module}" for i in project_imports() if module_file(i.module) is None]
    assert not bad, "imports of project modules that do not exist:\n  " + "\n  ".join(bad)


def test_flows_take_only_the_schema_from_tasks() -> None:
    """flows/ orchestrate (DVC runs the stages): from tasks/ they read only tasks.config."""
    bad = [
        _where(i)
        for i in project_imports()
        if i.source.startswith("flows") and i.module.startswith("tasks") and i.module != "tasks.config"
    ]
    assert not bad, "flows/ import computation from tasks/ (only tasks.config is allowed):\n  " + "\n  ".join(bad)


def test_pyfunc_is_standalone() -> None:
    """MLflow loads tasks/coreml/pyfunc.py as a file (code_paths), without the project on sys.path."""
    bad = [_where(i) for i in imports_of(REPO / "tasks/coreml/pyfunc.py")]
    assert not bad, "tasks/coreml/pyfunc.py imports project modules:\n  " + "\n  ".join(bad)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (or a self-import), by Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def shortest_cycle(edges: dict[str, set[str]], comp: list[str]) -> list[str]:
    """One shortest cycle through the first module of a strongly connected component: ``[a, b, ..., a]``."""
    start, inside = comp[0], set(comp)
    prev: dict[str, str] = {}
    todo = [start]
    while todo:
        nxt = []
        for v in todo:
            for w in sorted(edges.get(v, set()) & inside):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        todo = nxt
    raise AssertionError(f"no cycle through {start} in {comp}")


def test_no_import_cycles() -> None:
    """No cycle among project modules, counting every import (lazy ones too: they only hide a cycle)."""
    imps = project_imports()
    edges: dict[str, set[str]] = {}
    for i in imps:
        edges.setdefault(i.source, set()).add(i.module)
    detail = []
    for comp in _cycles(edges):
        cycle = shortest_cycle(edges, comp)
        steps = [next(i for i in imps if i.source == a and i.module == b) for a, b in pairwise(cycle)]
        detail.append(
            " -> ".join(cycle)
            + "".join(f"\n    {_where(i)}" for i in steps)
            + (f"\n    (one cycle of the group {', '.join(comp)})" if len(comp) > len(cycle) - 1 else "")
        )
    assert not detail, "import cycles:\n  " + "\n  ".join(detail)


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    assert shortest_cycle({"a": {"b", "c"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c"]) == ["a", "c", "a"]
    assert shortest_cycle({"a": {"a"}}, ["a"]) == ["a", "a"]


def test_every_module_has_a_layer() -> None:
    bad = [f for f in FILES if f.startswith("tasks/") and layer_of(module_name(REPO / f)) is None]
    assert not bad, f"modules in no layer (add them to LAYERS in {_rel(Path(__file__))}):\n  " + "\n  ".join(bad)


def test_no_upward_imports() -> None:
    """A module imports its own layer or lower; a stage module imports no other stage; nothing in the project
    imports a stage module (DVC runs them; the tests call them)."""
    stages = {f"tasks.{s}" for s in STAGE_MODULES}
    bad = []
    for i in project_imports():
        if not (i.source.startswith("tasks") and i.module.startswith("tasks")):
            continue  # flows/ are checked by test_flows_take_only_the_schema_from_tasks
        src, dst = layer_of(i.source), layer_of(i.module)
        if i.module in stages and i.module != i.source:
            bad.append(f"{_where(i)}: imports the stage module {i.module}")
        elif src is not None and dst is not None and dst > src:
            bad.append(f"{_where(i)}: layer {src} {LAYERS[src][:3]} imports layer {dst} ({i.module})")
    assert not bad, "upward imports:\n  " + "\n  ".join(bad)


def test_layer_rule_can_fail() -> None:
    assert layer_of("tasks.dicom.read") == 1 and layer_of("tasks.train") == len(LAYERS) - 1
    assert layer_of("tasks.config") < layer_of("tasks.models.fit") < layer_of("tasks.coreml.convert")
