"""Classification metrics shared by train (validation) and evaluate (test), via scikit-learn.

Binary tasks use the positive-class probability and a threshold; multi-class tasks use argmax and macro averages
(one-vs-rest macro ROC-AUC), as in the MedMNIST v2 protocol.
"""

from __future__ import annotations

import numpy as np


def classification_metrics(
    y: np.ndarray, proba: np.ndarray, positive_class: int = 1, threshold: float = 0.5
) -> dict[str, float]:
    """Accuracy, precision, recall, F1 and ROC-AUC.

    Args:
        y: int array (N,) of class indices.
        proba: float array (N, K) of class probabilities (rows sum to 1).
        positive_class: index of the positive class (binary only).
        threshold: decision threshold on the positive-class probability (binary only).

    Returns:
        ``{"accuracy", "precision", "recall", "f1", "auc"}``; auc is NaN when only one class is present.
    """
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    y = np.asarray(y)
    pred = predict_labels(proba, positive_class, threshold)
    binary = proba.shape[1] == 2
    if binary:
        yb = (y == positive_class).astype(int)
        pb = (pred == positive_class).astype(int)
        prec, rec, f1, _ = precision_recall_fscore_support(yb, pb, average="binary", zero_division=0)
    else:
        prec, rec, f1, _ = precision_recall_fscore_support(y, pred, average="macro", zero_division=0)
    out = {"accuracy": float(accuracy_score(y, pred)), "precision": float(prec), "recall": float(rec), "f1": float(f1)}
    out["auc"] = auc(y, proba, positive_class)
    return out


def predict_labels(proba: np.ndarray, positive_class: int = 1, threshold: float = 0.5) -> np.ndarray:
    """Class decisions: positive-class probability >= threshold for binary, argmax otherwise."""
    if proba.shape[1] == 2:
        negative = 1 - positive_class
        return np.where(proba[:, positive_class] >= threshold, positive_class, negative)
    return proba.argmax(axis=1)


def auc(y: np.ndarray, proba: np.ndarray, positive_class: int = 1) -> float:
    """ROC-AUC: positive-class score for binary, one-vs-rest macro for multi-class; NaN if undefined."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y)
    # undefined with one class present (a small split, a bootstrap resample): NaN, decided here rather than by
    # sklearn, which warns once per call (a thousand UndefinedMetricWarnings from one bootstrap)
    if proba.shape[1] == 2:
        yb = (y == positive_class).astype(int)
        if len(np.unique(yb)) < 2:
            return float("nan")
        return float(roc_auc_score(yb, proba[:, positive_class]))
    if len(np.unique(y)) < 2:
        return float("nan")
    try:
        return float(roc_auc_score(y, proba, multi_class="ovr", average="macro", labels=np.arange(proba.shape[1])))
    except ValueError:  # a class of `labels` absent from y: one-vs-rest is undefined for it
        return float("nan")


def best_threshold(y: np.ndarray, proba: np.ndarray, positive_class: int = 1) -> float:
    """The decision threshold on the positive-class probability that maximises accuracy on (validation) data.

    Candidates are 0.5 and the midpoints between consecutive distinct scores; among those with the highest
    accuracy the one closest to 0.5 wins (the argmax rule unless the data say otherwise). Binary only.

    Args:
        y: (N,) class indices. proba: (N, 2) probabilities. positive_class: index of the positive class.
    """
    if proba.shape[1] != 2:
        raise ValueError("a decision threshold applies to binary tasks only")
    score = proba[:, positive_class]
    yb = np.asarray(y) == positive_class
    distinct = np.unique(score)
    candidates = np.concatenate([[0.5], (distinct[:-1] + distinct[1:]) / 2])
    acc = np.array([((score >= t) == yb).mean() for t in candidates])
    best = candidates[acc == acc.max()]
    return float(best[np.argmin(np.abs(best - 0.5))])


def log_loss(y: np.ndarray, proba: np.ndarray) -> float:
    """Mean cross-entropy of the true classes (natural log), scikit-learn's ``log_loss`` over all K classes."""
    from sklearn.metrics import log_loss as sk_log_loss

    return float(sk_log_loss(np.asarray(y), proba, labels=np.arange(proba.shape[1])))


METRIC_NAMES = ("accuracy", "precision", "recall", "f1", "auc")


def bootstrap_ci(
    y: np.ndarray, proba: np.ndarray, groups: list[str], positive_class: int, threshold: float, n: int, ci: float,
    seed: int,
) -> dict[str, tuple[float, float]]:
    """Percentile confidence intervals of each metric, resampling patients (not images) with replacement.

    Args:
        y: (N,) labels. proba: (N, K) probabilities. groups: (N,) patient id of each image.
        positive_class, threshold: as in :func:`classification_metrics`.
        n: number of resamples. ci: coverage, e.g. 0.95. seed: the resampling's own seed.

    Returns:
        ``{metric: (low, high)}``; NaN bounds when n == 0. A resample with one class only has no AUC: it is left
        out of the AUC's quantiles (NaN bounds when every resample lacks a class).
    """
    if n == 0:
        return {k: (float("nan"), float("nan")) for k in METRIC_NAMES}
    rng = np.random.default_rng(seed)
    patients, inverse = np.unique(np.asarray(groups), return_inverse=True)
    members = [np.flatnonzero(inverse == i) for i in range(len(patients))]
    samples: dict[str, list[float]] = {k: [] for k in METRIC_NAMES}
    for _ in range(n):
        picked = rng.integers(0, len(patients), len(patients))
        idx = np.concatenate([members[i] for i in picked])
        m = classification_metrics(y[idx], proba[idx], positive_class, threshold)
        for k in METRIC_NAMES:
            samples[k].append(m[k])
    alpha = (1 - ci) / 2
    out = {}
    for k, v in samples.items():
        arr = np.asarray(v, dtype=float)
        arr = arr[~np.isnan(arr)]
        out[k] = (float(np.quantile(arr, alpha)), float(np.quantile(arr, 1 - alpha))) if len(arr) else (
            float("nan"), float("nan"))
    return out


def bootstrap_mean_ci(values: np.ndarray, groups: list[str], n: int, ci: float, seed: int) -> tuple[float, float]:
    """Percentile confidence interval of the mean of per-case values, resampling patients (a patient's cases stay
    together) with replacement; NaN values (a case where the metric is undefined) are left out of each mean.

    Args:
        values: (N,) one value per case (e.g. a case's Dice). groups: (N,) patient id of each case (images without
            patient ids: one group per image). n: resamples (0: NaN bounds). ci: coverage. seed: the resampling's seed.

    Returns:
        (low, high).
    """
    values = np.asarray(values, dtype=float)
    if n == 0 or not np.any(~np.isnan(values)):
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    n_groups = int(inverse.max()) + 1
    sums = np.bincount(inverse, weights=np.nan_to_num(values), minlength=n_groups)
    counts = np.bincount(inverse, weights=(~np.isnan(values)).astype(float), minlength=n_groups)
    picked = rng.integers(0, n_groups, (n, n_groups))
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums[picked].sum(1) / counts[picked].sum(1)
    means = means[~np.isnan(means)]
    alpha = (1 - ci) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))
