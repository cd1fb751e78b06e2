"""Shared fixtures: the real params.yaml shrunk with overrides, and a tiny synthetic DICOM cohort.

The cohort and its ingest output are generated once per session (seconds); tests that modify files copy
them into their own ``tmp_path`` first.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# no phoning home from tests: the machine is offline and the attempts only add noise and lock contention
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

from tasks.config import Params, load_params

REPO = Path(__file__).resolve().parents[1]

# The real params.yaml with a cohort small enough for unit tests (12 patients, 64 px, one process).
TINY_OVERRIDES: dict[str, Any] = {
    "synth.n_patients": 12,
    "synth.image_size": 64,
    "synth.slices_per_study": 1,
    "ingest.workers": 1,
    "ingest.local_report": None,  # tests never write the real-paths report into the checkout's reports/
}


@pytest.fixture(scope="session")
def make_params() -> Callable[..., Params]:
    """A factory: ``make_params({"train.epochs": 1})`` is the real params.yaml + TINY_OVERRIDES + yours."""

    def _make(overrides: dict[str, Any] | None = None) -> Params:
        return load_params(REPO / "params.yaml", {**TINY_OVERRIDES, **(overrides or {})})

    return _make


@pytest.fixture(scope="session")
def params(make_params: Callable[..., Params]) -> Params:
    """The real params.yaml shrunk by TINY_OVERRIDES."""
    return make_params()


@pytest.fixture(scope="session")
def tiny_cohort(params: Params, tmp_path_factory: pytest.TempPathFactory):
    """A synthetic cohort from ``params.synth``: a ``tasks.synth.SynthResult`` (dicom_dir, labels_csv inside it,
    counts).

    Session-scoped and shared: do not modify its files (copy ``dicom_dir`` to your tmp_path first).
    """
    from tasks.synth import run

    return run(params.synth, tmp_path_factory.mktemp("cohort"), progress=False)


@pytest.fixture(scope="session")
def cohort_params(make_params: Callable[..., Params], tiny_cohort) -> Params:
    """``params`` with ``ingest.input`` = the tiny cohort's DICOM folder (its labels.csv inside, as in the pipeline)."""
    return make_params({"ingest.input": str(tiny_cohort.dicom_dir)})


@pytest.fixture(scope="session")
def run_ingest() -> Callable[..., Any]:
    """``run_ingest(params, output, **kwargs)``: the ingest stage as the CLI calls it (its own params group, the
    ``base`` keys it reads), without progress bars; kwargs go to ``tasks.ingest.run``."""

    def _run(params: Params, output: Path, **kwargs: Any):
        from tasks.ingest import run

        kwargs.setdefault("progress", False)
        return run(params.ingest, output, class_names=params.base.class_names, split_seed=params.base.split_seed,
                   **kwargs)  # fmt: skip

    return _run


@pytest.fixture(scope="session")
def run_preprocess() -> Callable[..., Any]:
    """``run_preprocess(params, inputs, output)``: the preprocess stage as the CLI calls it."""

    def _run(params: Params, inputs: Path, output: Path):
        from tasks.preprocess import run

        return run(params.preprocess, inputs, output, params.base.class_names, params.base.positive_class)

    return _run


@pytest.fixture(scope="session")
def ingested_cohort(cohort_params: Params, run_ingest, tmp_path_factory: pytest.TempPathFactory):
    """``tiny_cohort`` through the ingest stage: a ``tasks.ingest.IngestResult`` (output, manifest, summary).

    Uses whatever MEDPIPE_DEID_SECRET the test process has (usually none: the development default).
    Session-scoped and shared: do not modify its files.
    """
    return run_ingest(cohort_params, tmp_path_factory.mktemp("ingested"))
