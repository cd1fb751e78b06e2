"""Fitting the model families on cached tensors: the torch loop (with checkpoints and resume) and the SVM.

The torch loop: AdamW, torch's own LR schedulers (linear warm-up then cosine to 0, per optimiser step), batched
augmentation (:mod:`tasks.models.augment`), an optional exponential moving average of the weights (what is
validated, selected and kept), a checkpoint after every epoch and resume after an interruption. The epoch with the
best validation ``select_metric`` is kept. No MLflow here: the caller passes ``on_epoch``.

Progress: one line per epoch, flushed as it is printed (a log read live, e.g. under the flow, gets it at once), and a
tqdm bar within the epoch on a terminal only (:func:`progress_bar_disabled`), so a log file holds no carriage-return
updates.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tasks.models.networks import ModelSpec
from tasks.schema import TrainParams

CHECKPOINT = "last.pt"


def progress_bar_disabled() -> bool | None:
    """tqdm's ``disable`` for the per-epoch bar: ``MEDPIPE_PROGRESS=1`` draws it, ``0`` hides it (the flow sets it:
    1 when it relays the stage's output to a terminal, the stage's own stderr being a pipe), ``TQDM_DISABLE=1``
    hides it; otherwise ``None``: tqdm draws it only when stderr is a terminal."""
    forced = os.environ.get("MEDPIPE_PROGRESS", "").strip().lower()
    if forced:
        return forced in ("0", "false", "no", "off")
    return True if os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes", "on") else None


@dataclass
class Splits:
    """Cached tensors of one preprocess output: x float32 (N, C, *S) in [0, 1], y int64 (N,).

    A segmentation task adds its label maps ``train_m`` / ``val_m``: int64 (N, *S), 0 = background, v = class v.
    """

    train_x: Any
    train_y: Any
    val_x: Any
    val_y: Any
    meta: dict[str, Any]
    train_m: Any = None
    val_m: Any = None


@dataclass
class FitState:
    """What a fit produced, and what a checkpoint holds to continue it."""

    best_state: dict | None = None  # the selected weights (state dict, on CPU)
    best_epoch: int = -1  # 1-based
    best_val: dict[str, float] = field(default_factory=dict)  # val_* metrics of the selected epoch
    best_score: float = -float("inf")
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int | None = None  # epoch index the run continued after, or None


def configure_torch(seed: int, tp: TrainParams):
    """Seed everything, pick the device and the CPU thread count; returns the torch.device."""
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(tp.num_threads or os.cpu_count() or 1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if tp.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device: cuda was asked for but torch.cuda.is_available() is False")
    return torch.device("cuda" if tp.device in ("cuda", "auto") and torch.cuda.is_available() else "cpu")


def bf16_native() -> bool:
    """Whether this CPU runs bfloat16 matmuls/convolutions natively (AVX512-BF16 or AMX), per oneDNN."""
    import torch

    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else False


def autocast_context(precision: str, device) -> Callable[[], Any]:
    """A factory of the training forward's context: ``torch.autocast(bfloat16)`` for ``train.precision: bf16``, a
    no-op for ``fp32``. Warns once when bf16 is asked for on a CPU that only emulates it (slower than fp32)."""
    import contextlib

    import torch

    if precision != "bf16":
        return contextlib.nullcontext
    if device.type == "cpu" and not bf16_native():
        print("train: precision bf16 on a CPU without native bfloat16 (AVX512-BF16/AMX): emulated, likely slower "
              "than fp32; set train.precision: fp32", flush=True)  # fmt: skip
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def lr_schedule(opt, warmup_steps: int, total_steps: int):
    """torch's schedulers: linear warm-up from ``1/warmup_steps`` to 1, then cosine annealing to 0 (per step)."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    cosine = CosineAnnealingLR(opt, T_max=max(1, total_steps - warmup_steps), eta_min=0.0)
    if warmup_steps <= 0:
        return cosine
    warm = LinearLR(opt, start_factor=1.0 / warmup_steps, end_factor=1.0, total_iters=max(1, warmup_steps - 1))
    return SequentialLR(opt, [warm, cosine], milestones=[warmup_steps])


def _save_atomic(obj: Any, path: Path) -> None:
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class TorchFit:
    """One torch training job: build, (resume,) run epochs, select on validation, checkpoint.

    Args:
        tp: the ``train`` params group.
        spec: the network to build.
        data: cached tensors.
        seed: training seed (init, data order, augmentation).
        positive_class: index of the positive class (binary metrics and threshold).
        device: a torch.device.
        checkpoint_dir: where ``last.pt`` is written after every epoch.
        fingerprint: what the job is (params + data hash): a checkpoint resumes only if it matches.
    """

    def __init__(self, tp: TrainParams, spec: ModelSpec, data: Splits, seed: int, positive_class: int, device,
                 checkpoint_dir: Path, fingerprint: str) -> None:  # fmt: skip
        import torch

        from tasks.models.networks import build_model

        self.tp, self.spec, self.data, self.device = tp, spec, data, device
        self.positive_class, self.fingerprint = positive_class, fingerprint
        self.ckpt_path = checkpoint_dir / CHECKPOINT
        self.model = build_model(spec).to(device)
        # 3D convolutions on CPU run ~18% faster channels-last (measured: benchmarks/medmnist.py); the slice RNN's
        # 2D encoder sees reshaped 4D tensors, so it stays in the default layout
        self.channels_last = spec.family == "cnn" and spec.spatial_dims == 3 and device.type == "cpu"
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last_3d)
        self.autocast = autocast_context(tp.precision, device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=tp.lr, weight_decay=tp.weight_decay)
        n = len(data.train_x)
        self.steps_per_epoch = sum(1 for i in range(0, n, tp.batch_size) if n - i >= 2)
        self.sched = lr_schedule(self.opt, tp.warmup_epochs * self.steps_per_epoch, tp.epochs * self.steps_per_epoch)
        self.gen = torch.Generator().manual_seed(seed)
        self.loss_fn = self.make_loss()
        self.ema = None
        if tp.ema > 0:  # a moving average of the weights (and BN statistics): what is validated and kept
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(tp.ema), use_buffers=True)
        self.state = FitState()

    def make_loss(self):
        """The training loss: cross-entropy on (B, K) logits and (B,) class indices."""
        import torch

        return torch.nn.CrossEntropyLoss(label_smoothing=self.tp.label_smoothing)

    # -- checkpoints -------------------------------------------------------------------------------------------
    def resume(self) -> dict | None:
        """Load ``last.pt`` if it belongs to this job; returns the checkpoint (None: starting afresh)."""
        import torch

        if not self.ckpt_path.exists():
            return None
        ckpt = torch.load(self.ckpt_path, map_location="cpu", weights_only=False)
        if ckpt.get("fingerprint") != self.fingerprint:
            print(f"train: ignoring checkpoint {self.ckpt_path} (it belongs to other params or data)", flush=True)
            return None
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(ckpt["ema"])
        self.gen.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["torch_rng"])
        self.state = FitState(**ckpt["state"])
        self.state.resumed_from = ckpt["epoch"] + 1
        print(f"train: resuming from checkpoint {self.ckpt_path} after epoch {ckpt['epoch']}", flush=True)
        return ckpt

    def save(self, epoch: int, extra: dict[str, Any]) -> None:
        import torch

        s = self.state
        _save_atomic({
            "fingerprint": self.fingerprint, "epoch": epoch, "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None, "generator": self.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "state": {"best_state": s.best_state, "best_epoch": s.best_epoch, "best_val": s.best_val,
                      "best_score": s.best_score, "history": s.history},
            **extra,
        }, self.ckpt_path)  # fmt: skip

    # -- one epoch ---------------------------------------------------------------------------------------------
    def batch(self, idx):
        """The training batch ``idx`` (augmented when ``train.augment``): (inputs, targets), both on the device."""
        from tasks.models.augment import augment_batch

        xb = self.data.train_x[idx]
        if self.tp.augment:
            xb = augment_batch(xb, self.gen, self.tp.augmentation)
        return xb.to(self.device), self.data.train_y[idx].to(self.device)

    def correct(self, logits, target) -> float:
        """How many of the batch's samples are right (the train accuracy's numerator)."""
        return int((logits.argmax(1) == target).sum())

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training split; returns train loss, accuracy, seconds and samples."""
        import torch
        from tqdm import tqdm

        tp, data = self.tp, self.data
        self.model.train()
        t0, seen, loss_sum, correct = time.perf_counter(), 0, 0.0, 0
        n, bs = len(data.train_x), tp.batch_size
        perm = torch.randperm(n, generator=self.gen)
        bar = tqdm(range(0, n, bs), desc=f"epoch {epoch + 1}/{tp.epochs}", unit="batch", leave=False,
                   disable=progress_bar_disabled())  # fmt: skip
        for i in bar:
            idx = perm[i : i + bs]
            if len(idx) < 2:  # batch norm needs two samples
                continue
            xb, yb = self.batch(idx)
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last_3d)
            with self.autocast():
                logits = self.model(xb)
            logits = logits.float()  # the loss (and its softmax) in float32 whatever the forward ran in
            loss = self.loss_fn(logits, yb)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.sched.step()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            loss_sum += loss.item() * len(idx)
            correct += self.correct(logits, yb)
            seen += len(idx)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
        return {"train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1),
                "seconds": time.perf_counter() - t0, "samples": seen}  # fmt: skip

    def validate(self) -> tuple[dict[str, float], np.ndarray]:
        """Metrics of the selected weights (EMA if on) on the validation split, and its probabilities (N, K)."""
        from tasks.metrics import classification_metrics, log_loss
        from tasks.models.networks import predict_proba

        selected = self.model if self.ema is None else self.ema.module
        selected.eval()
        y = self.data.val_y.numpy()
        proba = predict_proba(selected, self.spec, self.data.val_x, batch_size=max(self.tp.batch_size, 64))
        val = classification_metrics(y, proba, self.positive_class)
        val["loss"] = log_loss(y, proba)
        return val, proba

    def describe(self, val: dict[str, float]) -> str:
        """The validation part of the one-line epoch summary."""
        return f"val_auc {val['auc']:.4f} val_acc {val['accuracy']:.4f}"

    def select(self, epoch: int, val: dict[str, float], proba: np.ndarray) -> None:
        """Keep this epoch's weights if its validation ``select_metric`` is the best so far."""
        from tasks.metrics import best_threshold

        score = -val["loss"] if self.tp.select_metric == "loss" else val[self.tp.select_metric]
        if np.isnan(score):
            score = val["accuracy"]
        if self.keep_if_best(epoch, score, val) and proba.shape[1] == 2:
            # the accuracy-optimal decision threshold on validation (evaluate.threshold: val)
            self.state.best_val["val_threshold"] = best_threshold(self.data.val_y.numpy(), proba, self.positive_class)

    def keep_if_best(self, epoch: int, score: float, val: dict[str, float]) -> bool:
        """Keep the selected weights (EMA if on) and ``val`` if ``score`` (higher = better) beats the best so far."""
        s = self.state
        if not score > s.best_score:
            return False
        s.best_score, s.best_epoch, s.best_val = score, epoch + 1, {f"val_{k}": v for k, v in val.items()}
        selected = self.model if self.ema is None else self.ema.module
        s.best_state = copy.deepcopy({k: v.cpu() for k, v in selected.state_dict().items()})
        return True

    # -- the whole job -----------------------------------------------------------------------------------------
    def fit(self, start_epoch: int, on_epoch: Callable[[dict[str, float]], None],
            checkpoint_extra: dict[str, Any]) -> FitState:  # fmt: skip
        """Run epochs ``start_epoch .. epochs-1``; ``on_epoch`` gets each epoch's record (for tracking)."""
        for epoch in range(start_epoch, self.tp.epochs):
            trained = self.train_epoch(epoch)
            val, proba = self.validate()
            record = {
                "epoch": epoch + 1, "train_loss": trained["train_loss"], "train_accuracy": trained["train_accuracy"],
                **{f"val_{k}": v for k, v in val.items()}, "lr": self.opt.param_groups[0]["lr"],
                "samples_per_s": trained["samples"] / max(trained["seconds"], 1e-9),
            }  # fmt: skip
            self.state.history.append(record)
            self.select(epoch, val, proba)
            on_epoch(record)
            print(f"epoch {epoch + 1}/{self.tp.epochs}: loss {record['train_loss']:.4f} {self.describe(val)} "
                  f"({record['samples_per_s']:.0f} samples/s)", flush=True)
            self.save(epoch, checkpoint_extra)
        return self.state


def fit_svm(tp: TrainParams, data: Splits, seed: int, positive_class: int):
    """Fit the SVM baseline on pooled features; returns (pipeline, val metrics incl. ``val_threshold``)."""
    from tasks.metrics import best_threshold, classification_metrics, log_loss
    from tasks.models.svm import build_svm, pool_features

    sp = tp.svm
    clf = build_svm(sp.C, sp.kernel, seed)
    clf.fit(pool_features(data.train_x.numpy(), sp.feature_size), data.train_y.numpy())
    proba = clf.predict_proba(pool_features(data.val_x.numpy(), sp.feature_size))
    y = data.val_y.numpy()
    val = classification_metrics(y, proba, positive_class)
    val["loss"] = log_loss(y, proba)
    best = {f"val_{k}": v for k, v in val.items()}
    if proba.shape[1] == 2:
        best["val_threshold"] = best_threshold(y, proba, positive_class)
    return clf, best
