"""evaluate's files: metrics.json is the short headline `dvc metrics show` / `dvc exp show` compare; details.json
holds the confidence intervals, the threshold's source and the confusion matrix. (The DVC tables over a real
pipeline run: tests/test_pipeline.py; --help: tests/test_cli_help.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks import evaluate
from tasks.config import load_params
from tasks.metrics import METRIC_NAMES
from tests._fake import make_preprocessed, make_trained

REPO = Path(__file__).resolve().parents[1]
HEADLINE = {*(f"test_{k}" for k in METRIC_NAMES), "n_test", "threshold"}


@pytest.fixture()
def evaluated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, evaluate.EvaluateResult]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    make_preprocessed(tmp_path / "pre", n=(2, 2, 24), size=32)
    model_dir = make_trained(tmp_path)
    p = load_params(REPO / "params.yaml", {"evaluate.bootstrap": 30, "evaluate.threshold": 0.4})
    return tmp_path / "ev", evaluate.run(p.evaluate, model_dir, tmp_path / "pre", tmp_path / "ev")


def test_metrics_json_is_the_headline(evaluated: tuple[Path, evaluate.EvaluateResult]) -> None:
    out, res = evaluated
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == HEADLINE
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values()), "numbers only"
    assert metrics["n_test"] == res.n_test == 24 and metrics["threshold"] == 0.4
    assert {k: metrics[k] for k in HEADLINE - {"threshold"}} == {k: res.metrics[k] for k in HEADLINE - {"threshold"}}


def test_details_json_holds_the_intervals_and_the_confusion_matrix(
    evaluated: tuple[Path, evaluate.EvaluateResult],
) -> None:
    import numpy as np
    import pandas as pd

    out, res = evaluated
    details = json.loads((out / "details.json").read_text())
    assert set(details["metrics"]) == {f"test_{k}" for k in METRIC_NAMES}
    for key, m in details["metrics"].items():
        assert m == {"value": res.metrics[key], "ci_low": res.metrics[f"{key}_ci_low"],
                     "ci_high": res.metrics[f"{key}_ci_high"]}  # fmt: skip
        assert m["ci_low"] <= m["ci_high"]
    assert details["ci"] == {"level": 0.95, "method": "percentile bootstrap", "unit": "patient", "resamples": 30,
                             "seed": 0}  # fmt: skip
    assert (details["threshold"], details["threshold_source"], details["positive_class"]) == (0.4, "params", "lesion")
    assert details["class_names"] == ["normal", "lesion"]
    cm = details["confusion_matrix"]
    assert (cm["rows"], cm["columns"]) == ("actual", "predicted")
    pred = pd.read_csv(out / "outputs" / "predictions.csv")
    want = [[int(((pred["actual"] == a) & (pred["predicted"] == b)).sum()) for b in ("normal", "lesion")]
            for a in ("normal", "lesion")]  # fmt: skip
    assert cm["counts"] == want and int(np.sum(cm["counts"])) == details["n_test"] == 24
