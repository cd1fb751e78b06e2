"""End to end: the Prefect flow (real engine, prefect_test_harness) runs the DVC stages on a tiny synthetic
cohort in a copy of this repo; then `dvc repro` and the flow both find nothing to do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests._repo import copy_repo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return copy_repo(tmp_path_factory.mktemp("repo"))


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def first_run(repo, harness):
    from flows.pipeline import pipeline

    old = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        result = pipeline(repo=str(repo))
    finally:
        if old is not None:
            os.environ["MLFLOW_TRACKING_URI"] = old
    return result


def test_flow_runs_every_stage_and_registers_champion(repo, first_run, monkeypatch):
    assert [s["stage"] for s in first_run["stages"] if s["ran"]] == [
        "synth", "ingest", "preprocess", "train", "evaluate", "export", "promote"
    ]
    m = first_run["metrics"]
    for k in ("accuracy", "precision", "recall", "f1", "auc"):
        assert 0.0 <= m[f"test_{k}"] <= 1.0
        assert m[f"test_{k}_ci_low"] <= m[f"test_{k}"] <= m[f"test_{k}_ci_high"]
    reg = first_run["registry"]
    assert reg["alias"] == "champion"

    monkeypatch.chdir(repo)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from tasks import tracking

    client = tracking.client()
    run_id = json.loads((repo / "models/train/mlflow_run.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert {"test_auc", "test_accuracy", "val_auc", "train_loss"} <= set(run.data.metrics)
    assert run.data.params["train.epochs"] == "1"
    assert run.data.tags["git_commit"] not in ("", "unknown")
    assert run.info.status == "FINISHED"
    version = client.get_model_version_by_alias(reg["model_name"], "champion")
    assert str(version.version) == str(reg["version"]) and version.run_id == run_id

    import coremltools as ct

    pkg = next((repo / "models/export").glob("*.mlpackage"))
    spec = ct.utils.load_spec(str(pkg))
    assert set(spec.description.metadata.userDefined) >= {"mlflow_run_id", "git_commit"}
    assert spec.description.metadata.userDefined["mlflow_run_id"] == run_id
    from tasks.coreml import inspect_package

    assert inspect_package(pkg)["class_labels"] == ["normal", "lesion"]


def test_dvc_repro_after_flow_has_nothing_to_do(repo, first_run):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    lock_before = (repo / "dvc.lock").read_text()
    out = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "Running stage" not in out.stdout
    assert "up to date" in out.stdout
    assert (repo / "dvc.lock").read_text() == lock_before


def test_second_flow_run_executes_no_stage(repo, first_run):
    from flows.pipeline import pipeline

    result = pipeline(repo=str(repo))
    assert result["stages"] == []
    assert "no stage was executed" in result["message"]
    assert result["registry"]["version"] == first_run["registry"]["version"]
