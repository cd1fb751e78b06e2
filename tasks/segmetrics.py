"""Segmentation and lesion-detection metrics: MONAI's metrics, MONAI's COCO and FROC code, no MLflow.

Segmentation (:func:`segmentation_metrics`): per case and foreground class, Dice, IoU, the ``hd_percentile``
Hausdorff distance (HD95) and the surface Dice at ``surface_tolerance_mm``, from MONAI's ``DiceMetric``,
``MeanIoU``, ``HausdorffDistanceMetric`` and ``SurfaceDiceMetric``. Distances are in mm when ``spacing`` is given,
in voxels otherwise. Conventions for a class that is empty in the truth and/or the prediction of a case:

======================  =====  =====  ======  ============
truth / prediction      Dice   IoU    HD95    surface Dice
======================  =====  =====  ======  ============
empty / empty           1      1      0       1
empty / not empty       0      0      NaN     0
not empty / empty       0      0      NaN     0
======================  =====  =====  ======  ============

Every case counts in the Dice, IoU and surface-Dice means (a false positive on a case without the structure is
penalised, a correct "nothing here" is rewarded: the BraTS convention). HD95 is undefined when exactly one side is
empty: it is NaN in the per-case table, left out of the HD95 mean and counted (``hd95_undefined_<class>``).

Detection (:func:`lesion_instances`, :func:`detection_metrics`): lesion instances are the connected components
(full connectivity: 8 in 2D, 26 in 3D) of a thresholded probability map, at least ``min_voxels`` large, scored by
the max or mean probability inside. Truth instances are the connected components of the truth mask. AP at each
IoU threshold is MONAI's :class:`~monai.apps.detection.metrics.coco.COCOMetric` (the nnDetection COCO
implementation: 101-point interpolated AP, greedy matching by score on **box** IoU, 2D and 3D alike; torchmetrics'
``MeanAveragePrecision`` is 2D-only and is not installed). FROC: a lesion is hit when the centre (centroid) of a
detection falls inside it (the CAMELYON16 / LUNA16 rule, MONAI's :func:`~monai.metrics.compute_fp_tp_probs_nd`):
its score is the highest hitting detection's, further hits on it are neither true nor false positives, a detection
inside no lesion is a false positive. Sensitivity at each ``fp_rates`` value (false positives per image) is read off
the FROC curve (:func:`~monai.metrics.compute_froc_curve_data`, :func:`~monai.metrics.compute_froc_score`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


def _one_hot(labels: np.ndarray, num_classes: int):
    """int label maps (N, *S) -> float32 torch one-hot (N, K, *S) (MONAI's ``one_hot``)."""
    import torch
    from monai.networks.utils import one_hot

    t = torch.as_tensor(np.asarray(labels)).long().unsqueeze(1)
    return one_hot(t, num_classes, dim=1, dtype=torch.float32)


def _check_labels(pred: np.ndarray, true: np.ndarray, num_classes: int) -> None:
    if pred.shape != true.shape:
        raise ValueError(f"segmentation metrics: prediction {pred.shape} and truth {true.shape} differ in shape")
    for name, a in (("prediction", pred), ("truth", true)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"segmentation metrics: {name} has label values outside 0..{num_classes - 1} "
                             f"(found {int(a.min())}..{int(a.max())})")


def dice_per_class(pred_labels: np.ndarray, true_labels: np.ndarray, num_classes: int,
                   chunk: int = 32) -> np.ndarray:
    """Dice per case and foreground class (MONAI ``DiceMetric``; empty/empty = 1, see the module's table).

    Args:
        pred_labels, true_labels: int arrays (N, *S) of label values 0..num_classes-1 (0 = background).
        num_classes: K, background included.
        chunk: cases one-hot encoded at a time (memory: chunk * K * voxels float32).

    Returns:
        float64 array (N, K - 1).
    """
    from monai.metrics import DiceMetric

    pred, true = np.asarray(pred_labels), np.asarray(true_labels)
    _check_labels(pred, true, num_classes)
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
    out = [metric(_one_hot(pred[i : i + chunk], num_classes), _one_hot(true[i : i + chunk], num_classes)).numpy()
           for i in range(0, len(pred), chunk)]  # fmt: skip
    return np.concatenate(out).astype(np.float64) if out else np.zeros((0, num_classes - 1))


def _spacing_chunk(spacing, start: int, stop: int, spatial_dims: int):
    """MONAI's ``spacing`` argument for cases start..stop: None, one spacing for all, or one per case."""
    if spacing is None:
        return None
    arr = np.asarray(spacing, dtype=float)
    if arr.ndim == 1:
        if len(arr) != spatial_dims:
            raise ValueError(f"segmentation metrics: spacing {list(arr)} needs {spatial_dims} values (mm per axis)")
        return arr.tolist()
    if arr.ndim != 2 or arr.shape[1] != spatial_dims:
        raise ValueError(f"segmentation metrics: per-case spacing must be (N, {spatial_dims}), got {arr.shape}")
    return [row.tolist() for row in arr[start:stop]]


def segmentation_metrics(
    pred_labels: np.ndarray, true_labels: np.ndarray, class_names: Sequence[str],
    spacing: Sequence[float] | Sequence[Sequence[float]] | None = None, hd_percentile: float = 95,
    surface_tolerance_mm: float = 2.0, chunk: int = 16,
) -> tuple[list[dict[str, float]], dict[str, float]]:  # fmt: skip
    """Per-case Dice, IoU, HD95 and surface Dice per foreground class, and their means.

    Args:
        pred_labels, true_labels: int arrays (N, *S) (2D or 3D label maps, 0 = background).
        class_names: all K class names, background first (``["background", "lung", "lesion"]``).
        spacing: voxel size in mm per spatial axis, one for all cases (d,) or one per case (N, d); ``None``:
            distances in voxels (the tolerance then in voxels too).
        hd_percentile: percentile of the symmetric surface distances (95: HD95).
        surface_tolerance_mm: surface Dice tolerance, the same for every class.
        chunk: cases per MONAI call (memory).

    Returns:
        ``(cases, means)``. ``cases[i]``: ``{"case": i, "dice_<c>", "iou_<c>", "hd95_<c>", "surface_dice_<c>"}`` for
        each foreground class c, plus ``dice``, ``iou``, ``hd95``, ``surface_dice``: the mean over classes (HD95 over
        defined ones; NaN if none). ``means``: the mean over cases of each of those keys (HD95 over defined cases),
        plus ``hd95_undefined_<c>`` (cases where exactly one side is empty), ``n_cases``. "hd95" is ``hd<p>`` for
        another percentile p.
    """
    import warnings

    import torch
    from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU, SurfaceDiceMetric

    pred, true = np.asarray(pred_labels), np.asarray(true_labels)
    names = list(class_names)
    k = len(names)
    _check_labels(pred, true, k)
    fg = names[1:]
    hd = f"hd{hd_percentile:g}"
    metrics = {
        "dice": DiceMetric(include_background=False, reduction="none", ignore_empty=False),
        "iou": MeanIoU(include_background=False, reduction="none", ignore_empty=False),
        hd: HausdorffDistanceMetric(include_background=False, percentile=hd_percentile, reduction="none"),
        "surface_dice": SurfaceDiceMetric([surface_tolerance_mm] * len(fg), include_background=False,
                                          reduction="none"),
    }
    values = {m: [] for m in metrics}
    empty_p, empty_t = [], []
    for i in range(0, len(pred), chunk):
        p, t = _one_hot(pred[i : i + chunk], k), _one_hot(true[i : i + chunk], k)
        sp = _spacing_chunk(spacing, i, i + len(p), pred.ndim - 1)
        reduce_axes = tuple(range(2, p.ndim))
        empty_p.append((p[:, 1:].sum(reduce_axes) == 0).numpy())
        empty_t.append((t[:, 1:].sum(reduce_axes) == 0).numpy())
        with warnings.catch_warnings():  # MONAI warns for every empty class; the table above says what happens
            warnings.simplefilter("ignore", UserWarning)
            # MONAI 1.5-1.6 call their own deprecated get_mask_edges(always_return_as_numpy=...) internally
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
            for m, metric in metrics.items():
                kw = {"spacing": sp} if m in (hd, "surface_dice") and sp is not None else {}
                values[m].append(torch.as_tensor(metric(p, t, **kw)).double().numpy())
    n = len(pred)
    arr = {m: np.concatenate(v) if v else np.zeros((0, len(fg))) for m, v in values.items()}
    ep = np.concatenate(empty_p) if empty_p else np.zeros((0, len(fg)), bool)
    et = np.concatenate(empty_t) if empty_t else np.zeros((0, len(fg)), bool)
    both, one = ep & et, ep ^ et
    # the conventions of the module's table, set explicitly rather than left to MONAI's NaNs for empty classes
    arr["dice"][both], arr["iou"][both], arr[hd][both], arr["surface_dice"][both] = 1.0, 1.0, 0.0, 1.0
    arr["dice"][one], arr["iou"][one], arr[hd][one], arr["surface_dice"][one] = 0.0, 0.0, np.nan, 0.0
    cases: list[dict[str, float]] = []
    with warnings.catch_warnings():  # nanmean of an all-NaN row: NaN, as documented
        warnings.simplefilter("ignore", RuntimeWarning)
        for i in range(n):
            row: dict[str, float] = {"case": i}
            for m, a in arr.items():
                row.update({f"{m}_{c}": float(a[i, j]) for j, c in enumerate(fg)})
                row[m] = float(np.nanmean(a[i])) if m == hd else float(np.mean(a[i]))
            cases.append(row)
        means: dict[str, float] = {"n_cases": n}
        for key in cases[0] if cases else []:
            if key != "case":
                col = np.array([r[key] for r in cases], dtype=float)
                means[key] = float(np.nanmean(col)) if key.startswith(hd) else float(np.mean(col))
    for j, c in enumerate(fg):
        means[f"{hd}_undefined_{c}"] = int(one[:, j].sum())
    return cases, means


# -- detection ---------------------------------------------------------------------------------------------------
class LesionInstance(NamedTuple):
    """One detected (or true) lesion.

    Attributes:
        box: int64 (2 * d,): start per axis then stop per axis (exclusive), in array axis order: MONAI's
            ``StandardMode`` box (xyxy / xyzxyz with x = the first array axis).
        score: max or mean probability inside (1.0 for a truth instance).
        mask: bool (*S): the instance's voxels, full image size.
    """

    box: np.ndarray
    score: float
    mask: np.ndarray


def _components(binary: np.ndarray) -> tuple[np.ndarray, list[tuple[slice, ...]]]:
    """Connected components with full connectivity (scipy.ndimage): labels (*S) int32 and each one's bounding box."""
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(binary.ndim, binary.ndim)
    labels, _ = ndimage.label(binary, structure=structure)
    return labels, ndimage.find_objects(labels)


def _box(slices: tuple[slice, ...]) -> np.ndarray:
    return np.array([s.start for s in slices] + [s.stop for s in slices], dtype=np.int64)


def lesion_instances(prob_map: np.ndarray, min_voxels: int = 10, score: str = "max", threshold: float = 0.5,
                     channel: int | None = None) -> list[LesionInstance]:
    """Lesion instances of a probability map: connected components of ``prob >= threshold``.

    Args:
        prob_map: float (*S) probabilities of the one class, or (K, *S) with ``channel`` naming the class.
        min_voxels: smaller components are dropped (``evaluate.seg.min_lesion_voxels``).
        score: ``max`` or ``mean`` probability inside the component (``evaluate.seg.score``).
        threshold: probability at which a voxel is lesion.
        channel: the class index when ``prob_map`` has a class axis; ``None``: it has none.

    Returns:
        Instances sorted by score, highest first.
    """
    if score not in ("max", "mean"):
        raise ValueError(f"evaluate.seg.score: {score!r} is not one of max, mean")
    p = np.asarray(prob_map, dtype=np.float32)
    if channel is not None:
        p = p[channel]
    labels, objects = _components(p >= threshold)
    found = []
    for i, sl in enumerate(objects, start=1):
        if sl is None:
            continue
        mask = labels == i
        inside = p[mask]
        if inside.size < min_voxels:
            continue
        found.append(LesionInstance(_box(sl), float(inside.max() if score == "max" else inside.mean()), mask))
    return sorted(found, key=lambda inst: -inst.score)


def true_instances(mask: np.ndarray) -> list[LesionInstance]:
    """The lesions of a truth mask (*S) (nonzero = lesion): its connected components, score 1."""
    labels, objects = _components(np.asarray(mask) > 0)
    return [LesionInstance(_box(sl), 1.0, labels == i) for i, sl in enumerate(objects, start=1) if sl is not None]


def detection_metrics(
    pred_instances_per_image: Sequence[Sequence[LesionInstance]], true_masks_per_image: Sequence[np.ndarray],
    iou_thresholds: Sequence[float] = (0.5, 0.3), fp_rates: Sequence[float] = (0.5, 1, 2), max_detections: int = 100,
) -> dict[str, float]:  # fmt: skip
    """AP at box-IoU thresholds (MONAI's COCOMetric) and FROC sensitivities (MONAI's FROC code) over images.

    Args:
        pred_instances_per_image: per image, the instances of :func:`lesion_instances`.
        true_masks_per_image: per image, the truth mask (*S) of the lesion class (nonzero = lesion).
        iou_thresholds: box IoU at which a detection matches a lesion, one AP each.
        fp_rates: false positives per image at which the FROC sensitivity is read.
        max_detections: highest-scoring detections per image that count for AP.

    Returns:
        ``ap<100 t>`` per IoU threshold t (``ap50``, ``ap30``; NaN without any true lesion), ``sens_at_<r>fp`` per
        rate r (``sens_at_0.5fp``, ``sens_at_1fp``, ``sens_at_2fp``; NaN without any true lesion), ``froc`` (their
        mean), ``n_images``, ``n_lesions``, ``n_detections``.
    """
    from monai.apps.detection.metrics.coco import COCOMetric
    from monai.apps.detection.metrics.matching import matching_batch
    from monai.data.box_utils import box_iou
    from monai.metrics import compute_fp_tp_probs_nd, compute_froc_curve_data, compute_froc_score

    if len(pred_instances_per_image) != len(true_masks_per_image):
        raise ValueError(f"detection metrics: {len(pred_instances_per_image)} predictions for "
                         f"{len(true_masks_per_image)} truth masks")
    truths = [true_instances(m) for m in true_masks_per_image]
    n_images, n_lesions = len(truths), sum(len(t) for t in truths)
    n_det = sum(len(p) for p in pred_instances_per_image)
    out: dict[str, float] = {"n_images": n_images, "n_lesions": n_lesions, "n_detections": n_det}
    ious = sorted({float(t) for t in iou_thresholds})
    if n_lesions == 0:
        out.update({f"ap{round(t * 100)}": float("nan") for t in ious})
        out.update({f"sens_at_{r:g}fp": float("nan") for r in fp_rates})
        out["froc"] = float("nan")
        return out
    dims = np.asarray(true_masks_per_image[0]).ndim

    def boxes(instances: Sequence[LesionInstance]) -> np.ndarray:
        return np.stack([i.box for i in instances]).astype(np.float32) if instances else np.zeros((0, 2 * dims),
                                                                                                   np.float32)

    # AP: COCOMetric needs an IoU range as well as the list; the range spans exactly the listed thresholds
    lo, hi = ious[0], ious[-1]
    coco = COCOMetric(classes=["lesion"], iou_list=ious, iou_range=(lo, hi, (hi - lo) or 1.0),
                      max_detection=(max_detections,), per_class=False, verbose=False)
    matched = matching_batch(
        iou_fn=box_iou, iou_thresholds=coco.iou_thresholds,
        pred_boxes=[boxes(p) for p in pred_instances_per_image],
        pred_classes=[np.zeros(len(p), np.int64) for p in pred_instances_per_image],
        pred_scores=[np.array([i.score for i in p], np.float32) for p in pred_instances_per_image],
        gt_boxes=[boxes(t) for t in truths], gt_classes=[np.zeros(len(t), np.int64) for t in truths],
        max_detections=max_detections,
    )  # fmt: skip
    scores, _ = coco(matched)
    for t in ious:
        out[f"ap{round(t * 100)}"] = float(scores[f"AP_IoU_{t:.2f}_MaxDet_{max_detections}"])
    # FROC: hit = a detection's centroid inside a lesion (MONAI's CAMELYON16 code), per image
    fp_all, tp_all = [np.zeros(1, np.float32)], []  # a 0.0 sentinel: compute_froc_curve_data skips its lowest score
    for preds, truth in zip(pred_instances_per_image, truths, strict=True):
        lesion_map = np.zeros(np.asarray(true_masks_per_image[0]).shape, np.int64)
        for j, inst in enumerate(truth, start=1):
            lesion_map[inst.mask] = j
        if len(preds):
            coords = np.stack([np.rint(np.argwhere(i.mask).mean(axis=0)).astype(np.int64) for i in preds])
            probs = np.array([i.score for i in preds], np.float32)
            fp, tp, _ = compute_fp_tp_probs_nd(probs, coords, lesion_map)
        else:
            fp, tp = np.zeros(0, np.float32), np.zeros(len(truth), np.float32)
        fp_all.append(np.asarray(fp, np.float32))
        tp_all.append(np.asarray(tp, np.float32)[: len(truth)])  # one entry per lesion, 0 = missed
    fps, sens = compute_froc_curve_data(np.concatenate(fp_all), np.concatenate(tp_all), n_lesions, n_images)
    points = [float(compute_froc_score(fps, sens, (r,))) for r in fp_rates]
    out.update({f"sens_at_{r:g}fp": v for r, v in zip(fp_rates, points, strict=True)})
    out["froc"] = float(np.mean(points))
    return out
