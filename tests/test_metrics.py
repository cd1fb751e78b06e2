"""metrics: the validation threshold, cross-entropy, and evaluate's threshold setting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks.evaluate import resolve_threshold
from tasks.metrics import best_threshold, classification_metrics, cross_entropy


def _proba(pos: list[float]) -> np.ndarray:
    p = np.asarray(pos)
    return np.stack([1 - p, p], axis=1)


def test_best_threshold_maximises_accuracy_and_prefers_one_half() -> None:
    y = np.array([0, 0, 0, 1, 1])
    proba = _proba([0.1, 0.2, 0.35, 0.4, 0.9])  # at 0.5 one positive is missed; below 0.375 none is
    t = best_threshold(y, proba)
    assert 0.35 < t <= 0.4
    assert classification_metrics(y, proba, threshold=t)["accuracy"] == 1.0
    separable_at_half = _proba([0.1, 0.2, 0.3, 0.7, 0.9])
    assert best_threshold(y, separable_at_half) == 0.5, "0.5 is kept when it is as good as any other"


def test_best_threshold_is_binary_only() -> None:
    with pytest.raises(ValueError, match="binary"):
        best_threshold(np.array([0, 1, 2]), np.eye(3))


def test_cross_entropy() -> None:
    y = np.array([0, 1])
    assert cross_entropy(y, _proba([0.0, 1.0])) == pytest.approx(0.0, abs=1e-6)
    assert cross_entropy(y, _proba([0.5, 0.5])) == pytest.approx(np.log(2))


@pytest.mark.parametrize(
    ("setting", "val", "expected"),
    [(0.3, {"val_threshold": 0.7}, 0.3), ("val", {"val_threshold": 0.7}, 0.7), ("val", {}, 0.5)],
)
def test_resolve_threshold(setting, val: dict, expected: float) -> None:
    threshold, source = resolve_threshold(setting, val, Path("model/val_metrics.json"))
    assert threshold == expected and source
