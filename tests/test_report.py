"""report: the results table of a sweep from tracked runs, byte-identical on a re-run, paper rows beside ours."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from tasks import tracking
from tasks.reporting import report


@pytest.fixture()
def sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Three seeds of one configuration, tracked as train + evaluate would (metrics, tags, predictions.csv)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    rng = np.random.default_rng(0)
    for seed, (auc, acc) in zip((2, 0, 1), ((0.90, 0.85), (0.88, 0.84), (0.86, 0.83)), strict=True):
        rid = tracking.start_run(
            "bench", f"seed{seed}", {"model_family": "cnn", "arch": "resnet18"},
            {"base.seed": seed, "base.dataset": "adrenalmnist3d_28", "train.arch": "resnet18", "base.sweep": "g"},
            sweep="g",
        )
        tracking.log_metrics(rid, {"test_auc": auc, "test_auc_ci_low": auc - 0.05, "test_auc_ci_high": auc + 0.04,
                                   "test_accuracy": acc, "test_accuracy_ci_low": acc - 0.04,
                                   "test_accuracy_ci_high": acc + 0.04, "train_minutes": 5.0})
        pred = tmp_path / f"pred{seed}" / "predictions.csv"
        pred.parent.mkdir()
        with pred.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["image_id", "patient_id", "actual", "predicted", "p_0", "p_1"])
            for i in range(40):
                y = i % 2
                p1 = float(np.clip(0.5 * y + 0.5 * rng.random(), 0, 1))
                w.writerow([f"i{i}", f"i{i}", str(y), str(int(p1 >= 0.5)), f"{1 - p1:.6f}", f"{p1:.6f}"])
        tracking.log_artifacts(rid, [pred], "evaluate")
        tracking.end_run(rid)
    return "g"


def test_table_is_regenerated_byte_for_byte(sweep: str, tmp_path: Path) -> None:
    first = report.run("bench", sweep, tmp_path / "out")
    blobs = [p.read_bytes() for p in first]
    second = report.run("bench", sweep, tmp_path / "out")
    assert [p.read_bytes() for p in second] == blobs
    md = first[0].read_text()
    assert "**0.880 ± 0.020**" in md and "**0.840 ± 0.010**" in md  # mean ± sd of the three seeds
    assert md.index("0.880 [0.830, 0.920]") < md.index("0.860 [0.810, 0.900]"), "seeds in ascending order"
    assert "ResNet-18+ACS (MedMNIST v2) | | 0.839 | 0.754" in md
    tex = first[1].read_text()
    assert r"\begin{tabular}" in tex and r"0.880 \pm 0.020" in tex and "auto-sklearn & 0.828 & 0.802" in tex
    assert first[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and first[2].stat().st_size > 1000


def test_unknown_sweep_is_a_clear_error(sweep: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no evaluated runs"):
        report.run("bench", "nope", tmp_path / "out")
