"""The evaluate stage's output layout, shared by the classification (:mod:`tasks.evaluate`) and segmentation
(:mod:`tasks.evaluate_seg`) evaluations."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

METRICS_FILE = "metrics.json"  # the headline, a DVC metrics file: what `dvc metrics show` and `dvc exp show` compare
DETAILS_FILE = "details.json"  # each metric with its confidence interval, and what else qualifies the headline
OUTPUTS = "outputs"  # everything else (a cached DVC output folder): predictions, curves' points, PNGs


@dataclass(frozen=True)
class EvaluateResult:
    """``metrics``: flat, as logged to MLflow (``test_<m>``, ``test_<m>_ci_low``/``_ci_high``, ``n_test``, ...)."""

    metrics: dict[str, float]
    n_test: int


def prepare_output(output: Path) -> Path:
    """Create ``output`` and an empty ``output/outputs`` (a previous run's files there are removed: the folder is one
    DVC output); returns the latter."""
    files = output / OUTPUTS
    if files.exists():
        shutil.rmtree(files)
    files.mkdir(parents=True)
    return files
