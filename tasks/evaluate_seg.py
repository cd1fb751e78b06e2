"""Evaluate a segmentation task once on its test split (called by :mod:`tasks.evaluate` for a segmentation task).

Writes to ``<output>/``:

``metrics.json``  the headline, for ``dvc metrics`` / ``dvc exp show``: mean foreground Dice, IoU, HD95 (mm where the
                  spacing is known, else pixels/voxels of the model's grid), surface Dice, Dice on the original grids,
                  lesion detection AP at IoU 0.5 and 0.3, lesion sensitivity at 1 false positive per image, ``n_test``
``details.json``  Dice, IoU, HD95 and surface Dice per class at the model's resolution and on each image's original
                  grid (``*_original``), each with its patient-level bootstrap confidence interval; detection (AP
                  per IoU, FROC points); conventions
``outputs/``      ``per_case.csv`` (``dvc plots``: Dice per case), ``predictions.npz`` (each predicted label map on
                  its image's original grid, by image_id), ``overlays/`` PNGs of the best, median and worst cases,
                  ``dice_per_case.png``, and for DICOM inputs ``dicom_seg/<image_id>.dcm``: each prediction as DICOM
                  SEG referencing its source instances (pseudonymised UIDs)

Conventions (also in details.json): those of :mod:`tasks.segmetrics` (a class absent from truth and prediction: Dice
1; HD95 undefined when exactly one side is empty, left out of its mean and counted). Confidence intervals resample
patients (images of one patient stay together).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from tasks import tracking
from tasks.evaluate_files import DETAILS_FILE, METRICS_FILE, EvaluateResult, prepare_output
from tasks.metrics import bootstrap_mean_ci
from tasks.schema import EvaluateParams

# metrics.json (and the printed summary): the model-resolution figures, Dice on the original grids, detection
HEADLINE = ("dice", "iou", "hd95", "surface_dice", "dice_original", "ap50", "ap30", "sens_at_1fp")
ORIGINAL_METRICS = ("dice", "iou", "hd95", "surface_dice")  # also computed on each image's own grid (details.json)


def _spacing_at_model(spacing: list[float] | None, orig_shape: list[int], size: list[int]) -> list[float] | None:
    """Voxel size (mm) after preprocess's resize (longest side to ``max(size)``, same factor on every axis)."""
    if spacing is None or len(spacing) != len(orig_shape):
        return None
    factor = max(orig_shape) / max(size)
    return [float(s) * factor for s in spacing]


def _read_ids(path: Path) -> list[dict[str, Any]]:
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r["orig_shape"] = json.loads(r["orig_shape"])
        spacing = json.loads(r.get("spacing") or "null")
        r["spacing"] = spacing[-len(r["orig_shape"]):] if spacing else None
    return rows


def overlay_png(path: Path, image: np.ndarray, truth: np.ndarray, pred: np.ndarray, title: str) -> Path:
    """One case: the image (the middle slice of a volume) with the truth's outline (green) and the prediction's
    (red), per foreground class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if image.ndim == 3:  # (D, H, W): the slice with the most truth, else the middle one
        k = int(np.argmax((truth > 0).sum((1, 2)))) if truth.any() else image.shape[0] // 2
        image, truth, pred = image[k], truth[k], pred[k]
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(image, cmap="gray", vmin=0, vmax=1)
    for label in sorted(set(np.unique(truth)) | set(np.unique(pred)) - {0}):
        if (truth == label).any():
            ax.contour(truth == label, levels=[0.5], colors="lime", linewidths=1)
        if (pred == label).any():
            ax.contour(pred == label, levels=[0.5], colors="red", linewidths=1)
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _dice_plot(path: Path, per_case: list[dict[str, Any]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dice = sorted(c["dice"] for c in per_case if not np.isnan(c["dice"]))
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(range(len(dice)), dice, width=1.0, color="tab:blue")
    ax.set(xlabel="test case (sorted)", ylabel="mean foreground Dice", ylim=(0, 1), title="Dice per test case")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(ep: EvaluateParams, model_dir: Path, data_dir: Path, output: Path) -> EvaluateResult:
    """Evaluate the segmenter in ``model_dir`` on ``data_dir``'s test split; write metrics, details, outputs; log
    them to the training run.

    Args:
        ep: the ``evaluate`` group (``ep.seg``: HD percentile, surface tolerance, detection settings; bootstrap).
        model_dir: train's output. data_dir: preprocess's output of a segmentation task. output: reports folder.
    """
    from tasks import segmetrics
    from tasks.models.networks import load_trained, predict_seg_proba, weights_hash
    from tasks.spatial import ORIGINAL_MASKS, TEST_GEOMETRY, map_back

    sp = ep.seg
    meta = json.loads((data_dir / "meta.json").read_text())
    names = list(meta["class_names"])
    size = list(meta["spatial_size"])
    spec, model = load_trained(model_dir)
    x = np.load(data_dir / "test_x.npy")
    truth = np.load(data_dir / "test_m.npy")
    ids = _read_ids(data_dir / "test_ids.csv")
    if len(ids) == 0:
        raise ValueError(f"{data_dir / 'test_m.npy'}: the test split is empty")
    roi = spec.roi_size if getattr(spec, "roi_size", None) else None
    proba = predict_seg_proba(model, spec, x, batch_size=8, roi_size=roi)  # (N, K, *S)
    pred = proba.argmax(1).astype(np.uint8)

    # at the model's resolution
    hd = f"hd{sp.hd_percentile:g}"
    spacings = [_spacing_at_model(r["spacing"], r["orig_shape"], size) for r in ids]
    per_case, _ = segmetrics.segmentation_metrics(
        pred, truth, names, spacings if all(s is not None for s in spacings) else None, sp.hd_percentile,
        sp.surface_tolerance_mm,
    )
    # on each image's own grid (nearest-neighbour inverse of preprocess's resize and pad/crop)
    originals = np.load(data_dir / ORIGINAL_MASKS)
    pred_orig = {}
    for i, r in enumerate(ids):
        back = map_back(pred[i], r["orig_shape"], size if meta.get("resized", True) else None)
        pred_orig[r["image_id"]] = back
        (orig,), _ = segmetrics.segmentation_metrics(
            back[None], originals[r["image_id"]][None], names, [r["spacing"]] if r["spacing"] else None,
            sp.hd_percentile, sp.surface_tolerance_mm,
        )
        case = per_case[i]
        case["case"], case["patient_id"] = r["image_id"], r["patient_id"]
        for metric in ORIGINAL_METRICS:
            case[f"{metric}_original"] = orig[hd if metric == "hd95" else metric]
            for n in names[1:]:
                case[f"{metric}_original_{n}"] = orig[f"{hd if metric == 'hd95' else metric}_{n}"]

    # detection: connected components of the detect class's probability map
    detection: dict[str, Any] = {}
    if sp.detect_class is not None:
        if sp.detect_class not in names:
            raise ValueError(f"evaluate.seg.detect_class: {sp.detect_class!r} is not one of the classes {names[1:]}")
        c = names.index(sp.detect_class)
        instances = [segmetrics.lesion_instances(proba[i, c], sp.min_lesion_voxels, sp.score) for i in range(len(ids))]
        detection = segmetrics.detection_metrics(instances, [truth[i] == c for i in range(len(ids))],
                                                 sp.iou_thresholds, sp.fp_rates)  # fmt: skip

    groups = [r["patient_id"] for r in ids]
    figures: dict[str, dict[str, float]] = {}
    per_metric = ("dice", "iou", hd, "surface_dice", *[f"{m}_original" for m in ORIGINAL_METRICS])
    keys = [*per_metric, *[f"{m}_{n}" for m in per_metric for n in names[1:]]]
    for k in keys:
        vals = np.array([case[k] for case in per_case], float)
        lo, hi = bootstrap_mean_ci(vals, groups, ep.bootstrap, ep.ci, ep.bootstrap_seed)
        figures[f"test_{k}"] = {"value": float(np.nanmean(vals)) if np.any(~np.isnan(vals)) else float("nan"),
                                "ci_low": lo, "ci_high": hi, "n_defined": int((~np.isnan(vals)).sum())}  # fmt: skip
    headline: dict[str, Any] = {f"test_{k}": round(figures[f"test_{k}"]["value"], 6)
                                for k in ("dice", "iou", hd, "surface_dice", "dice_original")}  # fmt: skip
    for key in (*[f"ap{round(t * 100)}" for t in sp.iou_thresholds], "sens_at_1fp"):
        if key in detection:
            headline[f"test_{key}"] = round(float(detection[key]), 6)
    headline["n_test"] = len(ids)
    details = {
        "task_kind": "segmentation",
        "class_names": names,
        "ci": {"level": ep.ci, "resamples": ep.bootstrap, "seed": ep.bootstrap_seed, "by": "patient"},
        "metrics": figures,
        "detection": {"class": sp.detect_class, "min_lesion_voxels": sp.min_lesion_voxels, "score": sp.score,
                      **detection},
        "units": {hd: "mm" if all(s is not None for s in spacings) else "voxels (spacing unknown)"},
        "conventions": segmetrics.__doc__.split("Conventions for a class")[1].split("Detection (")[0].strip(),
    }  # fmt: skip

    files = prepare_output(output)
    (output / METRICS_FILE).write_text(json.dumps(headline, indent=2) + "\n")
    (output / DETAILS_FILE).write_text(json.dumps(details, indent=2, default=float) + "\n")
    columns = ["case", "patient_id", *keys]
    with (files / "per_case.csv").open("w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(columns)
        for case in per_case:
            w.writerow([case[k] if isinstance(case[k], str) else f"{case[k]:.6f}" for k in columns])
    # each test prediction on its image's own grid (uint8 label maps, key: image_id)
    np.savez_compressed(files / "predictions.npz", **pred_orig)
    pngs = [_dice_plot(files / "dice_per_case.png", per_case)]
    if sp.overlays:
        (files / "overlays").mkdir()
        order = sorted(range(len(per_case)), key=lambda i: np.nan_to_num(per_case[i]["dice"], nan=-1.0))
        picks = {"worst": order[0], "median": order[len(order) // 2], "best": order[-1]}
        for label, i in list(picks.items())[: sp.overlays]:
            title = f"{label}: {per_case[i]['case']} Dice {per_case[i]['dice']:.3f} (green truth, red prediction)"
            pngs.append(overlay_png(files / "overlays" / f"{label}.png", x[i, 0].astype(np.float32), truth[i],
                                    pred[i], title))  # fmt: skip
    seg_files = []
    model_hash = weights_hash(model_dir)
    geometry_path = data_dir / TEST_GEOMETRY
    geometry = json.loads(geometry_path.read_text()) if geometry_path.exists() else {}
    if sp.write_dicom_seg and any(g.get("kind") == "dicom" for g in geometry.values()):
        from tasks.dicom.seg import write_prediction_seg

        (files / "dicom_seg").mkdir()
        for r in ids:
            g = geometry.get(r["image_id"])
            if g and g.get("kind") == "dicom":
                path = files / "dicom_seg" / f"{r['image_id']}.dcm"
                write_prediction_seg(g, pred_orig[r["image_id"]], names[1:], path,
                                     algorithm_name=f"medpipe {spec.arch}", algorithm_version=model_hash[:16])
                seg_files.append(path)

    flat = {k: v["value"] for k, v in figures.items()}
    flat.update({f"test_{k}": float(v) for k, v in detection.items() if k.startswith(("ap", "sens_at", "froc"))})
    flat.update({f"{k}_ci_low": v["ci_low"] for k, v in figures.items() if k in headline})
    flat.update({f"{k}_ci_high": v["ci_high"] for k, v in figures.items() if k in headline})
    flat["n_test"] = len(ids)
    run_id = tracking.run_for_model(model_hash, model_dir)
    tracking.log_metrics(run_id, {k: v for k, v in flat.items() if not np.isnan(v)})
    tracking.log_artifacts(run_id, [output / METRICS_FILE, output / DETAILS_FILE, files / "per_case.csv", *pngs],
                           "evaluate")  # fmt: skip
    return EvaluateResult(metrics=flat, n_test=len(ids))


def summary_lines(m: dict[str, float], n_test: int, ci: float) -> list[str]:
    """The printed summary: each headline figure with its CI where it has one."""
    lines = [f"test metrics (n={n_test}, {ci:.0%} CI by patient bootstrap):"]
    for k in HEADLINE:
        name = f"test_{k}"
        if name not in m:
            continue
        lo, hi = m.get(f"{name}_ci_low"), m.get(f"{name}_ci_high")
        ci_text = f"  [{lo:.4f}, {hi:.4f}]" if lo is not None and hi is not None else ""
        lines.append(f"  {k:<14} {m[name]:.4f}{ci_text}")
    return lines
