"""Fitting a segmentation network: :class:`~tasks.models.fit.TorchFit` with label maps as targets.

What changes against classification: the loss (MONAI's ``DiceCELoss``: soft Dice + cross-entropy on softmax
outputs, one-hot targets), the batch (images and label maps augmented jointly, :func:`augment_batch` with
``masks``; with ``train.seg.patch_size``, then cropped to patches by :func:`crop_patches`), validation (mean
foreground Dice per class, :func:`tasks.segmetrics.dice_per_class`, on the EMA
weights, through :func:`~tasks.models.networks.predict_seg_proba`: sliding-window for 3D) and selection (``dice``,
higher is better, or ``loss``). Optimiser, schedule, EMA, checkpoints, resume and seeding are TorchFit's.

Settings are the ``train`` group plus its ``seg`` subgroup (:func:`seg_settings`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tasks.models.fit import Splits, TorchFit
from tasks.models.networks import DEFAULT_SEG_CHANNELS, SEG_ARCHS, ModelSpec
from tasks.schema import TrainParams

SEG_DEFAULTS: dict[str, Any] = {
    "channels": list(DEFAULT_SEG_CHANNELS), "loss": "dicece", "dice_weight": 1.0, "ce_weight": 1.0, "roi_size": None,
    "batch_dice": True, "patch_size": None, "pos_fraction": 0.5,
}  # fmt: skip
SEG_SELECT_METRICS = ("dice", "loss")


def seg_settings(tp: TrainParams) -> dict[str, Any]:
    """``train.seg`` as a dict: channels, loss, dice_weight, ce_weight, roi_size (missing keys: :data:`SEG_DEFAULTS`).

    Read with ``getattr`` so that a ``train`` group without a ``seg`` subgroup gets the defaults.
    """
    seg = getattr(tp, "seg", None)
    if isinstance(seg, dict):
        return {k: seg.get(k, v) for k, v in SEG_DEFAULTS.items()}
    return {k: getattr(seg, k, v) for k, v in SEG_DEFAULTS.items()}


def seg_model_spec(tp: TrainParams, meta: dict[str, Any]) -> ModelSpec:
    """The segmentation network ``tp`` asks for, shaped by preprocess's meta.json of a segmentation task.

    ``meta`` keys read: ``spatial_dims``, ``input_shape`` (C, *S), ``num_classes`` (background included),
    ``class_names``; ``in_channels`` if present (else ``input_shape[0]``). ``train.seg.channels`` and
    ``train.seg.roi_size`` go into the spec (model.json), so evaluate and export rebuild and window alike.
    """
    input_shape, seg = tuple(meta["input_shape"]), seg_settings(tp)
    return ModelSpec(
        family=tp.family, arch=tp.arch, spatial_dims=int(meta["spatial_dims"]),
        in_channels=int(meta.get("in_channels", input_shape[0])), num_classes=int(meta["num_classes"]),
        input_shape=input_shape, class_names=tuple(meta.get("class_names", ())),
        channels=tuple(seg["channels"]), task_kind="segmentation",
        roi_size=tuple(seg["roi_size"] or seg["patch_size"]) if seg["roi_size"] or seg["patch_size"] else None,
    )  # fmt: skip


def crop_patches(xb, mb, patch_size: tuple[int, ...], pos_fraction: float, gen):
    """Random patches of ``patch_size`` from a batch, image and label map cropped alike.

    One crop per sample by MONAI's ``RandCropByPosNegLabel``: centred on a foreground voxel (label > 0) with
    probability ``pos_fraction``, else on background; a sample without foreground gets a uniformly placed crop
(``RandSpatialCrop``).
    The crop's random state is seeded from ``gen``, so a run (and its resume) is reproducible.

    Args:
        xb: images (B, C, *S) float.
        mb: label maps (B, *S) integer.
        patch_size: one size per spatial axis, each <= S.
        pos_fraction: probability of a foreground-centred crop.
        gen: the job's torch.Generator.

    Returns:
        (images (B, C, *patch_size), label maps (B, *patch_size) of ``mb``'s dtype).
    """
    import torch
    from monai.transforms import RandCropByPosNegLabel, RandSpatialCrop

    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    crop = RandCropByPosNegLabel(spatial_size=tuple(patch_size), pos=pos_fraction, neg=1.0 - pos_fraction,
                                 num_samples=1)  # fmt: skip
    crop.set_random_state(seed)
    anywhere = RandSpatialCrop(roi_size=tuple(patch_size), random_size=False)  # no foreground to centre on
    anywhere.set_random_state(seed)
    xs, ms = [], []
    for x, m in zip(xb, mb, strict=True):
        label = m.unsqueeze(0)
        both = torch.cat([x, label.to(x.dtype)])  # one crop for image and mask: (C + 1, *S)
        out = crop(both, label=label)[0] if bool(label.any()) else anywhere(both)
        out = out.as_tensor() if hasattr(out, "as_tensor") else out  # a plain tensor, not MONAI's MetaTensor
        xs.append(out[:-1])
        ms.append(out[-1].round().to(m.dtype))
    return torch.stack(xs), torch.stack(ms)


class SegFit(TorchFit):
    """One segmentation training job; the constructor is :class:`TorchFit`'s (``positive_class`` is unused).

    ``data`` must carry ``train_m`` / ``val_m``: int64 label maps (N, *S) aligned with ``train_x`` / ``val_x``.
    Validation records: ``dice`` (mean over foreground classes of the mean over cases), ``dice_<class>`` per
    foreground class, ``loss`` (Dice + CE of the validation probabilities).
    """

    def __init__(self, tp: TrainParams, spec: ModelSpec, data: Splits, seed: int, positive_class: int, device,
                 checkpoint_dir, fingerprint: str) -> None:  # fmt: skip
        if not spec.is_segmentation:
            raise ValueError(f"train.arch: {spec.arch} is not a segmentation network (one of {', '.join(SEG_ARCHS)})")
        for name in ("train", "val"):
            x, m = getattr(data, f"{name}_x"), getattr(data, f"{name}_m")
            if m is None:
                raise ValueError(f"segmentation training needs {name} label maps ({name}_m.npy), none were loaded")
            if tuple(m.shape) != (x.shape[0], *x.shape[2:]):
                raise ValueError(f"{name}_m.npy: label maps {tuple(m.shape)} do not match images {tuple(x.shape)}")
        if tp.select_metric not in SEG_SELECT_METRICS:
            raise ValueError(f"train.select_metric: {tp.select_metric!r} is a classification metric; a segmentation "
                             f"task selects on one of {SEG_SELECT_METRICS}")
        self.seg = seg_settings(tp)
        if self.seg["loss"] != "dicece":
            raise ValueError(f"train.seg.loss: {self.seg['loss']!r} is not supported (dicece)")
        super().__init__(tp, spec, data, seed, positive_class, device, checkpoint_dir, fingerprint)

    def make_loss(self):
        """MONAI's Dice + cross-entropy on (B, K, *S) logits and (B, 1, *S) label maps."""
        from monai.losses import DiceCELoss

        return DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=float(self.seg["dice_weight"]),
                          lambda_ce=float(self.seg["ce_weight"]), label_smoothing=self.tp.label_smoothing,
                          batch=bool(self.seg["batch_dice"]))

    def batch(self, idx):
        """Images (B, C, *S) and label maps (B, 1, *S) int64 of ``idx``, augmented jointly, on the device."""
        from tasks.models.augment import augment_batch

        xb, mb = self.data.train_x[idx], self.data.train_m[idx]
        if self.tp.augment:
            xb, mb = augment_batch(xb, self.gen, self.tp.augmentation, masks=mb)
        if self.seg["patch_size"]:  # after the augmentation: a rotated volume's empty corners stay out of the patch
            xb, mb = crop_patches(xb, mb, tuple(self.seg["patch_size"]), float(self.seg["pos_fraction"]), self.gen)
        return xb.to(self.device), mb.long().unsqueeze(1).to(self.device)

    def correct(self, logits, target) -> float:
        """Voxel accuracy times batch size: ``train_accuracy`` of a segmentation job is the voxel accuracy.

        A voxel is right when its true class's logit is the largest (a tie counts as right): ``gather`` + ``amax``,
        not ``argmax(1)``, which took 86 ms per 8x2x256x256 batch on CPU (14% of a training step) against 1.5 ms.
        """
        import torch

        with torch.no_grad():
            right = logits.gather(1, target) >= logits.amax(1, keepdim=True)
        return float(right.float().mean()) * len(target)

    def class_names(self) -> list[str]:
        names = list(self.spec.class_names)
        return names if len(names) == self.spec.num_classes else [f"class{v}" for v in range(self.spec.num_classes)]

    def validate(self) -> tuple[dict[str, float], np.ndarray]:
        """Dice per foreground class and loss of the selected weights (EMA if on) on the validation split.

        Returns:
            (metrics, predicted label maps uint8 (N, *S)).
        """
        import torch

        from tasks.models.networks import predict_seg_proba
        from tasks.segmetrics import dice_per_class

        selected = self.model if self.ema is None else self.ema.module
        selected.eval()
        roi = self.seg["roi_size"]  # None: the spec's (the same when the spec came from seg_model_spec)
        proba = predict_seg_proba(selected, self.spec, self.data.val_x, batch_size=max(self.tp.batch_size, 8),
                                  roi_size=tuple(roi) if roi else None)  # fmt: skip
        true = self.data.val_m.numpy()
        pred = proba.argmax(1).astype(np.uint8)
        per_case = dice_per_class(pred, true, self.spec.num_classes)  # (N, K - 1)
        names = self.class_names()[1:]
        per_class = per_case.mean(axis=0) if len(per_case) else np.full(len(names), np.nan)
        val = {"dice": float(np.mean(per_class))}
        val.update({f"dice_{c}": float(v) for c, v in zip(names, per_class, strict=True)})
        # the training loss on the probabilities: softmax(log p) = p, so DiceCE(log p) is DiceCE of the logits
        loss_sum, bs = 0.0, 16
        with torch.inference_mode():
            for i in range(0, len(proba), bs):
                logp = torch.from_numpy(proba[i : i + bs]).clamp_min(1e-7).log()
                target = torch.as_tensor(true[i : i + bs]).long().unsqueeze(1)
                loss_sum += float(self.loss_fn(logp, target)) * len(logp)
        val["loss"] = loss_sum / max(len(proba), 1)
        return val, pred

    def describe(self, val: dict[str, float]) -> str:
        return f"val_dice {val['dice']:.4f} val_loss {val['loss']:.4f}"

    def select(self, epoch: int, val: dict[str, float], pred: np.ndarray) -> None:
        """Keep this epoch's weights if its validation Dice (or loss, ``select_metric: loss``) is the best so far."""
        self.keep_if_best(epoch, -val["loss"] if self.tp.select_metric == "loss" else val["dice"], val)
