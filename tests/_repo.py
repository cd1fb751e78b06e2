"""A throw-away copy of this repository (a real git + DVC project) with shrunken params, for pipeline tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from tasks.config import write_overrides

REPO = Path(__file__).resolve().parents[1]

# the real params.yaml, shrunk: a tiny cohort, a small network, one epoch, one ingest worker (2-core machines)
TINY = {
    "synth.n_patients": 16,
    "synth.image_size": 64,
    "ingest.workers": 1,
    "preprocess.spatial_size": [32, 32],
    "train.arch": "resnet10",
    "train.epochs": 1,
    "train.batch_size": 16,
    "evaluate.bootstrap": 50,
    # the classification task only: the segmentation task has its own tests (TINY_SEGMENT)
    "tasks": {"classify": {"kind": "classification", "model_name": "medpipe-classifier"}},
}
# TINY with both default tasks, the segmenter as small as the classifier
TINY_SEGMENT = {
    **TINY,
    "tasks": {
        "classify": {"kind": "classification", "model_name": "medpipe-classifier"},
        # 10 epochs of 3 steps reach a validation Dice of ~0.74 (lung ~0.88); no weight averaging over so few steps
        "segment": {"kind": "segmentation", "model_name": "medpipe-segmenter",
                    "preprocess": {"spatial_size": [32, 32]},
                    "train": {"arch": "unet", "epochs": 10, "batch_size": 4, "select_metric": "dice", "lr": 0.01,
                              "ema": 0.0, "seg": {"channels": [8, 16, 32]}},
                    "promote": {"metric": "val_dice"}},
    },
}  # fmt: skip

GIT = ["git", "-c", "user.name=medpipe-test", "-c", "user.email=test@medpipe.invalid"]


def copy_repo(dest: Path, overrides: dict[str, Any] | None = None) -> Path:
    """Copy the working tree's files (tracked and untracked-not-ignored) to ``dest``, apply params overrides
    (validated, comments kept) and commit, so git and DVC behave as in a fresh clone."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split("\0")  # fmt: skip
    for f in filter(None, files):
        src = REPO / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    write_overrides(dest / "params.yaml", {**TINY, **(overrides or {})})
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run([*GIT, "commit", "-qm", "test copy"], cwd=dest, check=True)
    return dest


def dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``dvc <args>`` in ``repo`` with this interpreter's bin/ first on PATH (the stages' ``python``)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    res = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root`` (empty when it does not exist)."""
    import hashlib

    if not root.exists():
        return {}
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def run_pipeline_flow(repo: Path) -> dict[str, Any]:
    """The pipeline flow on ``repo`` under a real Prefect test server, tracking in the repo's own sqlite store
    (``MLFLOW_TRACKING_URI`` unset for the run, restored after); returns the flow's result."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import pipeline

    old = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        with prefect_test_harness(server_startup_timeout=120):
            return pipeline(repo=str(repo))
    finally:
        if old is not None:
            os.environ["MLFLOW_TRACKING_URI"] = old
