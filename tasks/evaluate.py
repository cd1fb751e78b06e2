"""Stage 4: evaluate the selected model once on the test split.

Writes to ``<output>/``:

``metrics.json``     the headline, for ``dvc metrics`` / ``dvc exp show``: test accuracy, precision, recall, F1 and
                     ROC-AUC, ``n_test`` and the decision ``threshold`` (one short row per experiment)
``details.json``     each metric with its patient-level bootstrap confidence interval (level, resamples, seed), the
                     positive class, the threshold and where it came from, the class names and the confusion matrix
``outputs/``         ``predictions.csv`` per image (``dvc plots`` confusion matrix); ``roc.csv`` and ``pr.csv``
                     (``dvc plots`` curves); ``roc.png`` ``pr.png`` ``confusion.png``

A segmentation task (preprocess meta ``task_kind: segmentation``) is evaluated by :mod:`tasks.evaluate_seg`: per-class
Dice, IoU, HD95 and surface Dice at the model's resolution and on each image's original grid, lesion detection, the
per-case table, overlays and (DICOM inputs) the predictions as DICOM SEG.

All are also logged to the model's MLflow run, with the metrics (``test_*``, ``test_*_ci_low``/``_high``) as single
values; the validation metrics of the selected checkpoint are train's (``selected_val_*``), not logged again here.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from tasks import tracking
from tasks.evaluate_files import DETAILS_FILE, METRICS_FILE, EvaluateResult, prepare_output
from tasks.metrics import METRIC_NAMES, bootstrap_ci, classification_metrics, predict_labels
from tasks.schema import EvaluateParams


def curves(y: np.ndarray, proba: np.ndarray, positive_class: int) -> tuple[list[dict], list[dict]]:
    """ROC and PR curve points of the positive class (one-vs-rest for multi-class)."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    yb = (y == positive_class).astype(int)
    if yb.min() == yb.max():
        return [], []
    fpr, tpr, thr = roc_curve(yb, proba[:, positive_class])
    prec, rec, _ = precision_recall_curve(yb, proba[:, positive_class])
    roc = [
        {"fpr": float(a), "tpr": float(b), "threshold": float(min(c, 1.0))}
        for a, b, c in zip(fpr, tpr, thr, strict=True)
    ]
    pr = [{"recall": float(a), "precision": float(b)} for a, b in zip(rec, prec, strict=True)]
    return roc, pr


def plot_all(
    output: Path, roc: list[dict], pr: list[dict], cm: np.ndarray, class_names: list[str], m: dict
) -> list[Path]:
    """ROC, PR and confusion-matrix PNGs; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    if roc:
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.plot([r["fpr"] for r in roc], [r["tpr"] for r in roc], lw=2, label=f"AUC {m['test_auc']:.3f}")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (test)")
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(output / "roc.png", dpi=120)
        paths.append(output / "roc.png")
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.plot([r["recall"] for r in pr], [r["precision"] for r in pr], lw=2)
        ax.set(xlabel="recall", ylabel="precision", title="Precision-recall (test)", ylim=(0, 1.02))
        fig.tight_layout()
        fig.savefig(output / "pr.png", dpi=120)
        paths.append(output / "pr.png")
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="black")
    ax.set(xlabel="predicted", ylabel="actual", title="Confusion matrix (test)")
    fig.tight_layout()
    fig.savefig(output / "confusion.png", dpi=120)
    paths.append(output / "confusion.png")
    plt.close("all")
    return paths


def resolve_threshold(setting: float | str, val: dict, source: Path) -> tuple[float, str]:
    """The decision threshold to apply: ``evaluate.threshold`` as given, or (``val``) the one train chose on the
    validation split (``val_threshold`` in val_metrics.json; multi-class tasks and the SVM have none: 0.5)."""
    if setting != "val":
        return float(setting), "params"
    if "val_threshold" in val:
        return float(val["val_threshold"]), f"validation ({source})"
    return 0.5, "0.5 (no validation threshold: multi-class or svm)"


def summarize(
    point: dict[str, float], cis: dict[str, tuple[float, float]], n_test: int, threshold: float, source: str,
    ep: EvaluateParams, positive_class: str | int, class_names: list[str], cm: np.ndarray,
) -> tuple[dict[str, float], dict[str, float], dict[str, Any]]:
    """The three views of one evaluation.

    Args:
        point: ``{metric: value}`` on the whole test split (:func:`tasks.metrics.classification_metrics`).
        cis: ``{metric: (low, high)}`` (:func:`tasks.metrics.bootstrap_ci`).
        n_test: test images. threshold: the decision threshold applied; source: where it came from.
        ep: the ``evaluate`` params (CI level, resamples, seed). positive_class: its name (or index).
        class_names: index = label value. cm: (K, K) confusion matrix, rows actual, columns predicted.

    Returns:
        (flat metrics for MLflow and :class:`EvaluateResult`; the headline of metrics.json; details.json).
    """
    flat: dict[str, float] = {f"test_{k}": v for k, v in point.items()}
    for k, (lo, hi) in cis.items():
        flat[f"test_{k}_ci_low"], flat[f"test_{k}_ci_high"] = lo, hi
    flat.update({"n_test": n_test, "test_threshold": threshold})
    headline = {**{f"test_{k}": point[k] for k in METRIC_NAMES}, "n_test": n_test, "threshold": threshold}
    details = {
        "n_test": n_test,
        "positive_class": positive_class,
        "threshold": threshold,
        "threshold_source": source,
        "metrics": {f"test_{k}": {"value": point[k], "ci_low": cis[k][0], "ci_high": cis[k][1]} for k in METRIC_NAMES},
        "ci": {"level": ep.ci, "method": "percentile bootstrap", "unit": "patient", "resamples": ep.bootstrap,
               "seed": ep.bootstrap_seed},
        "class_names": class_names,
        "confusion_matrix": {"rows": "actual", "columns": "predicted", "counts": cm.tolist()},
    }
    return flat, headline, details


def run(ep: EvaluateParams, model_dir: Path, data_dir: Path, output: Path) -> EvaluateResult:
    """Evaluate on the test split once; write metrics, curves and plots; log them to the training run.

    Args:
        ep: the ``evaluate`` params group. model_dir: train's output. data_dir: preprocess's output (its
            meta.json names the positive class). output: where metrics, predictions, curves and plots go.
    """
    from sklearn.metrics import confusion_matrix

    from tasks.models.networks import load_trained, predict_proba, weights_hash

    meta = json.loads((data_dir / "meta.json").read_text())
    if meta.get("task_kind") == "segmentation":
        from tasks import evaluate_seg

        return evaluate_seg.run(ep, model_dir, data_dir, output)
    spec, model = load_trained(model_dir)
    x = np.load(data_dir / "test_x.npy")
    y = np.load(data_dir / "test_y.npy")
    with (data_dir / "test_ids.csv").open(newline="") as fh:
        ids = list(csv.DictReader(fh))
    if len(y) == 0 or (y < 0).any():
        raise ValueError(f"{data_dir / 'test_y.npy'}: the test split is empty or has unlabelled samples")
    ev, pos = ep, int(json.loads((data_dir / "meta.json").read_text()).get("positive_class", 1))
    val = json.loads((model_dir / "val_metrics.json").read_text())
    threshold, source = resolve_threshold(ev.threshold, val, model_dir / "val_metrics.json")
    proba = predict_proba(model, spec, x)
    point = classification_metrics(y, proba, pos, threshold)
    groups = [r["patient_id"] for r in ids]
    cis = bootstrap_ci(y, proba, groups, pos, threshold, ev.bootstrap, ev.ci, ev.bootstrap_seed)
    pred = predict_labels(proba, pos, threshold)
    cm = confusion_matrix(y, pred, labels=list(range(spec.num_classes)))

    positive = spec.class_names[pos] if spec.class_names else pos
    metrics, headline, details = summarize(point, cis, int(len(y)), threshold, source, ev, positive,
                                           list(spec.class_names), cm)  # fmt: skip
    files = prepare_output(output)
    (output / METRICS_FILE).write_text(json.dumps(headline, indent=2) + "\n")
    (output / DETAILS_FILE).write_text(json.dumps(details, indent=2) + "\n")
    names = list(spec.class_names) or [str(i) for i in range(spec.num_classes)]
    with (files / "predictions.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_id", "patient_id", "actual", "predicted", *[f"p_{n}" for n in names]])
        for r, t, p, pr_row in zip(ids, y, pred, proba, strict=False):
            w.writerow([r["image_id"], r["patient_id"], names[t], names[p], *[f"{v:.6f}" for v in pr_row]])
    roc, pr = curves(y, proba, pos)
    for name, rows in (("roc.csv", roc), ("pr.csv", pr)):
        with (files / name).open("w", newline="") as fh:
            fields = list(rows[0].keys()) if rows else ["x", "y"]
            w = csv.DictWriter(fh, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
    pngs = plot_all(files, roc, pr, cm, names, metrics)

    run_id = tracking.run_for_model(weights_hash(model_dir), model_dir)
    tracking.log_metrics(run_id, metrics)  # test_* only: the val_* curves and selected_val_* are train's
    tracking.log_artifacts(run_id, [output / METRICS_FILE, output / DETAILS_FILE, files / "predictions.csv", *pngs],
                           "evaluate")  # fmt: skip
    return EvaluateResult(metrics=metrics, n_test=len(y))


def main(argv: list[str] | None = None) -> None:
    from tasks.config import HelpFormatter, load_params_or_exit
    from tasks.noise import silence_known_noise

    silence_known_noise()
    ap = argparse.ArgumentParser(
        prog="python -m tasks.evaluate", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
        epilog="Settings (threshold, bootstrap resamples, CI level, seed) are the params file's `evaluate` group.",
    )
    ap.add_argument("--params", default="params.yaml", help="the params file")
    ap.add_argument("--task", default="classify",
                    help="the task (params.yaml `tasks`): its overrides of the evaluate group")
    ap.add_argument("--model", type=Path, default=Path("models/classify/train"),
                    help="train's output folder; the weights' hash finds the MLflow run")
    ap.add_argument("--data", type=Path, default=Path("data/preprocessed/classify"),
                    help="preprocess's output folder: test_x.npy, test_y.npy, test_ids.csv, meta.json")
    ap.add_argument("--output", type=Path, default=Path("reports/classify/evaluate"),
                    help="where metrics.json, details.json and outputs/ (predictions, curves, plots) go")
    args = ap.parse_args(argv)
    params = load_params_or_exit(args.params, task=args.task)
    res = run(params.evaluate, args.model, args.data, args.output)
    m = res.metrics
    if "test_dice" in m:
        from tasks.evaluate_seg import summary_lines

        print("\n".join(summary_lines(m, res.n_test, params.evaluate.ci)))
        return
    print(f"test metrics (n={res.n_test}, {params.evaluate.ci:.0%} CI by patient bootstrap):")
    for k in ("accuracy", "precision", "recall", "f1", "auc"):
        print(f"  {k:<10} {m[f'test_{k}']:.4f}  [{m[f'test_{k}_ci_low']:.4f}, {m[f'test_{k}_ci_high']:.4f}]")


if __name__ == "__main__":
    main()
