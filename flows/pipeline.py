"""The medpipe Prefect flow: run the DVC stages in order, letting DVC's cache decide what reruns.

Orchestration only: which stages, in what order, with which retries, and the common overrides as flow parameters.
The work happens in ``python -m tasks.<stage>`` processes that DVC starts, so running this flow and running
``dvc repro`` produce the same ``dvc.lock`` and outputs.

    python -m flows.pipeline                      # the whole pipeline on params.yaml
    python -m flows.pipeline --epochs 1 --seed 3  # overrides are written to params.yaml (as `dvc exp run -S` does)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

STAGES = ("synth", "ingest", "preprocess", "train", "evaluate", "export", "promote")
# stages that talk to something outside the repo (a mounted DICOM share, the MLflow server) get more retries
RETRIES = {"ingest": 2, "train": 1, "promote": 3}


def _env() -> dict[str, str]:
    """The environment for DVC: this interpreter's bin/ first, so `python` in dvc.yaml is the project's venv."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _dvc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=None, text=True
    )


@task(name="dvc-status")
def changed_stages(repo: Path) -> list[str]:
    """Stages DVC considers changed (code, data, params or missing outputs)."""
    res = _dvc("status", "--json", cwd=repo)
    if res.returncode != 0:
        raise RuntimeError(f"dvc status failed in {repo}:\n{res.stdout}")
    status = json.loads(res.stdout or "{}")
    return [s for s in STAGES if any(k == s or k.endswith(f":{s}") for k in status)]


def _stage_task(stage: str):
    @task(name=f"stage-{stage}", retries=RETRIES.get(stage, 0), retry_delay_seconds=5)
    def run_stage(repo: Path, force: bool = False) -> dict[str, Any]:
        logger = get_run_logger()
        t0 = time.perf_counter()
        res = _dvc("repro", "--single-item", *(["--force"] if force else []), stage, cwd=repo)
        for line in (res.stdout or "").splitlines():
            if line.strip():
                logger.info(line)
        if res.returncode != 0:
            raise RuntimeError(f"stage {stage} failed (dvc repro exit {res.returncode}); see the log above")
        ran = "didn't change, skipping" not in (res.stdout or "")
        return {"stage": stage, "ran": ran, "seconds": round(time.perf_counter() - t0, 2)}

    return run_stage


STAGE_TASKS = {s: _stage_task(s) for s in STAGES}


@task(name="apply-overrides")
def apply_overrides(repo: Path, overrides: dict[str, Any]) -> None:
    """Validate the overrides against the params schema, then write them into params.yaml (comments kept)."""
    from ruamel.yaml import YAML

    from tasks.config import validate_params

    path = repo / "params.yaml"
    yaml = YAML()
    doc = yaml.load(path.read_text())
    for dotted, value in overrides.items():
        node = doc
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    validate_params(json.loads(json.dumps(doc)), f"{path} with overrides {overrides}")
    with path.open("w") as fh:
        yaml.dump(doc, fh)


@flow(name="medpipe-pipeline", log_prints=True)
def pipeline(
    repo: str = ".",
    dicom_dir: str | None = None,
    labels_csv: str | None = None,
    family: str | None = None,
    epochs: int | None = None,
    seed: int | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """ingest -> preprocess -> train -> evaluate -> export -> promote, through DVC.

    Args:
        repo: the medpipe repository (a DVC project) to run in.
        dicom_dir: a DICOM folder to ingest instead of params' ``ingest.dicom_dir``.
        labels_csv: its label CSV (``ingest.labels_csv``).
        family: ``train.family`` (cnn | rnn | svm).
        epochs: ``train.epochs``.
        seed: ``base.seed``.
        force: rerun every stage even if DVC says nothing changed.

    Returns:
        ``{"stages": [...], "message": str, "metrics": {...}, "registry": {...}}``.
    """
    root = Path(repo).resolve()
    overrides = {
        k: v
        for k, v in {
            "ingest.dicom_dir": dicom_dir,
            "ingest.labels_csv": labels_csv,
            "train.family": family,
            "train.epochs": epochs,
            "base.seed": seed,
        }.items()
        if v is not None
    }
    if overrides:
        apply_overrides(root, overrides)
    if not force and not changed_stages(root):
        message = "Pipeline is up to date: DVC reports no changed stage, so no stage was executed."
        stages: list[dict[str, Any]] = []
    else:
        stages = [STAGE_TASKS[s](root, force) for s in STAGES]
        message = f"stages executed: {', '.join(s['stage'] for s in stages if s['ran']) or 'none'}"
    print(message)
    return {"stages": stages, "message": message, "metrics": _read_json(root / "reports/evaluate/metrics.json"),
            "registry": _read_json(root / "models/registry.json")}


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m flows.pipeline", description="Run the medpipe pipeline flow.")
    ap.add_argument("--repo", default=".")
    ap.add_argument("--dicom-dir")
    ap.add_argument("--labels-csv")
    ap.add_argument("--family", choices=["cnn", "rnn", "svm"])
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    result = pipeline(
        repo=a.repo, dicom_dir=a.dicom_dir, labels_csv=a.labels_csv, family=a.family, epochs=a.epochs,
        seed=a.seed, force=a.force,
    )
    m, reg = result["metrics"], result["registry"]
    if m:
        print("\nTest metrics:")
        for k in ("accuracy", "precision", "recall", "f1", "auc"):
            if f"test_{k}" in m:
                lo, hi = m[f"test_{k}_ci_low"], m[f"test_{k}_ci_high"]
                print(f"  {k:<10} {m[f'test_{k}']:.4f}  95% CI [{lo:.4f}, {hi:.4f}]")
    if reg:
        print(f"\nRegistered model: models:/{reg.get('model_name')}/{reg.get('version')} (alias @{reg.get('alias')})")


if __name__ == "__main__":
    main()
