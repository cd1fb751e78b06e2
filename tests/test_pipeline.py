"""End to end: the Prefect flow (real engine, prefect_test_harness) runs the DVC stages on a tiny synthetic
cohort in a copy of this repo; then `dvc repro` and the flow both find nothing to do."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import subprocess
from pathlib import Path

import pytest

from tests._repo import copy_repo, dvc

pytestmark = pytest.mark.slow


LOGS: list[str] = []  # every log record and print of the first flow run, for the PHI scan


class _Keep(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        LOGS.append(self.format(record))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    # the de-identified DICOM copies are outputs too: write them, so that the PHI scan reads them
    return copy_repo(tmp_path_factory.mktemp("repo"), {"ingest.deid.write_dicom": True})


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def first_run(repo, harness):
    from flows.pipeline import pipeline

    old = os.environ.pop("MLFLOW_TRACKING_URI", None)
    handler = _Keep()
    loggers = [logging.getLogger(n) for n in ("", "prefect", "prefect.flow_runs", "prefect.task_runs")]
    for logger in loggers:
        logger.addHandler(handler)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            result = pipeline(repo=str(repo))
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        LOGS.extend([out.getvalue(), err.getvalue()])
        if old is not None:
            os.environ["MLFLOW_TRACKING_URI"] = old
    return result


def test_flow_runs_every_stage_and_registers_champion(repo, first_run, monkeypatch):
    assert [s["stage"] for s in first_run["stages"] if s["ran"]] == [
        "synth", "ingest", "preprocess@classify", "train@classify", "evaluate@classify", "export@classify",
        "promote@classify",
    ]
    assert first_run["experiment"] is None  # no overrides: the working tree, not an experiment
    metrics_file = repo / "reports/classify/evaluate/metrics.json"
    assert first_run["tasks"]["classify"]["metrics"] == json.loads(metrics_file.read_text())
    reg = first_run["tasks"]["classify"]["registry"]
    assert (reg["version"], reg["alias"], reg["previous_champion"]) == ("1", "champion", None)

    monkeypatch.chdir(repo)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from tasks import tracking
    from tasks.models.networks import weights_hash

    client = tracking.client()
    model_hash = weights_hash(repo / "models/classify/train")
    run_id = tracking.run_for_model(model_hash, repo / "models/classify/train")  # found from the model itself
    assert reg["run_id"] == run_id
    run = client.get_run(run_id)
    assert {"test_auc", "test_accuracy", "val_auc", "train_loss"} <= set(run.data.metrics)
    assert run.data.metrics["test_auc"] == pytest.approx(first_run["tasks"]["classify"]["metrics"]["test_auc"])
    assert run.data.params["train.epochs"] == "1" and run.data.params["train.arch"] == "resnet10"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert run.data.tags["git_commit"].removesuffix("-dirty") == head
    assert run.info.status == "FINISHED"
    # MLflow's Source and Dataset columns: the entry point at the commit; the data by DVC's hash, from ingest's input
    assert run.data.tags["mlflow.source.name"] == "tasks/train.py"
    assert run.data.tags["mlflow.source.git.commit"] == head
    (inp,) = run.inputs.dataset_inputs
    data_md5 = _lock_md5(repo, "train@classify", "data/preprocessed/classify")
    assert (inp.dataset.name, inp.dataset.digest) == ("synthetic-ct", data_md5)
    assert json.loads(inp.dataset.source) == {"uri": "data/synthetic/dicom"}
    params_hash = json.loads((repo / "models/classify/train/provenance.json").read_text())["params_hash"]
    assert run.info.run_name == f"synthetic-ct-cnn-resnet10-seed42-{params_hash[:8]}"
    version = client.get_model_version_by_alias(reg["model_name"], "champion")
    assert str(version.version) == reg["version"] and version.run_id == run_id
    assert version.tags["model_sha256"] == model_hash
    assert len(version.tags) <= tracking.MAX_VERSION_TAGS, sorted(version.tags)

    import coremltools as ct

    from tasks.coreml.convert import inspect_package

    pkg = next((repo / "models/classify/export").glob("*.mlpackage"))
    meta = dict(ct.utils.load_spec(str(pkg)).description.metadata.userDefined)
    provenance = json.loads((repo / "models/classify/train/provenance.json").read_text())
    assert meta["model_sha256"] == model_hash
    assert meta["params_hash"] == provenance["params_hash"]
    # under DVC the data hash is DVC's own md5 of the preprocessed data, as dvc.lock records it
    assert meta["dvc_data_hash"] == provenance["data_hash"] == data_md5
    assert not {"mlflow_run_id", "git_commit"} & set(meta), "the package must hold no run id or commit"
    assert inspect_package(pkg)["class_labels"] == ["normal", "lesion"]


def test_metrics_agree_with_the_predictions(repo, first_run):
    """metrics.json is what the per-image predictions say (sklearn recomputes it), at the configured threshold."""
    import numpy as np
    import pandas as pd
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, roc_auc_score

    m = first_run["tasks"]["classify"]["metrics"]
    details = json.loads((repo / "reports/classify/evaluate/details.json").read_text())
    pred = pd.read_csv(repo / "reports/classify/evaluate/outputs/predictions.csv")
    manifest = pd.read_csv(repo / "data/ingested/manifest.csv")
    assert m["n_test"] == len(pred) == int((manifest["split"] == "test").sum()) > 0
    assert set(pred["patient_id"]) <= set(manifest.loc[manifest["split"] == "test", "patient_id"])
    y = (pred["actual"] == "lesion").to_numpy()
    yhat = (pred["predicted"] == "lesion").to_numpy()
    assert np.array_equal(yhat, pred["p_lesion"].to_numpy() >= m["threshold"])
    assert m["test_accuracy"] == pytest.approx(accuracy_score(y, yhat))
    assert m["test_f1"] == pytest.approx(f1_score(y, yhat, zero_division=0))
    assert details["confusion_matrix"]["counts"] == confusion_matrix(y, yhat, labels=[False, True]).tolist()
    if len(set(y)) == 2:
        assert m["test_auc"] == pytest.approx(roc_auc_score(y, pred["p_lesion"]))
    for k in ("accuracy", "precision", "recall", "f1", "auc"):
        ci = details["metrics"][f"test_{k}"]
        assert ci["value"] == m[f"test_{k}"] and ci["ci_low"] <= ci["ci_high"]
    val = json.loads((repo / "models/classify/train/val_metrics.json").read_text())
    # promote decided on validation AUC
    assert val["val_auc"] == pytest.approx(first_run["tasks"]["classify"]["registry"]["value"])


HEADLINE = {"test_accuracy", "test_precision", "test_recall", "test_f1", "test_auc", "n_test", "threshold"}


def _exp_show(repo: Path) -> list[dict]:
    return json.loads(dvc(repo, "exp", "show", "--json").stdout)


def test_dvc_compares_metrics_and_params(repo, first_run):
    """`dvc metrics show` is one short row of the headline; `dvc exp show` has the workspace's metrics; `dvc metrics
    diff` and `dvc params diff` against the commit work."""
    shown = dvc(repo, "metrics", "show").stdout
    rows = [line for line in shown.splitlines() if line.strip()]
    assert [r.split()[0] for r in rows[1:]] == ["reports/classify/evaluate/metrics.json"], shown
    assert sorted(rows[0].split()[1:]) == sorted(HEADLINE), shown
    assert max(map(len, rows)) <= 140, f"`dvc metrics show` is {max(map(len, rows))} characters wide:\n{shown}"

    workspace = next(b for b in _exp_show(repo) if b["rev"] == "workspace")
    metrics = workspace["data"]["metrics"]
    assert list(metrics) == ["reports/classify/evaluate/metrics.json"]
    assert metrics["reports/classify/evaluate/metrics.json"]["data"] == first_run["tasks"]["classify"]["metrics"]
    assert set(first_run["tasks"]["classify"]["metrics"]) == HEADLINE

    diff = dvc(repo, "metrics", "diff", "HEAD", "--all", "--json")
    assert set(json.loads(diff.stdout)["reports/classify/evaluate/metrics.json"]) >= HEADLINE - {"n_test", "threshold"}
    params = dvc(repo, "params", "diff", "HEAD", "--all", "--json")
    assert json.loads(params.stdout)["params.yaml"]["train.epochs"]["new"] == 1


def _lock_md5(repo: Path, stage: str, path: str) -> str:
    from tasks.config import read_yaml

    lock = read_yaml(repo / "dvc.lock")["stages"][stage]
    return next(d["md5"] for d in lock["deps"] if d["path"] == path)


def test_dvc_repro_after_flow_has_nothing_to_do(repo, first_run):
    lock_before = (repo / "dvc.lock").read_text()
    out = dvc(repo, "repro")
    assert "Running stage" not in out.stdout
    assert "up to date" in out.stdout
    assert (repo / "dvc.lock").read_text() == lock_before


def test_second_flow_run_executes_no_stage(repo, first_run):
    from flows.pipeline import pipeline

    result = pipeline(repo=str(repo))
    assert result["stages"] == []
    assert "no stage was executed" in result["message"]
    assert result["tasks"]["classify"]["registry"]["version"] == first_run["tasks"]["classify"]["registry"]["version"]


def _identifying_values(dicom_dir: Path, pseudo) -> set[str]:
    """Every value of a PS3.15 basic-profile attribute in the input cohort (PN components too), as text.

    Times of day are left out (the temporal option keeps them), and so are values too short to be told from
    chance matches in binary files (< 4 characters, or < 6 digits). A shifted date of one patient may equal an
    original date of another: that is de-identified output, not a leak, so shifted dates are left out too.
    """
    import pydicom

    from tasks.dicom.profile import action_for

    values: set[str] = set()
    shifted: set[str] = set()
    for f in dicom_dir.rglob("*.dcm"):
        ds = pydicom.dcmread(f)
        for elem in ds.iterall():
            if elem.tag.is_private or action_for(int(elem.tag)) is None or elem.VR in ("SQ", "TM", "OB", "OW", "UN"):
                continue
            raw = elem.value if isinstance(elem.value, (list, tuple)) or elem.VM > 1 else [elem.value]
            for v in raw:
                text = str(v).strip()
                for part in [text, *(text.split("^") if elem.VR == "PN" else [])]:
                    if len(part) >= (6 if part.isdigit() else 4):
                        values.add(part)
                if elem.VR == "DA":
                    shifted.add(pseudo.shift_date(text, str(ds.PatientID)).replace("-", ""))
    return values - shifted


def test_no_identifying_value_of_the_cohort_reaches_any_output(repo, first_run):
    """The PHI scan: manifest, arrays, quarantine, audit, de-identified DICOM, checkpoints, reports, the MLflow
    store (params, tags, metrics, artifacts, registry) and the exported Core ML / ONNX models, plus every log line
    and print of the run, hold none of the input cohort's identifying values."""
    from tasks.config import load_params
    from tasks.dicom.pseudonym import Pseudonymizer

    pseudo = Pseudonymizer.from_params(load_params(repo / "params.yaml").ingest.deid)
    values = _identifying_values(repo / "data/synthetic/dicom", pseudo)
    assert len(values) > 100, "the cohort should carry names, ids, UIDs and dates to look for"
    outputs = [p for d in ("data/ingested", "data/preprocessed/classify", "models", "reports", "mlflow")
               for p in (repo / d).rglob("*") if p.is_file()]  # fmt: skip
    assert any(p.suffix == ".dcm" for p in outputs) and any(p.suffix == ".db" for p in outputs)
    assert any(p.name == "model.onnx" for p in outputs) and any(".mlpackage" in str(p) for p in outputs)
    hits = []
    encoded = [(v, v.encode()) for v in values]
    for p in outputs:
        blob = p.read_bytes()
        hits += [f"{p.relative_to(repo)}: {v}" for v, b in encoded if b in blob]
    logs = "\n".join(LOGS)
    assert "ingest" in logs and "train" in logs, "the run's logs were not captured"
    hits += [f"logs: {v}" for v in values if v in logs]
    assert not hits, f"{len(hits)} identifying values in the outputs: {hits[:10]}"


def test_an_experiment_shows_its_metrics_and_names_its_run(repo, first_run, monkeypatch):
    """`dvc exp run -S train.epochs=2` (up to evaluate: what the table needs) is a row of `dvc exp show` with its own
    metrics, and its MLflow run's name differs from the committed run's (other params, and the experiment's name).
    Last in this module: it leaves the experiment's params in the working tree."""
    dvc(repo, "exp", "run", "-n", "two-epochs", "-S", "train.epochs=2", "evaluate")
    revs = [rev for baseline in _exp_show(repo) for exp in baseline.get("experiments") or [] for rev in exp["revs"]]
    (exp,) = [rev for rev in revs if rev.get("name") == "two-epochs"]
    assert exp["data"]["params"]["params.yaml"]["data"]["train"]["epochs"] == 2
    metrics = exp["data"]["metrics"]["reports/classify/evaluate/metrics.json"]["data"]
    metrics_file = repo / "reports/classify/evaluate/metrics.json"
    assert set(metrics) == HEADLINE and metrics == json.loads(metrics_file.read_text())

    monkeypatch.chdir(repo)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from tasks import tracking

    client = tracking.client()
    (run,) = client.search_runs([tracking.experiment_id("medpipe")], "tags.`dvc.exp_name` = 'two-epochs'")
    first = client.get_run(first_run["tasks"]["classify"]["registry"]["run_id"])
    assert run.info.run_name.endswith(" (two-epochs)")
    prefix = run.info.run_name.removesuffix(" (two-epochs)")
    assert prefix.startswith("synthetic-ct-cnn-resnet10-seed42-") and prefix != first.info.run_name
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_auc")] == [1, 2]
