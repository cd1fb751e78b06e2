"""Stage 3: train the model family chosen in params on the cached tensors; select on validation only.

Torch families (``cnn``, ``rnn``) train with AdamW, a per-step warm-up + cosine schedule, batched augmentation, an
optional moving average of the weights (EMA, what is validated and kept), a checkpoint after every epoch (model,
optimiser, scheduler, EMA, RNG state, history, MLflow run id) and resume after an interruption; the epoch with the
best validation ``train.select_metric`` is kept. ``svm`` fits a scikit-learn SVC on pooled pixels. Outputs
(``<output>/``): model.pt or model.joblib, model.json (:class:`tasks.models.ModelSpec`), val_metrics.json,
mlflow_run.json; per-epoch history for ``dvc plots`` in ``--history``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks import tracking
from tasks.config import Params, load_params_or_exit, params_hash
from tasks.models import ModelSpec

CHECKPOINT = "last.pt"


@dataclass(frozen=True)
class TrainResult:
    spec: ModelSpec
    best_epoch: int
    val_metrics: dict[str, float]
    history: list[dict[str, float]]
    run_id: str
    resumed_from: int | None


@dataclass
class Splits:
    """Cached tensors of one preprocess output: x float32 (N, C, *S) in [0, 1], y int64 (N,)."""

    train_x: Any
    train_y: Any
    val_x: Any
    val_y: Any
    meta: dict[str, Any]


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
    for name, y in (("train_y.npy", tr_y), ("val_y.npy", va_y)):
        if (y < 0).any():
            raise ValueError(f"{inputs / name}: unlabelled samples (-1) cannot be used for training")
    return Splits(arr("train_x.npy").float(), tr_y, arr("val_x.npy").float(), va_y, meta)


def fingerprint(params: Params, inputs: Path) -> str:
    """Identifies a training job: train params, seed and the cached data. A checkpoint resumes only if it matches."""
    h = hashlib.sha256()
    h.update(json.dumps([params.base.seed, params.train.model_dump(mode="json")], sort_keys=True).encode())
    for name in ("meta.json", "train_y.npy", "val_y.npy", "train_x.npy"):
        p = inputs / name
        h.update(f"{name}:{p.stat().st_size}".encode())
    h.update((inputs / "train_y.npy").read_bytes())
    return h.hexdigest()[:16]


def configure_torch(params: Params):
    """Seed everything, pick the device and the CPU thread count; returns the torch.device."""
    import torch

    torch.manual_seed(params.base.seed)
    np.random.seed(params.base.seed)
    threads = params.train.num_threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    want = params.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device: cuda was asked for but torch.cuda.is_available() is False")
    return torch.device("cuda" if want in ("cuda", "auto") and torch.cuda.is_available() else "cpu")


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR factor per optimiser step: linear warm-up from ~0 to 1 over ``warmup_steps``, then cosine to 0."""
    import math

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _save_atomic(obj: Any, path: Path) -> None:
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def fit_torch(
    params: Params,
    spec: ModelSpec,
    data: Splits,
    device,
    checkpoint_dir: Path,
    fp: str,
    run_id: Callable[[dict | None], str],
    on_epoch: Callable[[str, dict[str, float]], None],
) -> tuple[dict, int, dict[str, float], list[dict[str, float]], str, int | None]:
    """Train a torch family with per-epoch checkpoints; returns (best_state, best_epoch, best_val, history,
    run_id, resumed_from)."""
    import torch
    from tqdm import tqdm

    from tasks.augment import augment_batch
    from tasks.metrics import best_threshold, classification_metrics, cross_entropy
    from tasks.models import build_model, predict_proba

    tp = params.train
    model = build_model(spec).to(device)
    # 3D convolutions on CPU run ~18% faster channels-last (measured: benchmarks/medmnist.py); the slice RNN's 2D
    # encoder sees reshaped 4D tensors, so it stays in the default layout
    channels_last = spec.family == "cnn" and spec.spatial_dims == 3 and device.type == "cpu"
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    opt = torch.optim.AdamW(model.parameters(), lr=tp.lr, weight_decay=tp.weight_decay)
    n, bs = len(data.train_y), tp.batch_size
    steps_per_epoch = sum(1 for i in range(0, n, bs) if n - i >= 2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(tp.warmup_epochs * steps_per_epoch,
                                                                 tp.epochs * steps_per_epoch))
    gen = torch.Generator().manual_seed(params.base.seed)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=tp.label_smoothing)
    # an exponential moving average of the weights (and BN statistics): what is validated, selected and saved
    ema = None
    if tp.ema > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(tp.ema), use_buffers=True)
    history: list[dict[str, float]] = []
    best_state, best_epoch, best_val, best_score = None, -1, {}, -float("inf")
    start, resumed_from = 0, None

    ckpt_path = checkpoint_dir / CHECKPOINT
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False) if ckpt_path.exists() else None
    if ckpt is not None and ckpt.get("fingerprint") == fp:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        gen.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["torch_rng"])
        history, best_state, best_epoch = ckpt["history"], ckpt["best_state"], ckpt["best_epoch"]
        best_val, best_score = ckpt["best_val"], ckpt["best_score"]
        start = resumed_from = ckpt["epoch"] + 1
        print(f"train: resuming from checkpoint {ckpt_path} after epoch {ckpt['epoch']}")
    elif ckpt is not None:
        print(f"train: ignoring checkpoint {ckpt_path} (it belongs to other params or data)")
    rid = run_id(ckpt if resumed_from is not None else None)

    y_train = data.train_y.to(device)
    for epoch in range(start, tp.epochs):
        model.train()
        t0, seen, loss_sum, correct = time.perf_counter(), 0, 0.0, 0
        perm = torch.randperm(n, generator=gen)
        bar = tqdm(range(0, n, bs), desc=f"epoch {epoch + 1}/{tp.epochs}", unit="batch", leave=False)
        for i in bar:
            idx = perm[i : i + bs]
            if len(idx) < 2:  # batch norm needs two samples
                continue
            xb = data.train_x[idx]
            if tp.augment:
                xb = augment_batch(xb, gen)
            xb, yb = xb.to(device), y_train[idx.to(device)]
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last_3d)
            logits = model(xb)
            loss = loss_fn(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                ema.update_parameters(model)
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(idx)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
        train_s = time.perf_counter() - t0
        selected = model if ema is None else ema.module
        selected.eval()
        proba = predict_proba(selected, spec, data.val_x, batch_size=max(bs, 64))
        val = classification_metrics(data.val_y.numpy(), proba, params.base.positive_class)
        val["loss"] = cross_entropy(data.val_y.numpy(), proba)
        record = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(seen, 1),
            "train_accuracy": correct / max(seen, 1),
            **{f"val_{k}": v for k, v in val.items()},
            "lr": opt.param_groups[0]["lr"],
            "samples_per_s": seen / train_s,
        }
        history.append(record)
        score = -val["loss"] if tp.select_metric == "loss" else val[tp.select_metric]
        if np.isnan(score):
            score = val["accuracy"]
        if score > best_score:
            best_score, best_epoch, best_val = score, epoch + 1, {f"val_{k}": v for k, v in val.items()}
            if proba.shape[1] == 2:  # the accuracy-optimal decision threshold on validation (evaluate.threshold: val)
                best_val["val_threshold"] = best_threshold(data.val_y.numpy(), proba, params.base.positive_class)
            best_state = copy.deepcopy({k: v.cpu() for k, v in selected.state_dict().items()})
        on_epoch(rid, record)
        print(
            f"epoch {epoch + 1}/{tp.epochs}: loss {record['train_loss']:.4f} val_auc {val['auc']:.4f} "
            f"val_acc {val['accuracy']:.4f} ({record['samples_per_s']:.0f} samples/s)"
        )
        _save_atomic(
            {
                "fingerprint": fp,
                "epoch": epoch,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "generator": gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "history": history,
                "best_state": best_state,
                "best_epoch": best_epoch,
                "best_val": best_val,
                "best_score": best_score,
                "run_id": rid,
            },
            ckpt_path,
        )
    return best_state, best_epoch, best_val, history, rid, resumed_from


def fit_svm(params: Params, data: Splits):
    """Fit the SVM baseline on pooled features; returns (pipeline, val metrics)."""
    from tasks.metrics import best_threshold, classification_metrics
    from tasks.svm import build_svm, pool_features

    sp = params.train.svm
    clf = build_svm(sp.C, sp.kernel, params.base.seed)
    clf.fit(pool_features(data.train_x.numpy(), sp.feature_size), data.train_y.numpy())
    proba = clf.predict_proba(pool_features(data.val_x.numpy(), sp.feature_size))
    val = classification_metrics(data.val_y.numpy(), proba, params.base.positive_class)
    best = {f"val_{k}": v for k, v in val.items()}
    if proba.shape[1] == 2:
        best["val_threshold"] = best_threshold(data.val_y.numpy(), proba, params.base.positive_class)
    return clf, best


def _run_tags(params: Params, spec: ModelSpec) -> dict[str, str]:
    return {
        "git_commit": tracking.git_commit(),
        "dvc_data_hash": tracking.dvc_out_hash("data/ingested"),
        "dataset": params.base.dataset,
        "model_family": spec.family,
        "arch": spec.arch,
        "spatial_dims": str(spec.spatial_dims),
        "params_hash": params_hash(params),
    }


def run(
    params: Params, inputs: Path, output: Path, checkpoints: Path, history_path: Path, ingest_summary: Path | None
) -> TrainResult:
    """Train, select on validation, write the model and log to a new MLflow run (or the interrupted one)."""
    import torch

    data = load_splits(inputs)
    meta = data.meta
    tp = params.train
    spec = ModelSpec(
        family=tp.family,
        arch=tp.arch,
        spatial_dims=meta["spatial_dims"],
        in_channels=meta["in_channels"],
        num_classes=meta["num_classes"],
        input_shape=tuple(meta["input_shape"]),
        class_names=tuple(meta["class_names"]),
        width=tp.width,
        stem_stride=tp.stem_stride,
    )
    device = configure_torch(params)
    output.mkdir(parents=True, exist_ok=True)
    checkpoints.mkdir(parents=True, exist_ok=True)
    history_path.parent.mkdir(parents=True, exist_ok=True)

    def open_run(ckpt: dict | None) -> str:
        if ckpt is not None and ckpt.get("run_id"):
            return ckpt["run_id"]
        run_params = tracking.flatten(params.model_dump(mode="json"))
        run_params.update({f"data.n_{k}": v for k, v in meta["counts"].items()})
        run_params["data.input_shape"] = meta["input_shape"]
        rid = tracking.start_run(
            params.base.experiment, f"{params.base.dataset}-{spec.family}-{spec.arch}-seed{params.base.seed}",
            _run_tags(params, spec), run_params, sweep=params.base.sweep,
        )
        artifacts = [inputs / "meta.json"]
        if ingest_summary:  # the ingest summary and its PS3.15 de-identification audit (counts, no values)
            artifacts += [f for f in (ingest_summary, ingest_summary.parent / "deid_audit.json") if f.exists()]
        tracking.log_artifacts(rid, artifacts, artifact_path="data")
        if ingest_summary and ingest_summary.exists():
            summary = json.loads(ingest_summary.read_text())
            tracking.log_metrics(rid, {f"ingest_{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
        return rid

    def on_epoch(rid: str, record: dict[str, float]) -> None:
        tracking.log_metrics(rid, {k: v for k, v in record.items() if k != "epoch"}, step=int(record["epoch"]))

    t0 = time.perf_counter()
    if tp.family == "svm":
        rid = open_run(None)
        clf, best_val = fit_svm(params, data)
        import joblib

        joblib.dump(clf, output / "model.joblib")
        history, best_epoch, resumed_from = [{"epoch": 1, **best_val}], 1, None
        tracking.log_metrics(rid, best_val, step=1)
    else:
        fp = fingerprint(params, inputs)
        best_state, best_epoch, best_val, history, rid, resumed_from = fit_torch(
            params, spec, data, device, checkpoints, fp, open_run, on_epoch
        )
        torch.save(best_state, output / "model.pt")
    spec.save(output / "model.json")
    (output / "val_metrics.json").write_text(json.dumps({**best_val, "best_epoch": best_epoch}, indent=2) + "\n")
    tracking.write_run_file(output, rid)
    with history_path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(history[0].keys()))
        w.writeheader()
        w.writerows(history)
    tracking.log_metrics(rid, {"best_epoch": best_epoch, "train_minutes": (time.perf_counter() - t0) / 60})
    tracking.log_metrics(rid, {f"best_{k}": v for k, v in best_val.items()})
    tracking.log_artifacts(rid, [history_path, output / "model.json"], artifact_path="train")
    (checkpoints / CHECKPOINT).unlink(missing_ok=True)  # finished: a later run starts afresh
    return TrainResult(spec, best_epoch, best_val, history, rid, resumed_from)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tasks.train", description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--input", type=Path, default=Path("data/preprocessed"))
    ap.add_argument("--output", type=Path, default=Path("models/train"))
    ap.add_argument("--checkpoints", type=Path, default=Path("models/checkpoints"))
    ap.add_argument("--history", type=Path, default=Path("reports/train/history.csv"))
    ap.add_argument("--ingest-summary", type=Path, default=Path("data/ingested/summary.json"))
    args = ap.parse_args(argv)
    params = load_params_or_exit(args.params)
    res = run(params, args.input, args.output, args.checkpoints, args.history, args.ingest_summary)
    val = ", ".join(f"{k} {v:.4f}" for k, v in res.val_metrics.items())
    print(f"train: {res.spec.family}/{res.spec.arch} best epoch {res.best_epoch}: {val} (MLflow run {res.run_id})")


if __name__ == "__main__":
    main()
