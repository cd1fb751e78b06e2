"""train: a tiny CNN run and what it logs, CPU determinism, the learning floor, resume (after a kill; keyed on the
tensors' content), the LR schedule, the SVM baseline, 3D families, sweeps."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tasks import provenance, train
from tasks.config import Params, load_params, write_overrides
from tests._fake import make_preprocessed

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.delenv(train.EXP_NAME_ENV, raising=False)
    make_preprocessed(tmp_path / "pre")
    return tmp_path


def tiny(**over: object) -> Params:
    base = {"train.arch": "resnet10", "train.epochs": 2, "train.batch_size": 16, "train.num_threads": 1}
    return load_params(REPO / "params.yaml", {**base, **over})


def _run(p: Params, wd: Path, out: str = "model", data: str = "pre") -> train.TrainResult:
    return train.run(p.train, wd / data, wd / out, wd / f"{out}-ckpt", wd / f"{out}-history.csv", None,
                     train.RunInfo.from_base(p.base))  # fmt: skip


def test_cnn_trains_selects_on_val_and_logs(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    from tasks import tracking
    from tasks.models.networks import weights_hash

    monkeypatch.setenv("DVC_EXP_NAME", "tidal-wave")  # what `dvc exp run` sets
    res = _run(tiny(), workdir)
    model = workdir / "model"
    assert sorted(p.name for p in model.iterdir()) == ["model.json", "model.pt", "provenance.json",
                                                        "val_metrics.json"]
    # the selected epoch is the first with the best validation AUC, and val_metrics.json holds its numbers
    aucs = [h["val_auc"] for h in res.history]
    assert [h["epoch"] for h in res.history] == [1, 2]
    assert res.best_epoch == 1 + aucs.index(max(aucs))
    val = json.loads((model / "val_metrics.json").read_text())
    chosen = res.history[res.best_epoch - 1]
    assert val["best_epoch"] == res.best_epoch
    assert {k: val[k] for k in ("val_auc", "val_accuracy", "val_f1", "val_loss")} == {
        k: chosen[k] for k in ("val_auc", "val_accuracy", "val_f1", "val_loss")}
    assert "val_threshold" in val, "evaluate.threshold: val reads it"
    with (workdir / "model-history.csv").open() as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == [1, 2]
    record = json.loads((model / train.PROVENANCE).read_text())
    assert record["data_hash"] == provenance.data_hash(workdir / "pre")

    run = MlflowClient().get_run(res.run_id)
    assert run.data.params["train.arch"] == "resnet10" and run.data.params["data.n_train"] == "48"
    assert {"val_auc", "train_loss"} <= set(run.data.metrics)
    assert [m.step for m in MlflowClient().get_metric_history(res.run_id, "val_auc")] == [1, 2]
    # the selected checkpoint's numbers as single values: the val_auc curve ends at epoch 2, selected or not
    assert run.data.metrics["selected_epoch"] == res.best_epoch
    assert {k: run.data.metrics[f"selected_{k}"] for k in ("val_auc", "val_loss")} == {
        k: pytest.approx(val[k]) for k in ("val_auc", "val_loss")}
    # a name that tells runs apart: readable prefix, the params hash, the DVC experiment
    assert run.info.run_name == f"synthetic-ct-cnn-resnet10-seed42-{record['params_hash'][:8]} (tidal-wave)"
    assert res.run_name == run.info.run_name
    assert run.data.tags["params_hash"] == record["params_hash"]
    # the Source column: the stage's entry point (the commit too, in a git checkout: tests/test_pipeline.py)
    assert (run.data.tags["mlflow.source.name"], run.data.tags["mlflow.source.type"]) == ("tasks/train.py", "LOCAL")
    # the Dataset column: the data by reference, with the hash DVC knows it by (no values logged)
    (inp,) = run.inputs.dataset_inputs
    assert (inp.dataset.name, inp.dataset.digest) == ("synthetic-ct", record["data_hash"])
    assert (inp.dataset.source_type, json.loads(inp.dataset.source)) == ("local", {"uri": (workdir / "pre").as_posix()})
    assert {t.key: t.value for t in inp.tags} == {"mlflow.data.context": "training"}
    assert json.loads(inp.dataset.profile) == {"n_train": 48, "n_val": 16, "n_test": 20}
    assert json.loads(inp.dataset.schema)["mlflow_colspec"][0]["tensor-spec"]["shape"] == [-1, 1, 16, 16]
    assert run.data.tags["model_family"] == "cnn"
    assert run.data.tags["dvc.exp_name"] == "tidal-wave"
    assert run.data.tags["dvc_data_hash"] == record["data_hash"]
    assert run.data.tags[tracking.MODEL_TAG] == weights_hash(model)
    assert tracking.run_for_model(weights_hash(model), model) == res.run_id, "later stages find the run"
    assert not (workdir / "model-ckpt/last.pt").exists(), "a finished run leaves no checkpoint to resume"


def test_same_seed_same_metrics_on_cpu_other_seed_other_metrics(workdir: Path) -> None:
    from mlflow.tracking import MlflowClient

    def strip(h: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in h]

    a = _run(tiny(), workdir, "a")
    b = _run(tiny(), workdir, "b")
    c = _run(tiny(**{"base.seed": 7}), workdir, "c")
    d = _run(tiny(**{"train.epochs": 1}), workdir, "d")
    assert strip(a.history) == strip(b.history)
    assert a.val_metrics == b.val_metrics
    assert (workdir / "a/model.pt").read_bytes() == (workdir / "b/model.pt").read_bytes()
    assert [h["train_loss"] for h in c.history] != [h["train_loss"] for h in a.history]
    assert "dvc.exp_name" not in MlflowClient().get_run(a.run_id).data.tags, "no experiment name outside dvc exp"
    # the same params, the same name; other params (the epochs alone), another name
    na, nb, nc, nd = (MlflowClient().get_run(r.run_id).info.run_name for r in (a, b, c, d))
    assert na == nb and na.startswith("synthetic-ct-cnn-resnet10-seed42-")
    assert nc.startswith("synthetic-ct-cnn-resnet10-seed7-")
    assert nd.startswith("synthetic-ct-cnn-resnet10-seed42-") and nd != na


def test_svm_baseline(workdir: Path) -> None:
    res = _run(tiny(**{"train.family": "svm", "train.svm.feature_size": 8}), workdir, "svm")
    assert (workdir / "svm/model.joblib").exists() and not (workdir / "svm/model.pt").exists()
    assert res.val_metrics["val_auc"] > 0.9  # the fabricated lesion is easy for pooled pixels


@pytest.mark.slow
def test_cnn_learns_the_fabricated_lesion(workdir: Path) -> None:
    """A floor a broken model misses: a bright square marks the positive class, and after a few epochs the CNN
    ranks unseen test images almost perfectly (a model that ignores its input, mislabels, or is evaluated in a
    broken state scores ~0.5). EMA is off here: at ``train.ema`` 0.98 per step, a run of ~100 optimiser steps
    validates an average still dominated by the first steps' weights and batch-norm statistics."""
    from tasks import evaluate

    make_preprocessed(workdir / "learn", n=(96, 32, 40), size=16)
    p = tiny(**{"train.epochs": 8, "train.batch_size": 8, "train.ema": 0.0, "evaluate.bootstrap": 0})
    res = _run(p, workdir, "learned", data="learn")
    assert res.val_metrics["val_auc"] > 0.9
    ev = evaluate.run(p.evaluate, workdir / "learned", workdir / "learn", workdir / "ev-learned")
    assert ev.metrics["test_auc"] > 0.9


@pytest.mark.parametrize(("warmup", "total"), [(1, 10), (4, 20), (0, 12)])
def test_lr_schedule_warms_up_linearly_then_decays_by_cosine_to_zero(warmup: int, total: int) -> None:
    import torch

    from tasks.models.fit import lr_schedule

    lr = 0.5
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = lr_schedule(opt, warmup, total)
    factors = []
    for _ in range(total):  # the factor each optimiser step uses
        factors.append(opt.param_groups[0]["lr"] / lr)
        opt.step()
        sched.step()
    if warmup:
        assert factors[0] == pytest.approx(1 / warmup)
        assert factors[warmup - 1] == pytest.approx(1.0)
        assert factors[:warmup] == pytest.approx(list(np.linspace(1 / warmup, 1, warmup)))
    else:
        assert factors[0] == pytest.approx(1.0)
    decay = factors[max(warmup - 1, 0):]
    assert all(a > b for a, b in zip(decay[1:], decay[2:], strict=False)), "cosine decreases every step"
    steps = total - warmup  # the cosine's length: halfway it is at 0.5, after its last step at 0
    assert factors[warmup + steps // 2] == pytest.approx(0.5 * (1 + math.cos(math.pi * (steps // 2) / steps)))
    assert factors[-1] < 0.05
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


class _Interrupted(Exception):
    pass


def _interrupt_in_epoch_two(p: Params, data_dir: Path, checkpoints: Path) -> None:
    """What a run killed during its second epoch leaves: ``last.pt`` of epoch 1, with the fingerprint train.run
    computes for this data (the real TorchFit loop and checkpoint writer)."""
    from tasks.models.fit import TorchFit, configure_torch

    data = train.load_splits(data_dir)
    fingerprint = train.fingerprint(p.train, p.base.seed, provenance.data_hash(data_dir))
    device = configure_torch(p.base.seed, p.train)
    checkpoints.mkdir(parents=True)
    job = TorchFit(p.train, train.model_spec(p.train, data.meta), data, p.base.seed, 1, device, checkpoints,
                   fingerprint)  # fmt: skip

    def stop(record: dict[str, float]) -> None:
        if record["epoch"] == 2:
            raise _Interrupted

    with pytest.raises(_Interrupted):
        job.fit(0, stop, {})


def test_resume_is_keyed_on_the_tensors_content(workdir: Path) -> None:
    p = tiny(**{"train.epochs": 3, "train.ema": 0.0})
    same = workdir / "pre-copy"  # the same tensors in another folder: the checkpoint is theirs
    shutil.copytree(workdir / "pre", same)
    other = make_preprocessed(workdir / "pre-renoised", seed=1)  # other pixel values; shapes, labels, meta the same
    for name in ("train_x.npy", "train_y.npy", "val_x.npy", "val_y.npy"):
        a, b = np.load(workdir / "pre" / name), np.load(other / name)
        assert a.shape == b.shape and a.dtype == b.dtype
        assert np.array_equal(a, b) == name.endswith("_y.npy")
    assert json.loads((other / "meta.json").read_text()) == json.loads((workdir / "pre/meta.json").read_text())
    assert train.fingerprint(p.train, 42, provenance.data_hash(same)) == \
        train.fingerprint(p.train, 42, provenance.data_hash(workdir / "pre"))  # fmt: skip
    assert train.fingerprint(p.train, 42, provenance.data_hash(other)) != \
        train.fingerprint(p.train, 42, provenance.data_hash(workdir / "pre"))  # fmt: skip

    for out in ("resumed", "afresh"):
        _interrupt_in_epoch_two(p, workdir / "pre", workdir / f"{out}-ckpt")
        assert (workdir / f"{out}-ckpt/last.pt").exists()
    resumed = _run(p, workdir, "resumed", data="pre-copy")
    assert resumed.resumed_from == 1
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    afresh = _run(p, workdir, "afresh", data="pre-renoised")
    assert afresh.resumed_from is None
    assert [h["epoch"] for h in afresh.history] == [1, 2, 3]
    # trained from scratch on the new tensors: the same as a run that never saw the old checkpoint
    clean = _run(p, workdir, "clean", data="pre-renoised")
    assert [h["train_loss"] for h in afresh.history] == [h["train_loss"] for h in clean.history]


@pytest.mark.slow
def test_killed_training_resumes_from_checkpoint(workdir: Path) -> None:
    from mlflow.tracking import MlflowClient

    epochs = 40
    shutil.copy(REPO / "params.yaml", workdir / "params.yaml")
    write_overrides(workdir / "params.yaml", {"train.arch": "resnet10", "train.epochs": epochs,
                                              "train.batch_size": 16, "train.num_threads": 1})  # fmt: skip
    cmd = [sys.executable, "-m", "tasks.train", "--params", "params.yaml", "--input", "pre", "--output", "model",
           "--checkpoints", "ckpt", "--history", "history.csv", "--ingest-summary", "none"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
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
    p = load_params(workdir / "params.yaml")
    res = train.run(p.train, workdir / "pre", workdir / "model", workdir / "ckpt", workdir / "history.csv", None,
                    train.RunInfo.from_base(p.base))  # fmt: skip
    assert res.resumed_from == done
    assert [h["epoch"] for h in res.history] == list(range(1, epochs + 1))
    # one run across the interruption: every epoch once. A kill between an epoch's metrics and its checkpoint reruns
    # that epoch from the restored RNG state, which logs the same value at the same step again (CPU: deterministic)
    values: dict[int, set[float]] = {}
    for m in MlflowClient().get_metric_history(res.run_id, "val_auc"):
        values.setdefault(m.step, set()).add(m.value)
    assert sorted(values) == list(range(1, epochs + 1)), "one run across the interruption, each epoch logged"
    assert all(len(v) == 1 for v in values.values()), f"a rerun epoch logged another value: {values}"


@pytest.mark.parametrize("family", ["cnn", "rnn"])
def test_3d_families_train_and_evaluate(workdir: Path, family: str) -> None:
    from tasks import evaluate

    make_preprocessed(workdir / "pre3d", n=(12, 6, 8), size=12, spatial_dims=3)
    p = tiny(**{"train.family": family, "train.epochs": 1, "train.width": 0.25, "train.stem_stride": 2,
                "train.ema": 0.9, "evaluate.bootstrap": 20})
    res = _run(p, workdir, "m3", data="pre3d")
    assert (res.spec.family, res.spec.spatial_dims, res.spec.width, res.spec.stem_stride) == (family, 3, 0.25, 2)
    assert res.spec.input_shape == (1, 12, 12, 12)
    ev = evaluate.run(p.evaluate, workdir / "m3", workdir / "pre3d", workdir / "ev3")
    assert ev.n_test == 8 and not math.isnan(ev.metrics["test_auc"])  # both classes in the test split
    with (workdir / "ev3/outputs/predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["image_id"] for r in rows] == [f"test{i}" for i in range(8)]
    assert all(float(r["p_normal"]) + float(r["p_lesion"]) == pytest.approx(1, abs=2e-6) for r in rows)


def test_same_seed_same_test_metrics_on_cpu(workdir: Path) -> None:
    from tasks import evaluate

    metrics = []
    for name in ("a", "b"):
        p = tiny(**{"train.epochs": 1, "evaluate.bootstrap": 50})
        _run(p, workdir, name)
        metrics.append(evaluate.run(p.evaluate, workdir / name, workdir / "pre", workdir / f"ev-{name}").metrics)
    assert metrics[0] == metrics[1]
    assert (workdir / "ev-a/metrics.json").read_bytes() == (workdir / "ev-b/metrics.json").read_bytes()


def test_sweep_runs_nest_under_one_parent(workdir: Path) -> None:
    from tasks import tracking

    runs = [_run(tiny(**{"base.sweep": "grid-1", "base.seed": s, "train.epochs": 1}), workdir, f"s{s}") for s in (1, 2)]
    parent = tracking.sweep_parent("medpipe", "grid-1", create=False)
    assert parent is not None
    children = tracking.sweep_children("medpipe", "grid-1")
    assert [c.info.run_id for c in children] == [r.run_id for r in runs]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent}
    assert tracking.sweep_children("medpipe", "no-such-sweep") == []


def test_evaluate_leaves_the_epoch_curves_alone(workdir: Path) -> None:
    """evaluate logs test_* single values to the training run and nothing under a val_* name: the val_* curves keep
    one point per epoch (no stray step 0) and the selected model's validation numbers are selected_val_*."""
    from mlflow.tracking import MlflowClient

    from tasks import evaluate

    p = tiny(**{"train.epochs": 2, "evaluate.bootstrap": 20})
    res = _run(p, workdir)
    before = MlflowClient().get_run(res.run_id).data.metrics
    ev = evaluate.run(p.evaluate, workdir / "model", workdir / "pre", workdir / "ev")
    client = MlflowClient()
    after = client.get_run(res.run_id).data.metrics
    added = set(after) - set(before)
    assert added == set(ev.metrics) and "test_auc_ci_low" in added
    assert not [k for k in added if "val_" in k]
    for k in ("val_auc", "val_accuracy", "val_f1", "val_loss"):
        history = client.get_metric_history(res.run_id, k)
        assert [m.step for m in history] == [1, 2], f"{k}: steps {[m.step for m in history]}"
        assert after[k] == before[k], f"{k}: evaluate moved the run's last value"
    chosen = res.history[res.best_epoch - 1]
    assert after["selected_val_auc"] == pytest.approx(chosen["val_auc"])
    assert after["test_auc"] == pytest.approx(ev.metrics["test_auc"])
