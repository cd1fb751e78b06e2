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

Each stage's output is relayed line by line as it comes (:mod:`flows.stream`). A failed stage fails its task with
the stage's own error line(s); only transient errors are retried (:mod:`flows.failures`). The CLI prints a failure
as one message on stderr and writes the full log, tracebacks included, to ``reports/logs/flow-<time>.log``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from flows.failures import StageFailed, failure_message, retry_if_transient, run_log
from flows.stream import TerminalBar, stage_env, stream

SHARED_STAGES = ("synth", "ingest")
TASK_STAGES = ("preprocess", "train", "evaluate", "export", "promote")  # once per task: dvc.yaml's <stage>@<task>
STAGES = (*SHARED_STAGES, *TASK_STAGES)
# Retries are for transient errors only (flows.failures.is_transient: I/O, network, a server, a DVC lock held):
# a stage that rejects its input fails at once. Stages that talk to something outside the repo (a mounted DICOM
# share, the MLflow server) get more tries.
RETRIES = {**dict.fromkeys(STAGES, 1), "ingest": 2, "promote": 3}
RETRY_DELAY_S = 5
# per task (dvc.yaml's paths): the headline metrics, their confidence intervals, what promote registered
METRICS = "reports/{task}/evaluate/metrics.json"
DETAILS = "reports/{task}/evaluate/details.json"
REGISTRY = "models/{task}/registry.json"
LOG_DIR = "reports/logs"  # the CLI's run logs (git-ignored: /reports/* in .gitignore)


def _dvc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run a quiet DVC command (status, exp show) and capture its output."""
    env = stage_env(terminal=False)
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)


def _dvc_error(res: subprocess.CompletedProcess, *args: str, cwd: Path) -> list[str]:
    """What a failed quiet DVC command said. ``--json`` makes DVC print nothing on an error (an unreadable
    params.yaml, an invalid dvc.yaml): the command is rerun without it to get DVC's message."""
    text = f"{res.stdout}{res.stderr}".strip()
    if not text and "--json" in args:
        again = _dvc(*[a for a in args if a != "--json"], cwd=cwd)
        text = f"{again.stderr}{again.stdout}".strip()
    return [line.rstrip() for line in text.splitlines() if line.strip()]


def _relay(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, list[str]]:
    """Run a DVC command in a task, each line of its output logged as it comes and a progress bar drawn live when
    the console is a terminal (:func:`flows.stream.stream`)."""
    logger = get_run_logger()
    bar = TerminalBar() if env.get("MEDPIPE_PROGRESS") == "1" else None
    return stream(args, cwd, env, logger.info, bar)


@task(name="validate-params")
def check_params(repo: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """Validate the whole params.yaml with the overrides applied, before DVC decides anything.

    Raises:
        tasks.schema.ParamsError: naming the file, every offending dotted key and the expected form.
    """
    from tasks.config import load_params

    return load_params(repo / "params.yaml", overrides).model_dump(mode="json")


def stage_names(tasks: list[str]) -> list[str]:
    """The DVC stages of the pipeline in the order the flow runs them: the shared ones, then each task's chain
    (``preprocess@classify`` ... ``promote@classify``, then the next task's), so that a task's result comes as soon
    as its own stages are done."""
    return [*SHARED_STAGES, *(f"{stage}@{t}" for t in tasks for stage in TASK_STAGES)]


@task(name="dvc-status", retries=2, retry_delay_seconds=RETRY_DELAY_S, retry_condition_fn=retry_if_transient)
def changed_stages(repo: Path, names: list[str]) -> list[str]:
    """Stages of ``names`` DVC considers changed (code, data, params or missing outputs).

    Raises:
        StageFailed: ``dvc status`` failed; it carries DVC's error (e.g. an invalid dvc.yaml, with its line).
    """
    res = _dvc("status", "--json", cwd=repo)
    if res.returncode != 0:
        raise StageFailed("dvc status", res.returncode, _dvc_error(res, "status", "--json", cwd=repo))
    status = json.loads(res.stdout or "{}")
    return [s for s in names if any(k == s or k.endswith(f":{s}") for k in status)]


def _stage_task(kind: str):
    @task(name=f"stage-{kind}", task_run_name="stage-{stage}", retries=RETRIES[kind],
          retry_delay_seconds=RETRY_DELAY_S, retry_condition_fn=retry_if_transient)  # fmt: skip
    def run_stage(repo: Path, force: bool = False, stage: str = kind) -> dict[str, Any]:
        """``dvc repro --single-item <stage>`` (``train`` or ``train@segment``), its output relayed live.

        Raises:
            StageFailed: naming the stage and the error line(s) it printed; retried only when transient.
        """
        t0 = time.perf_counter()
        args = [sys.executable, "-m", "dvc", "repro", "--single-item", *(["--force"] if force else []), stage]
        rc, lines = _relay(args, repo, stage_env())
        if rc != 0:
            raise StageFailed.from_output(stage, rc, lines)
        ran = not any("didn't change, skipping" in line for line in lines)
        return {"stage": stage, "ran": ran, "seconds": round(time.perf_counter() - t0, 2)}

    return run_stage


STAGE_TASKS = {s: _stage_task(s) for s in STAGES}  # by the stage's kind; a per-task stage passes stage=<stage>@<task>


def run_stage(repo: Path, stage: str, force: bool = False) -> dict[str, Any]:
    """Run DVC stage ``stage`` (``ingest``, ``train@segment``) as its Prefect task."""
    return STAGE_TASKS[stage.partition("@")[0]](repo, force, stage=stage)


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
                         cwd=repo, env=stage_env(terminal=False), capture_output=True, text=True)  # fmt: skip
    if res.returncode != 0:
        raise RuntimeError(f"{repo}: could not resolve the MLflow tracking URI:\n{res.stderr}")
    return res.stdout.strip().splitlines()[-1]


@task(name="dvc-exp-run", retries=1, retry_delay_seconds=RETRY_DELAY_S, retry_condition_fn=retry_if_transient)
def run_experiment(repo: Path, overrides: dict[str, Any], name: str, force: bool = False) -> dict[str, Any]:
    """All stages as one DVC experiment (``dvc exp run --temp``) in a temporary copy of the workspace.

    DVC applies the overrides to the copy's params.yaml, reruns what they change (the rest comes from the DVC
    cache), commits the result to the experiment ref ``name`` and leaves the working tree as it was. The stages run
    in ``.dvc/tmp/exps/...``, so MLflow is pointed at the repo's own store (unless ``MLFLOW_TRACKING_URI`` is set).

    Returns:
        ``{"stages": [{"stage", "ran"}...], "seconds": float}``.

    Raises:
        StageFailed: naming the experiment, the stage that failed and its error line(s); retried only when transient.
    """
    logger = get_run_logger()
    t0 = time.perf_counter()
    sets = [a for k, v in _flat(overrides).items() for a in ("-S", f"{k}={_hydra_value(v)}")]
    args = [sys.executable, "-m", "dvc", "exp", "run", "--temp", "--name", name, *(["--force"] if force else []), *sets]
    env = stage_env({"MLFLOW_TRACKING_URI": _mlflow_uri(repo)})
    logger.info("experiment %s: %s", name, " ".join(args[2:]))
    rc, lines = _relay(args, repo, env)
    if rc != 0:
        running = [m[1] for line in lines if (m := re.match(r"Running stage '([\w@-]+)'", line))]
        raise StageFailed.from_output(running[-1] if running else "dvc exp run", rc, lines, experiment=name)
    stages = []
    for line in lines:
        if m := re.match(r"Running stage '([\w@-]+)'", line):
            stages.append({"stage": m[1], "ran": True})
        elif m := re.match(r"Stage '([\w@-]+)' didn't change", line):
            stages.append({"stage": m[1], "ran": False})
    return {"stages": stages, "seconds": round(time.perf_counter() - t0, 2)}


@task(name="dvc-exp-show")
def experiment_results(repo: Path, name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The metrics and registry entry of experiment ``name``, read from its commit.

    Read from DVC's record of the experiment (the files it committed: ``reports/<task>/evaluate/metrics.json``
    and ``models/<task>/registry.json`` are git-tracked ``cache: false`` outputs) rather than from MLflow: they are
    the very files a working-tree run returns, ``dvc exp show`` shows the same numbers, and they do not depend on the
    tracking server being reachable. The params DVC recorded are checked against the overrides, so that a value the
    ``-S`` grammar read differently from the schema-validated one fails here, naming the key.

    Returns:
        ``{"rev": str, "params": {...}, "tasks": {task: {"metrics": {...}, "registry": {...}, "details": {...}}}}``
        (details: the metrics' confidence intervals, ``{}`` when the experiment's commit does not hold them).
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
    tasks = {}
    for t in params.get("tasks") or {}:
        metrics = ((data.get("metrics") or {}).get(METRICS.format(task=t)) or {}).get("data") or {}
        registry, details = (_committed_json(repo, exp["rev"], p.format(task=t)) for p in (REGISTRY, DETAILS))
        tasks[t] = {"metrics": metrics, "registry": registry, "details": details}
    return {"rev": exp["rev"], "params": params, "tasks": tasks}


def _committed_json(repo: Path, rev: str, path: str) -> dict[str, Any]:
    """``path`` as committed at ``rev`` (``{}`` when the commit has no such file)."""
    shown = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=repo, capture_output=True, text=True)
    return json.loads(shown.stdout) if shown.returncode == 0 else {}


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
        ``{"stages": [...], "message": str, "tasks": {task: {"kind": str, "metrics": {...}, "details": {...},
        "registry": {...}}}, "experiment": str | None}``: each task's headline test metrics, their confidence
        intervals and what promote registered.

    Raises:
        tasks.schema.ParamsError: params.yaml with the overrides does not match the schema (nothing has run).
    """
    root = Path(repo).resolve()
    named = {"ingest.input": input_path, "ingest.labels_csv": labels_csv, "train.family": family,
             "train.epochs": epochs, "base.seed": seed}  # fmt: skip
    changes = {**{k: v for k, v in named.items() if v is not None}, **_flat(overrides or {})}
    checked = check_params(root, changes)
    kinds = {t: entry["kind"] for t, entry in checked["tasks"].items()}
    names = stage_names(list(kinds))
    if changes:
        name = name or _experiment_name()
        print(f"overrides {changes}: running them as DVC experiment {name!r}; params.yaml is not modified")
        ran = run_experiment(root, changes, name, force)
        result = experiment_results(root, name, changes)
        executed = [s["stage"] for s in ran["stages"] if s["ran"]]
        message = f"experiment {name}: stages executed: {', '.join(executed) or 'none'} (see `dvc exp show`)"
        print(message)
        tasks = {t: {"kind": kinds[t], **r} for t, r in result["tasks"].items()}
        return {"stages": ran["stages"], "message": message, "tasks": tasks, "experiment": name}
    if not force and not changed_stages(root, names):
        message = "Pipeline is up to date: DVC reports no changed stage, so no stage was executed."
        stages: list[dict[str, Any]] = []
    else:
        stages = [run_stage(root, s, force) for s in names]
        message = f"stages executed: {', '.join(s['stage'] for s in stages if s['ran']) or 'none'}"
    print(message)
    tasks = {t: {"kind": kind, "metrics": _read_json(root / METRICS.format(task=t)),
                 "details": _read_json(root / DETAILS.format(task=t)),
                 "registry": _read_json(root / REGISTRY.format(task=t))} for t, kind in kinds.items()}  # fmt: skip
    return {"stages": stages, "message": message, "tasks": tasks, "experiment": None}


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _parse_set(text: str) -> tuple[str, Any]:
    """``"train.epochs=2"`` -> ``("train.epochs", 2)``; the value is read as YAML (``[32,32]``, ``null``, ``cnn``)."""
    from ruamel.yaml import YAML

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE, e.g. train.epochs=2")
    return key.strip(), YAML(typ="safe").load(value)


HEADLINE = {
    "classification": ("accuracy", "precision", "recall", "f1", "auc"),
    "segmentation": ("dice", "iou", "hd95", "surface_dice", "ap50", "ap30", "sens_at_1fp"),
}


def metric_lines(metrics: dict[str, Any], details: dict[str, Any], kind: str = "classification") -> list[str]:
    """One line per headline test metric, with its confidence interval when evaluate recorded one (details.json's
    ``metrics.<name>.ci_low/ci_high``, or flat ``<name>_ci_low/_ci_high`` keys beside the metric)."""
    cis, level = details.get("metrics") or {}, (details.get("ci") or {}).get("level")
    lines = []
    for k in HEADLINE[kind]:
        name = f"test_{k}"
        if not isinstance(metrics.get(name), (int, float)):
            continue
        ci = cis.get(name) or {}
        lo, hi = ci.get("ci_low", metrics.get(f"{name}_ci_low")), ci.get("ci_high", metrics.get(f"{name}_ci_high"))
        line = f"  {k:<12} {metrics[name]:.4f}"
        if lo is not None and hi is not None:
            line += f"  {f'{level:.0%} ' if level else ''}CI [{lo:.4f}, {hi:.4f}]"
        lines.append(line)
    return lines


def registry_lines(reg: dict[str, Any]) -> list[str]:
    """What the run registered, and the champion when that is another version (registry.json of promote)."""
    name, version, alias = reg.get("model_name"), reg.get("version"), reg.get("alias")
    lines = [f"Registered model: models:/{name}/{version} (alias @{alias})"]
    champion = reg.get("previous_champion")
    if alias != "champion" and champion and str(champion) != str(version):
        lines.append(f"Champion:         models:/{name}/{champion} (alias @champion, kept: {reg.get('reason')})")
    return lines


EPILOG = """\
Overrides: -S and the shortcut flags (--input, --labels-csv, --family, --epochs, --seed) never write params.yaml.
With any of them the whole pipeline runs as a DVC experiment (dvc exp run --temp -S KEY=VALUE) in a temporary copy
of the workspace: the working tree's params.yaml, dvc.lock and outputs stay as they are, stages the overrides do not
change come from the DVC cache, and the result is listed by `dvc exp show` (`dvc exp apply NAME` brings it in).

Exit status: 0 done; 1 a stage (or DVC) failed: the message names the stage and its error, and the full log with
the tracebacks is written to <repo>/reports/logs/flow-<time>.log; 2 params.yaml or an override is invalid (nothing
ran). Transient errors (I/O, network, a server, a DVC lock held) are retried; a stage that rejects its input is not.

Examples:
  python -m flows.pipeline                                   the committed params.yaml, in the working tree
  python -m flows.pipeline -S train.epochs=2 -S base.seed=3  a DVC experiment
  python -m flows.pipeline --epochs 2 --seed 3               the same experiment
"""


def build_parser() -> argparse.ArgumentParser:
    """The CLI's options, each with what it does and its default."""
    ap = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.splitlines()[0], epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    exp = "a DVC experiment override: params.yaml is not written"
    ap.add_argument("--repo", default=".", metavar="PATH",
                    help="the medpipe repository to run in (a DVC project in a git repository) (default: .)")
    ap.add_argument("-S", "--set", dest="sets", action="append", type=_parse_set, default=[], metavar="KEY=VALUE",
                    help="override one params.yaml key, e.g. -S train.epochs=2 (repeatable; the value is read as "
                         "YAML). Runs as a DVC experiment override (dvc exp run --temp -S): params.yaml is not "
                         "written (default: none: params.yaml as it is, in the working tree)")
    ap.add_argument("--input", metavar="PATH",
                    help=f"the data set to ingest, a DICOM folder or a MedMNIST .npz: -S ingest.input=PATH, {exp} "
                         "(default: ingest.input in params.yaml)")
    ap.add_argument("--labels-csv", metavar="PATH",
                    help=f"the label table, relative to the input folder: -S ingest.labels_csv=PATH, {exp} "
                         "(default: ingest.labels_csv in params.yaml)")
    ap.add_argument("--family", choices=["cnn", "rnn", "svm"],
                    help=f"the model family: -S train.family=FAMILY, {exp} (default: train.family in params.yaml)")
    ap.add_argument("--epochs", type=int, metavar="N",
                    help=f"training epochs: -S train.epochs=N, {exp} (default: train.epochs in params.yaml)")
    ap.add_argument("--seed", type=int, metavar="N",
                    help=f"the training seed: -S base.seed=N, {exp}; the patient split keeps base.split_seed "
                         "(default: base.seed in params.yaml)")
    ap.add_argument("--name", metavar="NAME",
                    help="the DVC experiment's name, with overrides only (default: the Prefect flow run's name and "
                         "id, e.g. papaya-hoatzin-1a2b3c4d)")
    ap.add_argument("--force", action="store_true",
                    help="rerun every stage even when DVC finds nothing changed (default: off: DVC's cache decides)")
    return ap  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """``python -m flows.pipeline``: run the flow; print the test metrics and the registered model, or one message
    on a failure (exit status 1; 2 for invalid params), the full log and tracebacks being in a file."""
    a = build_parser().parse_args(argv)
    from tasks.config import ParamsError

    log = Path(a.repo) / LOG_DIR / f"flow-{time.strftime('%Y%m%d-%H%M%S')}.log"
    with run_log(log):
        state = pipeline(
            repo=a.repo, input_path=a.input, labels_csv=a.labels_csv, family=a.family, epochs=a.epochs, seed=a.seed,
            overrides=dict(a.sets) or None, name=a.name, force=a.force, return_state=True,
        )
    if not state.is_completed():
        exc = state.result(raise_on_failure=False)
        if not isinstance(exc, BaseException):
            exc = RuntimeError(f"the flow run ended in state {state.type.value}: {state.message}")
        if isinstance(exc, ParamsError):
            print(exc, file=sys.stderr)
            raise SystemExit(2)
        print(failure_message(exc, log), file=sys.stderr)
        raise SystemExit(1)
    result = state.result()
    for t, r in result["tasks"].items():
        if lines := metric_lines(r["metrics"], r.get("details") or {}, r["kind"]):
            print(f"\n{t} ({r['kind']}): test metrics\n" + "\n".join(lines))
        if r["registry"]:
            print("\n".join(registry_lines(r["registry"])))
    if result["experiment"]:
        print(f"\nDVC experiment {result['experiment']}: `dvc exp show`; `dvc exp apply {result['experiment']}` "
              "brings it into the working tree")  # fmt: skip


if __name__ == "__main__":
    main()
