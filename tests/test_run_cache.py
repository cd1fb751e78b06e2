"""A params mistake does not cost the trained model: once the valid value is back, `dvc repro` restores train's
outputs from DVC's run cache (no retraining, no new MLflow run, no new registered version) instead of training
again."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tasks.config import write_overrides
from tests._repo import copy_repo, dvc

pytestmark = pytest.mark.slow


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _train_runs(repo: Path) -> int:
    """How many MLflow runs the repo's own store holds (train opens one per training)."""
    import sqlite3

    with sqlite3.connect(repo / "mlflow" / "mlflow.db") as db:
        return db.execute("select count(*) from runs").fetchone()[0]


def _versions(repo: Path) -> int:
    """How many model versions the repo's own registry holds."""
    import sqlite3

    with sqlite3.connect(repo / "mlflow" / "mlflow.db") as db:
        return db.execute("select count(*) from model_versions").fetchone()[0]


def _set_raw(path: Path, group: str, key: str, value: object) -> None:
    from ruamel.yaml import YAML

    yaml = YAML()
    doc = yaml.load(path)
    doc[group][key] = value
    yaml.dump(doc, path)


def test_undoing_a_rejected_params_edit_restores_train_from_the_run_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    repo = copy_repo(tmp_path)
    dvc(repo, "repro")
    model = repo / "models" / "classify" / "train" / "model.pt"
    first, runs = _sha(model), _train_runs(repo)
    assert runs == 1 and _versions(repo) == 1

    # the mistake, typed into the file by hand (write_overrides would refuse it): DVC removes train's outputs, then
    # train rejects the value
    _set_raw(repo / "params.yaml", "train", "epochs", -3)
    bad = dvc(repo, "repro", "train@classify", check=False)
    assert bad.returncode != 0
    assert "train.epochs" in bad.stdout + bad.stderr
    assert not model.exists(), "DVC clears a stage's outputs before its command runs"

    # the value restored: the same inputs as the first run, so DVC checks the outputs out of its run cache
    write_overrides(repo / "params.yaml", {"train.epochs": 1})
    again = dvc(repo, "repro", "train@classify")
    assert "Stage 'train@classify' is cached - skipping run, checking out outputs" in again.stdout, again.stdout
    assert _sha(model) == first
    assert _train_runs(repo) == runs, "restoring from the run cache must not open a new MLflow run"
    # the rest of the pipeline sees the same model: nothing reruns, no new registered version
    rest = dvc(repo, "repro")
    assert "Running stage" not in rest.stdout, rest.stdout
    assert _versions(repo) == 1
    assert os.path.isdir(repo / "models" / "classify" / "train")
