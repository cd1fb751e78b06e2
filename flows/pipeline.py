"""The medpipe Prefect flow: run the DVC stages in order, letting DVC's cache decide what reruns.

Orchestration only: which stages, in what order, with which retries. The work happens in ``python -m tasks.<stage>``
processes that DVC starts, so running this flow and running ``dvc repro`` / ``dvc exp run`` produce the same
``dvc.lock`` and outputs.

The flow never writes the working tree's ``params.yaml``: a scheduled run runs what is there (the committed
settings). Overrides run as a DVC experiment (``dvc exp run --temp -S key=value``) in a temporary copy of the
workspace: the experiment is recorded in ``dvc exp show`` (params, metrics) and in MLflow (the training run is
tagged ``dvc.exp_name``), and the working tree keeps its params, outputs and ``dvc.lock``.

    python -m flows.pipeline                                   # the pipeline on params.yaml, in the working tree
    python -m flows.pipeline -S train.epochs=2 -S base.seed=3  # a DVC experiment; params.yaml is left as it is
    python -m flows.pipeline --epochs 2 --seed 3               # the same, with the shortcut flags
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

STAGES = ("synth", "ingest", "preprocess", "train", "evaluate", "export", "promote")
# stages that talk to something outside the repo (a mounted DICOM share, the MLflow server) get more retries
RETRIES = {"ingest": 2, "train": 1, "promote": 3}
METRICS = "reports/evaluate/metrics.json"
REGISTRY = "models/registry.json"


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for DVC: this interpreter's bin/ first, so `python` in dvc.yaml is the project's venv."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def _dvc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run a quiet DVC command (status, exp show) and capture its output."""
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=_env(), capture_output=True, text=True)


def _stream(args: list[str], cwd: Path, env: dict[str, str], log: Callable[[str], None]) -> tuple[int, list[str]]:
    """Run a command and hand each line of its output (stdout and stderr) to ``log`` as it comes.

    Progress bars redraw a line with carriage returns: only the last state of such a line is logged.

    Returns:
        (exit status, the logged lines).
    """
    lines: list[str] = []
    with subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n").rsplit("\r", 1)[-1].rstrip()
            if line:
                lines.append(line)
                log(line)
    return proc.returncode, lines


@task(name="validate-params")
def check_params(repo: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """Validate the whole params.yaml with the overrides applied, before DVC decides anything.

    Raises:
        tasks.config.ParamsError: naming the file, every offending dotted key and the expected form.
    """
    from tasks.config import load_params

    return load_params(repo / "params.yaml", overrides).model_dump(mode="json")


@task(name="dvc-status")
def changed_stages(repo: Path) -> list[str]:
    """Stages DVC considers changed (code, data, params or missing outputs)."""
    res = _dvc("status", "--json", cwd=repo)
    if res.returncode != 0:
        raise RuntimeError(f"dvc status failed in {repo}:\n{res.stdout}{res.stderr}")
    status = json.loads(res.stdout or "{}")
    return [s for s in STAGES if any(k == s or k.endswith(f":{s}") for k in status)]


def _stage_task(stage: str):
    @task(name=f"stage-{stage}", retries=RETRIES.get(stage, 0), retry_delay_seconds=5)
    def run_stage(repo: Path, force: bool = False) -> dict[str, Any]:
        logger = get_run_logger()
        t0 = time.perf_counter()
        args = [sys.executable, "-m", "dvc", "repro", "--single-item", *(["--force"] if force else []), stage]
        rc, lines = _stream(args, repo, _env(), logger.info)
        if rc != 0:
            raise RuntimeError(f"stage {stage} failed (dvc repro exit {rc}); see the log above")
        ran = not any("didn't change, skipping" in line for line in lines)
        return {"stage": stage, "ran": ran, "seconds": round(time.perf_counter() - t0, 2)}

    return run_stage


STAGE_TASKS = {s: _stage_task(s) for s in STAGES}


def _hydra_value(value: Any) -> str:
    """``value`` in the override grammar ``dvc exp run -S`` parses (Hydra's): JSON for numbers, booleans, null and
    lists; strings single-quoted, so that ``"1"`` or ``"null"`` stay strings (a quote is escaped with a backslash,
    and so are the backslashes before a quote or the closing quote; ``${`` is escaped from OmegaConf's
    interpolation)."""
    if isinstance(value, str):
        quoted = re.sub(r"(\\*)('|\Z)", lambda m: m[1] * 2 + ("\\'" if m[2] else ""), value)
        return "'" + quoted.replace("${", "\\${") + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    return json.dumps(value)


def _flat(overrides: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train.svm": {"C": 2}} -> {"train.svm.C": 2}``: one ``-S`` per leaf key."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _mlflow_uri(repo: Path) -> str:
    """The tracking URI the stages would use in ``repo`` (``tasks.tracking.tracking_uri`` run there): the user's
    ``MLFLOW_TRACKING_URI``, or the repo's own sqlite store under ``<repo>/mlflow/``."""
    res = subprocess.run([sys.executable, "-c", "from tasks.tracking import tracking_uri; print(tracking_uri())"],
                         cwd=repo, env=_env(), capture_output=True, text=True)  # fmt: skip
    if res.returncode != 0:
        raise RuntimeError(f"{repo}: could not resolve the MLflow tracking URI:\n{res.stderr}")
    return res.stdout.strip().splitlines()[-1]


@task(name="dvc-exp-run", retries=1, retry_delay_seconds=5)
def run_experiment(repo: Path, overrides: dict[str, Any], name: str, force: bool = False) -> dict[str, Any]:
    """All stages as one DVC experiment (``dvc exp run --temp``) in a temporary copy of the workspace.

    DVC applies the overrides to the copy's params.yaml, reruns what they change (the rest comes from the DVC
    cache), commits the result to the experiment ref ``name`` and leaves the working tree as it was. The stages run
    in ``.dvc/tmp/exps/...``, so MLflow is pointed at the repo's own store (unless ``MLFLOW_TRACKING_URI`` is set).

    Returns:
        ``{"stages": [{"stage", "ran"}...], "seconds": float}``.
    """
    logger = get_run_logger()
    t0 = time.perf_counter()
    sets = [a for k, v in _flat(overrides).items() for a in ("-S", f"{k}={_hydra_value(v)}")]
    args = [sys.executable, "-m", "dvc", "exp", "run", "--temp", "--name", name, *(["--force"] if force else []), *sets]
    env = _env({"MLFLOW_TRACKING_URI": _mlflow_uri(repo)})
    logger.info("experiment %s: %s", name, " ".join(args[2:]))
    rc, lines = _stream(args, repo, env, logger.info)
    if rc != 0:
        raise RuntimeError(f"experiment {name} failed (dvc exp run exit {rc}); see the log above")
    stages = []
    for line in lines:
        for stage in STAGES:
            if line.startswith(f"Running stage '{stage}'"):
                stages.append({"stage": stage, "ran": True})
            elif line.startswith(f"Stage '{stage}' didn't change"):
                stages.append({"stage": stage, "ran": False})
    return {"stages": stages, "seconds": round(time.perf_counter() - t0, 2)}


@task(name="dvc-exp-show")
def experiment_results(repo: Path, name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The metrics and registry entry of experiment ``name``, read from its commit.

    Read from DVC's record of the experiment (the files it committed: ``reports/evaluate/metrics.json`` and
    ``models/registry.json`` are git-tracked ``cache: false`` outputs) rather than from MLflow: they are the very
    files a working-tree run returns, ``dvc exp show`` shows the same numbers, and they do not depend on the tracking
    server being reachable. The params DVC recorded are checked against the overrides, so that a value the ``-S``
    grammar read differently from the schema-validated one fails here, naming the key.

    Returns:
        ``{"rev": str, "params": {...}, "metrics": {...}, "registry": {...}}``.
    """
    res = _dvc("exp", "show", "--json", cwd=repo)
    if res.returncode != 0:
        raise RuntimeError(f"dvc exp show failed in {repo}:\n{res.stderr}")
    found = [rev for baseline in json.loads(res.stdout) for exp in baseline.get("experiments") or []
             for rev in exp.get("revs") or [] if rev.get("name") == name]  # fmt: skip
    if not found:
        raise RuntimeError(f"{repo}: `dvc exp show` lists no experiment named {name!r}")
    exp = found[0]
    data = exp.get("data") or {}
    params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
    for dotted, want in json.loads(json.dumps(_flat(overrides))).items():
        node: Any = params
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node != want:
            raise RuntimeError(f"experiment {name}: params.yaml has {dotted}={node!r}, the override was {want!r}")
    metrics = ((data.get("metrics") or {}).get(METRICS) or {}).get("data") or {}
    shown = subprocess.run(["git", "show", f"{exp['rev']}:{REGISTRY}"], cwd=repo, capture_output=True, text=True)
    registry = json.loads(shown.stdout) if shown.returncode == 0 else {}
    return {"rev": exp["rev"], "params": params, "metrics": metrics, "registry": registry}


def _experiment_name() -> str:
    """A DVC experiment name that leads back to the Prefect flow run: ``<flow run name>-<id prefix>``."""
    from prefect.runtime import flow_run

    run_id = str(flow_run.id or "")[:8] or time.strftime("%Y%m%d-%H%M%S")
    return f"{flow_run.name or 'flow'}-{run_id}"


@flow(name="medpipe-pipeline", log_prints=True)
def pipeline(
    repo: str = ".",
    input_path: str | None = None,
    labels_csv: str | None = None,
    family: str | None = None,
    epochs: int | None = None,
    seed: int | None = None,
    overrides: dict[str, Any] | None = None,
    name: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """synth -> ingest -> preprocess -> train -> evaluate -> export -> promote, through DVC.

    Without overrides the stages run in the working tree, one Prefect task each (``dvc repro --single-item``). With
    any, the whole pipeline runs as the DVC experiment ``name`` (``dvc exp run --temp -S ...``): params.yaml and
    the working tree's outputs are left as they are.

    Args:
        repo: the medpipe repository (a DVC project in a git repository) to run in.
        input_path: ``ingest.input`` (a DICOM folder or a MedMNIST .npz). An experiment sees the committed workspace
            plus DVC-tracked data: give a path that DVC tracks (``dvc add``) or an absolute one.
        labels_csv: ``ingest.labels_csv``, relative to the input folder.
        family: ``train.family`` (cnn | rnn | svm).
        epochs: ``train.epochs``.
        seed: ``base.seed`` (training; the patient split has its own ``base.split_seed``).
        overrides: any other dotted keys, e.g. ``{"train.lr": 0.001, "base.split_seed": 7}``.
        name: the experiment's name (default: the Prefect flow run's name and id); unused without overrides.
        force: rerun every stage even if DVC says nothing changed.

    Returns:
        ``{"stages": [...], "message": str, "metrics": {...}, "registry": {...}, "experiment": str | None}``.

    Raises:
        tasks.config.ParamsError: params.yaml with the overrides does not match the schema (nothing has run).
    """
    root = Path(repo).resolve()
    named = {"ingest.input": input_path, "ingest.labels_csv": labels_csv, "train.family": family,
             "train.epochs": epochs, "base.seed": seed}  # fmt: skip
    changes = {**{k: v for k, v in named.items() if v is not None}, **_flat(overrides or {})}
    check_params(root, changes)
    if changes:
        name = name or _experiment_name()
        print(f"overrides {changes}: running them as DVC experiment {name!r}; params.yaml is not modified")
        ran = run_experiment(root, changes, name, force)
        result = experiment_results(root, name, changes)
        executed = [s["stage"] for s in ran["stages"] if s["ran"]]
        message = f"experiment {name}: stages executed: {', '.join(executed) or 'none'} (see `dvc exp show`)"
        print(message)
        return {"stages": ran["stages"], "message": message, "metrics": result["metrics"],
                "registry": result["registry"], "experiment": name}  # fmt: skip
    if not force and not changed_stages(root):
        message = "Pipeline is up to date: DVC reports no changed stage, so no stage was executed."
        stages: list[dict[str, Any]] = []
    else:
        stages = [STAGE_TASKS[s](root, force) for s in STAGES]
        message = f"stages executed: {', '.join(s['stage'] for s in stages if s['ran']) or 'none'}"
    print(message)
    return {"stages": stages, "message": message, "metrics": _read_json(root / METRICS),
            "registry": _read_json(root / REGISTRY), "experiment": None}  # fmt: skip


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _parse_set(text: str) -> tuple[str, Any]:
    """``"train.epochs=2"`` -> ``("train.epochs", 2)``; the value is read as YAML (``[32,32]``, ``null``, ``cnn``)."""
    from ruamel.yaml import YAML

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE, e.g. train.epochs=2")
    return key.strip(), YAML(typ="safe").load(value)


def registry_lines(reg: dict[str, Any]) -> list[str]:
    """What the run registered, and the champion when that is another version (registry.json of promote)."""
    name, version, alias = reg.get("model_name"), reg.get("version"), reg.get("alias")
    lines = [f"Registered model: models:/{name}/{version} (alias @{alias})"]
    champion = reg.get("previous_champion")
    if alias != "champion" and champion and str(champion) != str(version):
        lines.append(f"Champion:         models:/{name}/{champion} (alias @champion, kept: {reg.get('reason')})")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.splitlines()[0])
    ap.add_argument("--repo", default=".")
    ap.add_argument("-S", "--set", dest="sets", action="append", type=_parse_set, default=[], metavar="KEY=VALUE",
                    help="override a params key (repeatable); the run becomes a DVC experiment")  # fmt: skip
    ap.add_argument("--input", help="ingest.input")
    ap.add_argument("--labels-csv", help="ingest.labels_csv")
    ap.add_argument("--family", choices=["cnn", "rnn", "svm"])
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--seed", type=int, help="base.seed")
    ap.add_argument("--name", help="the experiment's name (with overrides)")
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    from tasks.config import ParamsError

    try:
        result = pipeline(
            repo=a.repo, input_path=a.input, labels_csv=a.labels_csv, family=a.family, epochs=a.epochs, seed=a.seed,
            overrides=dict(a.sets) or None, name=a.name, force=a.force,
        )
    except ParamsError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None
    m, reg = result["metrics"], result["registry"]
    if m:
        print("\nTest metrics:")
        for k in ("accuracy", "precision", "recall", "f1", "auc"):
            if f"test_{k}" in m:
                lo, hi = m[f"test_{k}_ci_low"], m[f"test_{k}_ci_high"]
                print(f"  {k:<10} {m[f'test_{k}']:.4f}  95% CI [{lo:.4f}, {hi:.4f}]")
    if reg:
        print("\n" + "\n".join(registry_lines(reg)))
    if result["experiment"]:
        print(f"\nDVC experiment {result['experiment']}: `dvc exp show`; `dvc exp apply {result['experiment']}` "
              "brings it into the working tree")  # fmt: skip


if __name__ == "__main__":
    main()
