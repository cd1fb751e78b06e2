"""metrics: the validation threshold, cross-entropy, evaluate's threshold setting, and the patient-level bootstrap
(what is resampled, degenerate sets, its own seed, and that evaluate takes that seed and not the training one)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from tasks.evaluate import resolve_threshold
from tasks.metrics import METRIC_NAMES, best_threshold, bootstrap_ci, classification_metrics, log_loss

REPO = Path(__file__).resolve().parents[1]


def _proba(pos: list[float] | np.ndarray) -> np.ndarray:
    p = np.asarray(pos, dtype=float)
    return np.stack([1 - p, p], axis=1)


def _scored(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """n patients with one image each: labels alternate, the positive-class score is informative but noisy."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    p = np.clip(0.3 + 0.4 * y + rng.normal(0, 0.25, n), 0.01, 0.99)
    return y, _proba(p), [f"p{i:03d}" for i in range(n)]


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


def test_log_loss() -> None:
    y = np.array([0, 1])
    assert log_loss(y, _proba([0.0, 1.0])) == pytest.approx(0.0, abs=1e-6)
    assert log_loss(y, _proba([0.5, 0.5])) == pytest.approx(np.log(2))
    assert log_loss(y, _proba([0.2, 0.6])) == pytest.approx(-(np.log(0.8) + np.log(0.6)) / 2)
    # all K classes count, also when a class is absent from y (a small validation split)
    assert log_loss(np.array([0, 0]), np.array([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]])) == pytest.approx(np.log(2))


@pytest.mark.parametrize(
    ("setting", "val", "expected", "source"),
    [(0.3, {"val_threshold": 0.7}, 0.3, "params"), ("val", {"val_threshold": 0.7}, 0.7, "validation"),
     ("val", {}, 0.5, "no validation threshold")],
)
def test_resolve_threshold(setting, val: dict, expected: float, source: str) -> None:
    threshold, said = resolve_threshold(setting, val, Path("model/val_metrics.json"))
    assert threshold == expected and source in said


# --- bootstrap CI ----------------------------------------------------------------------------------------------


def test_bootstrap_resamples_patients_not_images() -> None:
    """Every patient has three identical images: a patient resample then yields exactly the metrics of the same
    resample of a one-image-per-patient set, so the intervals are equal; an image resample would not be."""
    y, proba, patients = _scored(40)
    one = bootstrap_ci(y, proba, patients, 1, 0.5, n=100, ci=0.9, seed=3)
    three = bootstrap_ci(np.repeat(y, 3), np.repeat(proba, 3, axis=0), list(np.repeat(patients, 3)), 1, 0.5,
                         n=100, ci=0.9, seed=3)  # fmt: skip
    for k in METRIC_NAMES:
        assert three[k] == pytest.approx(one[k], rel=1e-12, abs=1e-12), k
    # the same 120 images, each its own patient: 120 draws instead of 40, a different (narrower) interval
    per_image = bootstrap_ci(np.repeat(y, 3), np.repeat(proba, 3, axis=0), [f"i{i}" for i in range(120)], 1, 0.5,
                             n=100, ci=0.9, seed=3)  # fmt: skip
    assert per_image["auc"] != pytest.approx(one["auc"])
    assert per_image["auc"][1] - per_image["auc"][0] < one["auc"][1] - one["auc"][0]


def test_one_patient_is_always_drawn_whole() -> None:
    """A set that is one patient: every resample is the whole set, so each interval is the point estimate."""
    y, proba, _ = _scored(30)
    point = classification_metrics(y, proba, 1, 0.5)
    cis = bootstrap_ci(y, proba, ["p0"] * len(y), 1, 0.5, n=50, ci=0.95, seed=0)
    for k in METRIC_NAMES:
        assert cis[k] == pytest.approx((point[k], point[k])), k


def test_no_resamples_gives_nan_bounds() -> None:
    y, proba, patients = _scored(10)
    cis = bootstrap_ci(y, proba, patients, 1, 0.5, n=0, ci=0.95, seed=0)
    assert set(cis) == set(METRIC_NAMES)
    assert all(math.isnan(lo) and math.isnan(hi) for lo, hi in cis.values())


def test_one_class_test_set_has_nan_auc_bounds_and_finite_others() -> None:
    _, proba, patients = _scored(20)
    y = np.ones(20, dtype=int)
    cis = bootstrap_ci(y, proba, patients, 1, 0.5, n=100, ci=0.95, seed=0)
    assert math.isnan(cis["auc"][0]) and math.isnan(cis["auc"][1])
    for k in ("accuracy", "precision", "recall", "f1"):
        lo, hi = cis[k]
        assert math.isfinite(lo) and math.isfinite(hi) and lo <= hi, k
    assert cis["accuracy"][0] < cis["accuracy"][1], "an imperfect classifier's accuracy varies between resamples"


def test_same_seed_same_interval_other_seed_other_interval() -> None:
    y, proba, patients = _scored(40)
    a, b, c = (bootstrap_ci(y, proba, patients, 1, 0.5, n=100, ci=0.95, seed=s) for s in (0, 0, 1))
    assert a == b
    assert a["auc"] != c["auc"] and a["accuracy"] != c["accuracy"]


def test_a_lower_coverage_gives_a_narrower_interval() -> None:
    y, proba, patients = _scored(40)
    wide = bootstrap_ci(y, proba, patients, 1, 0.5, n=150, ci=0.95, seed=0)
    narrow = bootstrap_ci(y, proba, patients, 1, 0.5, n=150, ci=0.5, seed=0)
    for k in ("accuracy", "auc"):
        assert wide[k][0] < narrow[k][0] < narrow[k][1] < wide[k][1], k


@pytest.mark.slow
def test_evaluate_ci_follows_evaluate_bootstrap_seed_not_base_seed(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the CLI (what dvc.yaml runs): a training-seed change leaves metrics.json and details.json as they are
    for a fixed model and test set; a bootstrap-seed change moves only the intervals in details.json."""
    from tasks import evaluate
    from tasks.config import write_overrides
    from tasks.models.networks import ModelSpec
    from tests._fake import make_preprocessed, make_trained

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    make_preprocessed(tmp_path / "pre", n=(2, 2, 40), size=16)
    model_dir = make_trained(tmp_path, ModelSpec("cnn", "resnet10", 2, 1, 2, (1, 16, 16), ("normal", "lesion")))

    def outputs_with(name: str, overrides: dict) -> tuple[dict, dict]:
        params = tmp_path / f"{name}.yaml"
        shutil.copy(REPO / "params.yaml", params)
        write_overrides(params, {"evaluate.bootstrap": 50, **overrides})
        evaluate.main(["--params", str(params), "--model", str(model_dir), "--data", str(tmp_path / "pre"),
                       "--output", str(tmp_path / name)])  # fmt: skip
        return tuple(json.loads((tmp_path / name / f).read_text()) for f in ("metrics.json", "details.json"))

    def bounds(details: dict) -> dict:
        return {k: (m["ci_low"], m["ci_high"]) for k, m in details["metrics"].items()}

    (ma, da), (mb, db), (mc, dc) = (outputs_with("a", {"base.seed": 1}), outputs_with("b", {"base.seed": 2}),
                                    outputs_with("c", {"base.seed": 1, "evaluate.bootstrap_seed": 5}))
    assert (ma, da) == (mb, db)
    assert len(bounds(da)) == len(METRIC_NAMES)
    assert bounds(da) != bounds(dc)
    assert ma == mc  # the headline has no intervals
    assert {k: m["value"] for k, m in da["metrics"].items()} == {k: m["value"] for k, m in dc["metrics"].items()}
    assert dc["ci"] == {**da["ci"], "seed": 5}
    assert {k: v for k, v in da.items() if k not in ("metrics", "ci")} == {
        k: v for k, v in dc.items() if k not in ("metrics", "ci")}
