"""train: a tiny CNN run, resume after a kill, CPU determinism, the SVM baseline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks import train
from tasks.config import load_params
from tests._fake import make_preprocessed

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    make_preprocessed(tmp_path / "pre")
    return tmp_path


def tiny(**over):
    base = {"train.arch": "resnet10", "train.epochs": 2, "train.batch_size": 16, "train.num_threads": 1}
    return load_params(REPO / "params.yaml", {**base, **over})


def _run(params, wd: Path, out: str = "model"):
    return train.run(params, wd / "pre", wd / out, wd / f"{out}-ckpt", wd / f"{out}-history.csv", None)


def test_cnn_trains_selects_on_val_and_logs(workdir):
    from mlflow.tracking import MlflowClient

    res = _run(tiny(), workdir)
    assert (workdir / "model/model.pt").exists() and (workdir / "model/model.json").exists()
    assert len(res.history) == 2 and 1 <= res.best_epoch <= 2
    val = json.loads((workdir / "model/val_metrics.json").read_text())
    assert set(val) >= {"val_auc", "val_accuracy", "val_f1", "best_epoch"}
    run = MlflowClient().get_run(res.run_id)
    assert run.data.params["train.arch"] == "resnet10"
    assert {"val_auc", "train_loss", "best_val_auc"} <= set(run.data.metrics)
    assert len(MlflowClient().get_metric_history(res.run_id, "val_auc")) == 2
    assert run.data.tags["model_family"] == "cnn"
    assert not (workdir / "model-ckpt/last.pt").exists(), "a finished run leaves no checkpoint to resume"


def test_same_seed_same_metrics_on_cpu(workdir):
    a = _run(tiny(), workdir, "a")
    b = _run(tiny(), workdir, "b")
    def strip(h):
        return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in h]

    assert strip(a.history) == strip(b.history)
    assert a.val_metrics == b.val_metrics


def test_svm_baseline(workdir):
    res = _run(tiny(**{"train.family": "svm", "train.svm.feature_size": 8}), workdir, "svm")
    assert (workdir / "svm/model.joblib").exists()
    assert res.val_metrics["val_auc"] > 0.9  # the fabricated lesion is easy for pooled pixels


@pytest.mark.slow
def test_killed_training_resumes_from_checkpoint(workdir):
    epochs = 40
    (workdir / "params.yaml").write_text((REPO / "params.yaml").read_text())
    cmd = [sys.executable, "-m", "tasks.train", "--params", "params.yaml", "--input", "pre", "--output", "model",
           "--checkpoints", "ckpt", "--history", "history.csv", "--ingest-summary", "none"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    over = ["train.arch=resnet10", f"train.epochs={epochs}", "train.batch_size=16", "train.num_threads=1"]
    from ruamel.yaml import YAML

    y = YAML()
    doc = y.load((workdir / "params.yaml").read_text())
    for item in over:
        k, v = item.split("=")
        group, key = k.split(".")
        doc[group][key] = type(doc[group][key])(v) if not isinstance(doc[group][key], str) else v
    with (workdir / "params.yaml").open("w") as fh:
        y.dump(doc, fh)
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ckpt = workdir / "ckpt/last.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.exists(), "training never wrote a checkpoint"
    import torch

    done = torch.load(ckpt, weights_only=False)["epoch"] + 1
    assert done < epochs, "training finished before it could be killed; raise the epoch count"
    params = load_params(workdir / "params.yaml")
    res = train.run(params, workdir / "pre", workdir / "model", workdir / "ckpt", workdir / "history.csv", None)
    assert res.resumed_from == done
    assert [h["epoch"] for h in res.history] == list(range(1, epochs + 1))
    from mlflow.tracking import MlflowClient

    assert len(MlflowClient().get_metric_history(res.run_id, "val_auc")) == epochs, "one run across the interruption"


@pytest.mark.parametrize("family", ["cnn", "rnn"])
def test_3d_families_train_and_evaluate(workdir, family):
    from tasks import evaluate

    make_preprocessed(workdir / "pre3d", n=(12, 6, 8), size=12, spatial_dims=3)
    p = tiny(**{"train.family": family, "train.epochs": 1, "train.width": 0.25, "train.stem_stride": 2,
                "train.ema": 0.9, "evaluate.bootstrap": 20})
    res = train.run(p, workdir / "pre3d", workdir / "m3", workdir / "c3", workdir / "h3.csv", None)
    assert (res.spec.family, res.spec.spatial_dims, res.spec.width, res.spec.stem_stride) == (family, 3, 0.25, 2)
    ev = evaluate.run(p, workdir / "m3", workdir / "pre3d", workdir / "ev3")
    assert ev.n_test == 8 and 0.0 <= ev.metrics["test_auc"] <= 1.0


def test_same_seed_same_test_metrics_on_cpu(workdir):
    from tasks import evaluate

    metrics = []
    for name in ("a", "b"):
        p = tiny(**{"train.epochs": 1, "evaluate.bootstrap": 50})
        _run(p, workdir, name)
        metrics.append(evaluate.run(p, workdir / name, workdir / "pre", workdir / f"ev-{name}").metrics)
    assert metrics[0] == metrics[1]


def test_sweep_runs_nest_under_one_parent(workdir):
    from tasks import tracking

    runs = [_run(tiny(**{"base.sweep": "grid-1", "base.seed": s, "train.epochs": 1}), workdir, f"s{s}") for s in (1, 2)]
    parent = tracking.sweep_parent("medpipe", "grid-1", create=False)
    assert parent is not None
    children = tracking.sweep_children("medpipe", "grid-1")
    assert [c.info.run_id for c in children] == [r.run_id for r in runs]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent}
    assert tracking.sweep_children("medpipe", "no-such-sweep") == []
