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
    try:
        if proba.shape[1] == 2:
            return float(roc_auc_score((y == positive_class).astype(int), proba[:, positive_class]))
        return float(roc_auc_score(y, proba, multi_class="ovr", average="macro", labels=np.arange(proba.shape[1])))
    except ValueError:  # a single class present
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


def cross_entropy(y: np.ndarray, proba: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes (natural log; probabilities clipped at 1e-7)."""
    p = np.clip(proba[np.arange(len(y)), np.asarray(y)], 1e-7, 1.0)
    return float(-np.log(p).mean())
