"""The DVC graph is checked, not hoped for: every stage in dvc.yaml declares what its command really uses.

For each stage (parsed by DVC itself, so ``${...}`` is resolved exactly as ``dvc repro`` resolves it):

* code: the project modules ``python -m tasks.<stage>`` imports, transitively (every ``import`` anywhere in a file,
  lazy ones in functions included, and the package ``__init__.py`` files on the way) are covered by deps, and no
  project file the stage does not import is a dep (an unrelated edit would rerun it);
* params: the keys ``main()`` reads from the loaded ``Params`` (attribute chains, resolved through the schema) are
  exactly the keys dvc.yaml lists (a group covers its sub-keys; a group is declared only when all of it is read);
* data: the command's input arguments are deps, its output arguments are outs;
* optional inputs (``ingest.labels_csv: null``, a MedMNIST ``.npz`` as ``ingest.input``) keep the graph valid.
"""

from __future__ import annotations

import ast
import functools
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("tasks", "flows")

# command-line flags that name what a stage reads / writes (``--params`` is the params file: DVC tracks its keys)
INPUT_FLAGS = ("--input", "--model", "--data", "--export", "--metrics", "--ingest-summary")
OUTPUT_FLAGS = ("--output", "--history")
# scratch a stage keeps between attempts (train's resume checkpoint): never an out (a `persist` out switches off DVC's
# run cache), never a dep, and git-ignored
SCRATCH_FLAGS = ("--checkpoints",)
# params keys whose value is a path the stage reads (the input does not appear on the command line)
INPUT_KEY = "ingest.input"  # the data set ingest reads: a DICOM folder (its label table inside) or a MedMNIST .npz
PARAM_INPUTS = {"ingest": (INPUT_KEY,)}
LOADERS = ("load_params", "load_params_or_exit")


# ---------------------------------------------------------------------------------------------- project imports


@dataclass(frozen=True)
class Import:
    """One import statement's project target: ``module`` is what the statement names (a submodule when
    ``from pkg import sub`` names one, else the package or module itself); ``line`` is where it is."""

    source: str
    module: str
    line: int
    text: str


def module_file(name: str, root: Path = REPO) -> Path | None:
    """The file of project module ``name`` (``tasks.dicom`` -> tasks/dicom/__init__.py), or None."""
    if name.split(".")[0] not in PROJECT_PACKAGES:
        return None
    p = root.joinpath(*name.split("."))
    if (p / "__init__.py").is_file():
        return p / "__init__.py"
    return p.with_suffix(".py") if p.with_suffix(".py").is_file() else None


def module_name(path: Path, root: Path = REPO) -> str:
    """``tasks/dicom/read.py`` -> ``tasks.dicom.read``; ``tasks/dicom/__init__.py`` -> ``tasks.dicom``."""
    parts = list(path.resolve().relative_to(root.resolve()).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_files(root: Path = REPO) -> list[Path]:
    """Every .py file of the project packages (tasks/, flows/), sorted."""
    return sorted(p for pkg in PROJECT_PACKAGES for p in (root / pkg).rglob("*.py") if "__pycache__" not in p.parts)


def imports_of(path: Path, root: Path = REPO) -> Iterator[Import]:
    """Every project import in ``path``: top level, in functions, under ``TYPE_CHECKING``, relative or absolute.

    Names only what each statement names (no parent packages): ``from tasks.dicom import read_dicom`` is
    ``tasks.dicom``, ``from tasks.coreml import pyfunc`` is ``tasks.coreml.pyfunc``. A project name that is not a
    file is yielded as written (the layout test reports it).
    """
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PROJECT_PACKAGES:
                    yield Import(me, alias.name, node.lineno, f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            if base.split(".")[0] not in PROJECT_PACKAGES:
                continue
            names = ", ".join(a.name for a in node.names)
            text = f"from {'.' * node.level}{node.module or ''} import {names}"
            targets = {f"{base}.{a.name}" if module_file(f"{base}.{a.name}", root) else base for a in node.names}
            for target in sorted(targets):  # one per module: `from tasks.x import a, b` is one import of tasks.x
                yield Import(me, target, node.lineno, text)


def parents_of(module: str) -> list[str]:
    """``tasks.dicom.read`` -> ``["tasks", "tasks.dicom"]``: the packages Python imports first."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def loaded_modules(entry: str, root: Path = REPO) -> set[str]:
    """The project modules that ``python -m <entry>`` can load: the entry, everything it imports anywhere
    (transitively), and every package ``__init__`` on the way."""
    seen: set[str] = set()
    todo = [entry]
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        todo.extend(parents_of(mod))
        path = module_file(mod, root)
        if path is not None:
            todo.extend(i.module for i in imports_of(path, root))
    return {m for m in seen if module_file(m, root) is not None}


# ---------------------------------------------------------------------------------------------- dvc.yaml, by DVC


@dataclass
class Stage:
    """A resolved dvc.yaml stage: the command's tokens, deps / outs as repo-relative posix paths, params keys."""

    name: str
    argv: list[str]
    deps: list[str]
    outs: list[str]
    params: list[str]

    def flag(self, name: str) -> str | None:
        """The value of ``--name VALUE`` / ``--name=VALUE`` in the command, or None."""
        for i, tok in enumerate(self.argv):
            if tok == name and i + 1 < len(self.argv):
                return self.argv[i + 1]
            if tok.startswith(name + "="):
                return tok.split("=", 1)[1]
        return None


def _posix(p: str) -> str:
    return PurePosixPath(p.replace("\\", "/")).as_posix().rstrip("/")


def load_stages(root: Path = REPO) -> dict[str, Stage]:
    """dvc.yaml's stages as DVC resolves them (``${...}`` from params.yaml); a resolve error fails here, with DVC's
    message (which names the stage and the key)."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    stages: dict[str, Stage] = {}
    with Repo(str(root)) as repo:
        for s in repo.index.stages:
            cmd = s.cmd if isinstance(s.cmd, str) else " && ".join(s.cmd)
            params: list[str] = []
            deps: list[str] = []
            for d in s.deps:
                if isinstance(d, ParamsDependency):
                    assert _posix(d.def_path) == "params.yaml", f"stage {s.name}: params from {d.def_path}"
                    params.extend(d.params or [])
                else:
                    deps.append(_posix(d.def_path))
            stages[s.name] = Stage(s.name, shlex.split(cmd), deps, [_posix(o.def_path) for o in s.outs], params)
    return stages


def covers(folder_or_file: str, path: str) -> bool:
    """Whether a DVC path (a file, or a folder = everything under it) includes ``path``."""
    return path == folder_or_file or path.startswith(folder_or_file + "/")


def key_covers(group: str, key: str) -> bool:
    """Whether a declared params key includes ``key`` (itself, or a group above it: ``base`` covers ``base.seed``)."""
    return key == group or key.startswith(group + ".")


def stage_module(stage: Stage) -> str:
    """The ``tasks.<x>`` module of a ``python -m tasks.<x> ...`` command (asserted)."""
    argv = stage.argv
    ok = len(argv) >= 3 and argv[0] == "python" and argv[1] == "-m" and argv[2].startswith("tasks.")
    assert ok, f"stage {stage.name}: cmd must be `python -m tasks.<module> ...`, got {' '.join(argv)!r}"
    assert module_file(argv[2]) is not None, f"stage {stage.name}: {argv[2]} is not a module under tasks/"
    return argv[2]


# ---------------------------------------------------------------------------------------------- params read


def _schema_node(key: str) -> tuple[Any, str]:
    """Resolve a dotted params key in tasks.config.Params: (the pydantic group class or None for a leaf, the key
    truncated where it stops naming params: ``base.class_names.index`` -> ``base.class_names``).

    Raises:
        KeyError: naming the first part that is not in the schema.
    """
    from pydantic import BaseModel

    from tasks.config import Params

    node: Any = Params
    done: list[str] = []
    for part in key.split(".") if key else []:
        if node is None:  # attribute of a value (a list's .index, a str's .lower): the key is what we have
            break
        if part in node.model_fields:
            ann = node.model_fields[part].annotation
            node = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
            done.append(part)
        elif hasattr(BaseModel, part):  # model_dump, model_copy: reads the whole group
            break
        else:
            raise KeyError(f"{'.'.join([*done, part])} (no field {part!r} in {node.__name__})")
    return node, ".".join(done)


def schema_leaves(key: str) -> set[str]:
    """Every leaf key under ``key`` in the schema (``key`` itself for a leaf)."""
    node, key = _schema_node(key)
    if node is None:
        return {key}
    out: set[str] = set()
    for name in node.model_fields:
        out |= schema_leaves(f"{key}.{name}" if key else name)
    return out


def _function(tree: ast.Module, name: str) -> ast.FunctionDef | None:
    return next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name), None)


@dataclass(frozen=True)
class Read:
    """One read of the loaded params: ``key`` is the attribute chain (``base.split_seed``), ``""`` for the whole
    ``Params`` handed on (``to`` says where); ``line`` is in the stage module."""

    key: str
    line: int
    to: str = ""


def params_read(path: Path) -> list[Read]:
    """The params ``main()`` in ``path`` reads: each attribute chain rooted at a variable assigned from
    ``load_params``/``load_params_or_exit`` (``params.base.split_seed`` -> ``base.split_seed``).

    Where the whole ``Params`` is passed to a function of the same module, the chains rooted at that function's
    parameter are followed too (so an old-style ``run(params)`` still shows what it reads); a whole-``Params`` use
    is also returned itself, as key ``""``.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    main = funcs.get("main")
    assert main is not None, f"{path.relative_to(REPO)}: no main()"
    names = set()
    for node in ast.walk(main):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            f = node.value.func
            called = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            if called in LOADERS:
                names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    assert names, f"{path.relative_to(REPO)}: main() never assigns {' / '.join(LOADERS)}(...) to a variable"
    return _chains(main, names, funcs, {"main"})


def _chains(fn: ast.FunctionDef, names: set[str], funcs: dict[str, ast.FunctionDef], seen: set[str]) -> list[Read]:
    parent = {child: node for node in ast.walk(fn) for child in ast.iter_child_nodes(node)}
    found: list[Read] = []
    for node in ast.walk(fn):
        if not (isinstance(node, ast.Name) and node.id in names and isinstance(node.ctx, ast.Load)):
            continue
        chain, up = [], parent.get(node)
        while isinstance(up, ast.Attribute):
            chain.append(up.attr)
            up = parent.get(up)
        if chain:
            found.append(Read(".".join(chain), node.lineno))
            continue
        call = up.value if isinstance(up, ast.keyword) else up
        if not isinstance(call, ast.Call):
            found.append(Read("", node.lineno, ast.unparse(up) if up is not None else node.id))
            continue
        callee = ast.unparse(call.func)
        found.append(Read("", node.lineno, f"{callee}()"))
        target = funcs.get(callee)
        if target is None or callee in seen:
            continue
        positional = [*target.args.posonlyargs, *target.args.args]
        if isinstance(up, ast.keyword):
            param = up.arg
        else:
            i = call.args.index(node)
            param = positional[i].arg if i < len(positional) else None
        if param:
            found.extend(_chains(target, {param}, funcs, seen | {callee}))
    return found


# ---------------------------------------------------------------------------------------------- the checks


@functools.cache
def stages() -> dict[str, Stage]:
    """The repository's dvc.yaml stages, parsed once (a parse error fails every test that needs them)."""
    return load_stages(REPO)


def _expected_stages() -> tuple[str, ...]:
    """synth, ingest, then preprocess .. promote once per task of params.yaml (``<stage>@<task>``)."""
    from tasks.config import load_params

    tasks = list(load_params(REPO / "params.yaml").tasks)
    per_task = ("preprocess", "train", "evaluate", "export", "promote")
    return ("synth", "ingest", *(f"{s}@{t}" for s in per_task for t in tasks))


EXPECTED_STAGES = _expected_stages()


def test_stages_are_the_pipeline() -> None:
    assert tuple(stages()) == EXPECTED_STAGES, f"dvc.yaml stages {tuple(stages())}, expected {EXPECTED_STAGES}"


def test_each_task_has_its_own_outputs() -> None:
    """No two tasks' stages write the same path, and each per-task out lives under a folder named after its task."""
    outs: dict[str, str] = {}
    for name, stage in stages().items():
        task = name.partition("@")[2]
        for out in stage.outs:
            assert out not in outs, f"{out}: written by {outs[out]} and {name}"
            outs[out] = name
            if task:
                assert f"/{task}/" in f"/{out}/", f"stage {name}: out {out} is not under a {task}/ folder"


@pytest.mark.parametrize("name", EXPECTED_STAGES)
def test_code_deps_are_the_imported_modules(name: str) -> None:
    """Deps cover every project file the command imports, and no other project file (folders: never, since a
    folder also covers its __pycache__/, which Python rewrites, and modules the stage may not import)."""
    stage = stages()[name]
    mod = stage_module(stage)
    used = sorted(module_file(m).relative_to(REPO).as_posix() for m in loaded_modules(mod))
    code_deps = [d for d in stage.deps if d.split("/")[0] in PROJECT_PACKAGES]
    missing = [f for f in used if not any(covers(d, f) for d in code_deps)]
    problems = []
    if missing:
        problems.append("imported but not a dep (an edit to them does not rerun it):\n    " + "\n    ".join(missing))
    for d in code_deps:
        target = REPO / d
        if target.is_dir():
            unused = [p.relative_to(REPO).as_posix() for p in sorted(target.rglob("*.py"))]
            unused = [f for f in unused if f not in used and "__pycache__" not in f]
            problems.append(
                f"folder dep {d}: list its imported files instead (a folder also hashes __pycache__/"
                + (f"; it covers unimported {', '.join(unused)}" if unused else "")
                + ")"
            )
        elif d not in used:
            why = "no such file" if not target.exists() else f"{mod} does not import it"
            problems.append(f"dep {d}: {why} (an edit to it would rerun the stage for nothing)")
    assert not problems, f"stage {name} ({mod}): " + "\n  ".join(problems)


@pytest.mark.parametrize("name", EXPECTED_STAGES)
def test_params_deps_are_the_keys_main_reads(name: str) -> None:
    """dvc.yaml's params list for the stage == the keys main() reads, through the schema."""
    stage = stages()[name]
    path = module_file(stage_module(stage))
    rel = path.relative_to(REPO).as_posix()
    problems, read = [], set()
    for r in params_read(path):
        if r.key == "":
            problems.append(f"{rel}:{r.line} hands the whole Params to {r.to} (pass the groups / keys it uses)")
            continue
        if r.key.split(".")[0] in ("task", "task_name"):  # Params.task: the task entry (tasks.<task> in dvc.yaml)
            read.add("task")
            continue
        try:
            key = _schema_node(r.key)[1]
        except KeyError as exc:
            problems.append(f"{rel}:{r.line} reads params.{r.key}: not in tasks.config.Params: {exc.args[0]}")
            continue
        if key:
            read.add(key)
        else:  # params.model_dump(): every key
            problems.append(f"{rel}:{r.line} reads the whole Params (params.{r.key}; read the groups / keys it uses)")
    declared = list(stage.params)
    task = name.partition("@")[2]
    if task:  # a per-task stage reads its task entry through Params.task and the merged groups
        entry = f"tasks.{task}"
        if entry not in declared:
            problems.append(f"a per-task stage must list {entry} (its kind, model name and overrides)")
        declared = [d for d in declared if d != entry]
        read = {k for k in read if k != "task"}
    for key in sorted(read):
        if not any(key_covers(d, key) for d in declared):
            problems.append(f"reads {key} but dvc.yaml does not list it (a change to it would not rerun the stage)")
    read_leaves = set().union(*(schema_leaves(k) for k in read)) if read else set()
    for d in declared:
        try:
            leaves = schema_leaves(d)
        except KeyError as exc:
            problems.append(f"lists {d}: not in tasks.config.Params: {exc.args[0]}")
            continue
        unread = sorted(leaves - read_leaves)
        if unread == sorted(leaves):
            problems.append(f"lists {d} but the stage never reads it (a change to it reruns the stage for nothing)")
        elif unread:
            problems.append(f"lists group {d} but the stage does not read {', '.join(unread)} (list the keys it reads)")
    assert not problems, f"stage {name} ({rel}), params {declared}, reads {sorted(read)}:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("name", EXPECTED_STAGES)
def test_run_takes_its_own_groups(name: str) -> None:
    """No stage's run() takes the whole Params: it gets its own group(s), so dvc.yaml can list what it reads."""
    path = module_file(stage_module(stages()[name]))
    run = _function(ast.parse(path.read_text()), "run")
    assert run is not None, f"{path.relative_to(REPO)}: no run()"
    args = [*run.args.posonlyargs, *run.args.args, *run.args.kwonlyargs]
    whole = [
        a.arg
        for a in args
        if a.annotation is not None
        and ast.unparse(a.annotation).replace("tasks.config.", "").replace("config.", "").strip("'\"") == "Params"
    ]
    assert not whole, f"{path.relative_to(REPO)}: run() takes the whole Params as {whole}; take the stage's groups"


@pytest.mark.parametrize("name", EXPECTED_STAGES)
def test_data_args_are_deps_and_outs(name: str) -> None:
    """Paths the command reads are deps, paths it writes are outs (a dep/out inside a named folder counts: the
    stage declares which of its files it uses)."""
    stage = stages()[name]
    problems = []

    def declared(path: str, paths: list[str]) -> bool:
        return any(covers(p, path) or covers(path, p) for p in paths)

    for flag in INPUT_FLAGS:
        value = stage.flag(flag)
        if value is not None and not declared(_posix(value), stage.deps):
            problems.append(f"{flag} {value} is not a dep")
    for flag in OUTPUT_FLAGS:
        value = stage.flag(flag)
        if value is not None and not declared(_posix(value), stage.outs):
            problems.append(f"{flag} {value} is not an out")
    for flag in SCRATCH_FLAGS:
        value = stage.flag(flag)
        if value is not None:
            if declared(_posix(value), stage.outs) or declared(_posix(value), stage.deps):
                problems.append(f"{flag} {value} is scratch: declared as a dep or out it defeats the run cache")
            ignored = subprocess.run(["git", "check-ignore", "-q", f"{_posix(value)}/x"], cwd=REPO)
            if ignored.returncode != 0:
                problems.append(f"{flag} {value} is scratch and must be git-ignored")
    if name in PARAM_INPUTS:
        from tasks.config import load_params

        params = load_params(REPO / "params.yaml")
        for key in PARAM_INPUTS[name]:
            value = param_value(params, key)
            if value is None:
                problems.append(f"reads its input from params {key}, which is not in the schema or not set")
            elif _posix(str(value)) not in stage.deps:
                problems.append(f"reads params {key} = {value} but it is not a dep (write `${{{key}}}` in deps)")
    assert not problems, f"stage {name}: " + "; ".join(problems)


def param_value(params: Any, key: str) -> Any:
    """The value of dotted ``key`` in a loaded ``Params`` (None when a part is missing)."""
    for part in key.split("."):
        params = getattr(params, part, None)
    return params


def null_interpolations(repo: Path) -> list[str]:
    """``stage: ${key}`` for every ``${key}`` in a dvc.yaml dep or out whose value in params.yaml is null (DVC then
    stops on a bare AssertionError)."""
    from ruamel.yaml import YAML

    yaml = YAML(typ="safe")
    dvc_yaml = yaml.load((repo / "dvc.yaml").read_text())
    raw = yaml.load((repo / "params.yaml").read_text())
    found = []
    for name, stage in (dvc_yaml.get("stages") or {}).items():
        entries = [*(stage.get("deps") or []), *(stage.get("outs") or [])]
        for entry in entries:
            for text in [entry] if isinstance(entry, str) else list(entry):
                for key in re.findall(r"\$\{\s*([\w.]+)\s*\}", text):
                    node: Any = raw
                    for part in key.split("."):
                        node = node.get(part) if isinstance(node, dict) else None
                    if node is None:
                        found.append(f"{name}: ${{{key}}}")
    return found


def _dvc(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True)


@pytest.mark.parametrize(
    "case, overrides",
    [
        ("unlabelled DICOM folder", {"ingest.labels_csv": None}),
        (
            "MedMNIST .npz",
            {"ingest.source": "medmnist", INPUT_KEY: "data/medmnist/adrenalmnist3d.npz", "ingest.labels_csv": None},
        ),
    ],
)
def test_optional_inputs_keep_the_graph_valid(tmp_path: Path, case: str, overrides: dict[str, Any]) -> None:
    """With an optional input absent, `dvc stage list` still parses the graph and ingest depends on its input."""
    from tasks.config import load_params
    from tests._repo import copy_repo

    repo = copy_repo(tmp_path / "repo", overrides)
    npz = repo / "data/medmnist/adrenalmnist3d.npz"
    npz.parent.mkdir(parents=True)
    npz.write_bytes(b"PK\x05\x06" + b"\0" * 18)  # an empty zip archive: a .npz that exists; no stage runs
    params = load_params(repo / "params.yaml")  # the case is a valid configuration
    nulls = null_interpolations(repo)
    assert not nulls, f"{case}: dvc.yaml deps/outs that resolve to null (DVC cannot build the graph): {nulls}"
    res = _dvc(repo, "stage", "list", "-v")  # -v: DVC's reason, not just "unexpected error"
    why = "\n".join(line for line in res.stderr.splitlines() if "ERROR" in line or "Error" in line)
    assert res.returncode == 0, f"{case}: `dvc stage list` fails:\n{why or res.stderr[-2000:]}"
    assert "ingest" in res.stdout, f"{case}: no ingest stage in `dvc stage list`:\n{res.stdout}"
    deps = load_stages(repo)["ingest"].deps
    value = param_value(params, INPUT_KEY)
    assert value in deps, f"{case}: ingest deps {deps} do not include {INPUT_KEY} = {value}"
