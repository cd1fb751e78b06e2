"""Stage 3: train the model family chosen in params on the cached tensors; select on validation only.

``python -m tasks.train --params params.yaml --input data/preprocessed --output models/train ...``

The fitting itself is :mod:`tasks.models.fit` (torch families with checkpoints and resume; the SVM). This module
opens the MLflow run, logs params and per-epoch metrics, and writes (``<output>/``): model.pt or model.joblib,
model.json (:class:`tasks.models.networks.ModelSpec`), val_metrics.json and provenance.json (the hashes of the
params and data the model came from); per-epoch history for ``dvc plots`` in ``--history``. Every file is a
function of the stage's inputs: the MLflow run is found again by the model's hash
(:func:`tasks.tracking.run_for_model`), and under ``dvc exp run`` it carries the experiment's name (``dvc.exp_name``).
The run is named ``<dataset>-<family>-<arch>-seed<seed>-<params hash>`` (`` (<experiment>)`` under ``dvc exp run``),
records the preprocessed data as its input data set (DVC's hash as digest, ingest's input as source) and the
selected checkpoint's validation metrics as single values (``selected_val_*``, ``selected_epoch``).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks import provenance, tracking
from tasks.models.fit import CHECKPOINT, Splits, TorchFit, configure_torch, fit_svm
from tasks.models.networks import ModelSpec, weights_hash
from tasks.schema import BaseParams, TrainParams

PROVENANCE = "provenance.json"
ENTRY_POINT = "tasks/train.py"  # the run's source in MLflow (with the git commit)
EXP_NAME_ENV, EXP_NAME_TAG = "DVC_EXP_NAME", "dvc.exp_name"  # `dvc exp run` names the experiment in the environment


@dataclass(frozen=True)
class TrainResult:
    spec: ModelSpec
    best_epoch: int
    val_metrics: dict[str, float]
    history: list[dict[str, float]]
    run_id: str
    resumed_from: int | None
    run_name: str = ""


@dataclass(frozen=True)
class RunInfo:
    """How the MLflow run is named and filed (the ``base`` keys train reads)."""

    experiment: str = "medpipe"
    dataset: str = "synthetic-ct"
    sweep: str | None = None
    seed: int = 42

    @classmethod
    def from_base(cls, base: BaseParams) -> RunInfo:
        """The run info of the ``base`` params group."""
        return cls(experiment=base.experiment, dataset=base.dataset, sweep=base.sweep, seed=base.seed)


def load_splits(inputs: Path) -> Splits:
    """Load preprocess's train/val arrays as torch tensors (float32, contiguous, ready for batching)."""
    import torch

    meta_path = inputs / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path}: not found (did the preprocess stage run?)")
    meta = json.loads(meta_path.read_text())

    def arr(name: str) -> torch.Tensor:
        path = inputs / name
        if not path.exists():
            raise FileNotFoundError(f"{path}: not found (did the preprocess stage run?)")
        return torch.from_numpy(np.load(path))

    tr_y, va_y = arr("train_y.npy"), arr("val_y.npy")
    if meta.get("task_kind") == "segmentation":  # the label maps are the targets (uint8 on disk: 8x less memory)
        return Splits(arr("train_x.npy").float(), tr_y, arr("val_x.npy").float(), va_y, meta,
                      train_m=arr("train_m.npy"), val_m=arr("val_m.npy"))  # fmt: skip
    for name, y in (("train_y.npy", tr_y), ("val_y.npy", va_y)):
        if (y < 0).any():
            raise ValueError(f"{inputs / name}: unlabelled samples (-1) cannot be used for training")
    return Splits(arr("train_x.npy").float(), tr_y, arr("val_x.npy").float(), va_y, meta)


def model_spec(tp: TrainParams, meta: dict[str, Any]) -> ModelSpec:
    """The network ``tp`` asks for, shaped by the data preprocess described in ``meta`` (its meta.json)."""
    if meta.get("task_kind") == "segmentation":
        from tasks.models.segfit import seg_model_spec

        return seg_model_spec(tp, meta)
    return ModelSpec(
        family=tp.family, arch=tp.arch, spatial_dims=meta["spatial_dims"], in_channels=meta["in_channels"],
        num_classes=meta["num_classes"], input_shape=tuple(meta["input_shape"]),
        class_names=tuple(meta["class_names"]), width=tp.width, stem_stride=tp.stem_stride,
        feature_size=tp.svm.feature_size,
    )


def _describe_changes(changed: list[str] | None) -> str:
    """The ``git_code_changed`` tag: ``false``, ``true: <files>`` (at most 500 characters) or ``unknown``."""
    if changed is None:
        return "unknown"
    return f"true: {', '.join(changed)}"[:500] if changed else "false"


def fingerprint(tp: TrainParams, seed: int, data_hash: str) -> str:
    """What a training job is: the train params, the seed and the content hash of the tensors it reads.

    A checkpoint resumes only when this matches, so a preprocess change with the same shapes starts afresh.
    """
    blob = json.dumps([seed, tp.model_dump(mode="json"), data_hash], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _upstream_params(inputs: Path, ingest_summary: Path | None) -> dict[str, Any]:
    """The params the data came from, as recorded by ingest (summary.json) and preprocess (meta.json)."""
    out: dict[str, Any] = {}
    meta = json.loads((inputs / "meta.json").read_text())
    out.update(tracking.flatten({"preprocess": meta.get("params", {})}))
    if ingest_summary and ingest_summary.exists():
        out.update(tracking.flatten({"ingest": json.loads(ingest_summary.read_text()).get("params", {})}))
    return out


def _data_source(inputs: Path, ingest_summary: Path | None) -> str:
    """Where the data set came from: ingest's input as params name it (summary.json), else the tensors' folder."""
    if ingest_summary and ingest_summary.exists():
        summary = json.loads(ingest_summary.read_text())
        source = summary.get("input") or (summary.get("params") or {}).get("input")
        if source:
            return str(source)
    return inputs.as_posix()


def run(
    tp: TrainParams, inputs: Path, output: Path, checkpoints: Path, history_path: Path,
    ingest_summary: Path | None = None, info: RunInfo = RunInfo(),
) -> TrainResult:  # fmt: skip
    """Train, select on validation, write the model and log to a new MLflow run (or the interrupted one's).

    Args:
        tp: the ``train`` params group.
        inputs: preprocess's output folder. output: where the model files go.
        checkpoints: where ``last.pt`` lives between epochs (removed when training finishes).
        history_path: per-epoch CSV for ``dvc plots``.
        ingest_summary: ingest's summary.json (logged with its de-identification audit; its params are logged).
        info: the MLflow experiment, run name parts, sweep and the training seed.
    """
    import torch

    data = load_splits(inputs)
    meta = data.meta
    positive_class = int(meta.get("positive_class", 1))
    spec = model_spec(tp, meta)
    device = configure_torch(info.seed, tp)
    for folder in (output, checkpoints, history_path.parent):
        folder.mkdir(parents=True, exist_ok=True)
    data_hash = provenance.data_hash(inputs)
    own = {"train": tp.model_dump(mode="json"), "base": {"seed": info.seed}}
    upstream = _upstream_params(inputs, ingest_summary)
    record = {"params_hash": provenance.params_hash([own, upstream]), "data_hash": data_hash}
    # a flow (or a person) finds the run of a DVC experiment by its name; absent outside `dvc exp run`
    experiment = os.environ.get(EXP_NAME_ENV) or None
    exp_tags = {EXP_NAME_TAG: experiment} if experiment else {}
    name = tracking.run_name(f"{info.dataset}-{spec.family}-{spec.arch}-seed{info.seed}", record["params_hash"],
                             experiment)  # fmt: skip
    source = _data_source(inputs, ingest_summary)

    def open_run() -> str:
        run_params = {**tracking.flatten(own), **upstream, "base.dataset": info.dataset,
                      "base.experiment": info.experiment, "base.sweep": info.sweep}  # fmt: skip
        run_params.update({f"data.n_{k}": v for k, v in meta["counts"].items()})
        run_params["data.input_shape"] = meta["input_shape"]
        commit = provenance.git_commit()
        tags = {
            "git_commit": commit, "dvc_data_hash": data_hash, "dataset": info.dataset,
            "model_family": spec.family, "arch": spec.arch, "spatial_dims": str(spec.spatial_dims),
            "task_kind": meta.get("task_kind", "classification"),
            "params_hash": record["params_hash"], **exp_tags, **tracking.source_tags(ENTRY_POINT, commit),
            # whether tracked code differed from that commit (DVC's own rewrites of dvc.lock are not code)
            "git_code_changed": _describe_changes(provenance.code_changes()),
        }
        rid = tracking.start_run(info.experiment, name, tags, run_params, sweep=info.sweep)
        tracking.log_dataset(rid, info.dataset, data_hash, source, tuple(meta["input_shape"]), meta["counts"])
        artifacts = [inputs / "meta.json"]
        if ingest_summary:  # the ingest summary and its PS3.15 de-identification audit (counts, no values)
            artifacts += [f for f in (ingest_summary, ingest_summary.parent / "deid_audit.json") if f.exists()]
        tracking.log_artifacts(rid, artifacts, artifact_path="data")
        if ingest_summary and ingest_summary.exists():
            summary = json.loads(ingest_summary.read_text())
            tracking.log_metrics(rid, {f"ingest_{k}": v for k, v in summary.items()
                                       if isinstance(v, (int, float)) and not isinstance(v, bool)})
        return rid

    t0 = time.perf_counter()
    if tp.family == "svm":
        rid = open_run()
        clf, best_val = fit_svm(tp, data, info.seed, positive_class)
        import joblib

        joblib.dump(clf, output / "model.joblib")
        history, best_epoch, resumed_from = [{"epoch": 1, **best_val}], 1, None
        tracking.log_metrics(rid, best_val, step=1)
    else:
        if spec.is_segmentation:
            from tasks.models.segfit import SegFit as Fit
        else:
            Fit = TorchFit
        job = Fit(tp, spec, data, info.seed, positive_class, device, checkpoints,
                  fingerprint(tp, info.seed, data_hash))  # fmt: skip
        ckpt = job.resume()
        rid = ckpt["run_id"] if ckpt is not None and ckpt.get("run_id") else open_run()
        if ckpt is not None:  # the run is named after the experiment that finishes it
            tracking.set_tags(rid, exp_tags)
            tracking.rename_run(rid, name)

        def on_epoch(rec: dict[str, float]) -> None:
            tracking.log_metrics(rid, {k: v for k, v in rec.items() if k != "epoch"}, step=int(rec["epoch"]))

        state = job.fit(job.state.resumed_from or 0, on_epoch, {"run_id": rid})
        history, best_epoch, best_val, resumed_from = state.history, state.best_epoch, state.best_val, \
            state.resumed_from  # fmt: skip
        torch.save(state.best_state, output / "model.pt")
    spec.save(output / "model.json")
    (output / "val_metrics.json").write_text(json.dumps({**best_val, "best_epoch": best_epoch}, indent=2) + "\n")
    (output / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")
    (output / "mlflow_run.json").unlink(missing_ok=True)  # an earlier layout's run-id file: outputs hold no run ids
    tracking.tag_model(rid, weights_hash(output))
    with history_path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(history[0].keys()), lineterminator="\n")
        w.writeheader()
        w.writerows(history)
    # the selected checkpoint's validation metrics as single values: the per-epoch val_* curves end at the last
    # epoch, which is not the selected one
    tracking.log_metrics(rid, {"selected_epoch": best_epoch, "train_minutes": (time.perf_counter() - t0) / 60,
                               **{f"selected_{k}": v for k, v in best_val.items()}})  # fmt: skip
    tracking.log_artifacts(rid, [history_path, output / "model.json"], artifact_path="train")
    (checkpoints / CHECKPOINT).unlink(missing_ok=True)  # finished: a later run starts afresh
    return TrainResult(spec, best_epoch, best_val, history, rid, resumed_from, name)


def main(argv: list[str] | None = None) -> None:
    from tasks.config import HelpFormatter, load_params_or_exit
    from tasks.noise import silence_known_noise

    silence_known_noise()
    ap = argparse.ArgumentParser(prog="python -m tasks.train", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter,
                                 epilog="Settings (family, epochs, ...) are the `train` group of the params file.")
    ap.add_argument("--params", default="params.yaml", help="the params file")
    ap.add_argument("--task", default="classify",
                    help="the task (params.yaml `tasks`): its overrides of the train group")
    ap.add_argument("--input", type=Path, default=Path("data/preprocessed/classify"),
                    help="preprocess's output folder: *_x.npy, *_y.npy, meta.json")
    ap.add_argument("--output", type=Path, default=Path("models/classify/train"),
                    help="where the model, model.json, val_metrics.json and provenance.json go")
    ap.add_argument("--checkpoints", type=Path, default=Path("models/classify/checkpoints"),
                    help="where last.pt is kept between epochs, to resume a killed run")
    ap.add_argument("--history", type=Path, default=Path("reports/classify/train/history.csv"),
                    help="per-epoch metrics CSV, for `dvc plots`")
    ap.add_argument("--ingest-summary", type=Path, default=Path("data/ingested/summary.json"),
                    help="ingest's summary.json: its params, counts and the data set's source go to MLflow; a missing "
                         "file is skipped")
    args = ap.parse_args(argv)
    params = load_params_or_exit(args.params, task=args.task)
    res = run(params.train, args.input, args.output, args.checkpoints, args.history, args.ingest_summary,
              RunInfo(experiment=params.base.experiment, dataset=params.base.dataset, sweep=params.base.sweep,
                      seed=params.base.seed))
    val = ", ".join(f"{k} {v:.4f}" for k, v in res.val_metrics.items())
    print(f"train: {res.spec.family}/{res.spec.arch} selected epoch {res.best_epoch}: {val} "
          f"(MLflow run {res.run_name!r}, {res.run_id})")


if __name__ == "__main__":
    main()
