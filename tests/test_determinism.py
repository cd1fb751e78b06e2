"""Stage outputs are a function of their inputs: the same input gives the same bytes, whatever the run (another
output folder, another input location, ingest.workers, a training-seed grid); only ``base.split_seed`` moves the split.

DVC decides what to rerun from these bytes: a timing, a run id, a host name or an absolute path in them would
rerun everything downstream for nothing (issue 8).
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root``: relative POSIX path -> its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_tree(a: Path, b: Path) -> None:
    ta, tb = tree(a), tree(b)
    assert sorted(ta) == sorted(tb), f"different files: {sorted(set(ta) ^ set(tb))[:5]}"
    differ = sorted(name for name in ta if ta[name] != tb[name])
    assert not differ, f"{len(differ)} file(s) differ between {a} and {b}: {differ[:5]}"


@pytest.fixture
def no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same pseudonymisation secret for every run of a test: the development default."""
    monkeypatch.delenv("MEDPIPE_DEID_SECRET", raising=False)


def test_ingest_twice_is_byte_identical_whatever_the_folders_and_workers(
    tiny_cohort, make_params, run_ingest, tmp_path: Path, no_secret
) -> None:
    """Two runs into two folders, the input at two absolute locations, 1 vs 2 worker processes, and the
    de-identified DICOM written too: every file of the output trees is the same, byte for byte."""
    elsewhere = shutil.copytree(tiny_cohort.dicom_dir, tmp_path / "elsewhere" / "exported")
    runs = {
        "a": {"ingest.input": str(tiny_cohort.dicom_dir)},
        "b": {"ingest.input": str(tiny_cohort.dicom_dir)},
        "moved": {"ingest.input": str(elsewhere)},
        "workers2": {"ingest.input": str(tiny_cohort.dicom_dir), "ingest.workers": 2},
    }
    for name, overrides in runs.items():
        res = run_ingest(make_params({"ingest.deid.write_dicom": True, **overrides}), tmp_path / name)
        assert res.summary["series_built"] == tiny_cohort.n_studies
    assert len(list((tmp_path / "a" / "dicom").rglob("*.dcm"))) == tiny_cohort.n_files  # the check covers them
    for name in ("b", "moved", "workers2"):
        assert_same_tree(tmp_path / "a", tmp_path / name)


def test_ingest_in_place_again_is_byte_identical(cohort_params, run_ingest, ingested_cohort, tmp_path: Path,
                                                 no_secret) -> None:  # fmt: skip
    """Rerunning into a folder that holds a previous output (as ``dvc repro`` with a kept output) changes nothing."""
    if ingested_cohort.summary["secret"] != "development-default":
        pytest.skip("the session's cohort was ingested with MEDPIPE_DEID_SECRET set")
    out = shutil.copytree(ingested_cohort.output, tmp_path / "out")
    run_ingest(cohort_params, out)
    assert_same_tree(ingested_cohort.output, out)


def test_preprocess_twice_is_byte_identical(ingested_cohort, cohort_params, run_preprocess, tmp_path: Path) -> None:
    params = cohort_params.model_copy(update={
        "preprocess": cohort_params.preprocess.model_copy(update={"spatial_size": [32, 32]})})  # fmt: skip
    run_preprocess(params, ingested_cohort.output, tmp_path / "a")
    run_preprocess(params, ingested_cohort.output, tmp_path / "b")
    moved = shutil.copytree(ingested_cohort.output, tmp_path / "elsewhere" / "ingested")
    run_preprocess(params, moved, tmp_path / "c")
    assert {"meta.json", "train_x.npy", "val_ids.csv"} <= set(tree(tmp_path / "a"))
    assert_same_tree(tmp_path / "a", tmp_path / "b")
    assert_same_tree(tmp_path / "a", tmp_path / "c")


def _splits(manifest: Path) -> dict[str, str]:
    with manifest.open(newline="") as fh:
        return {r["image_id"]: r["split"] for r in csv.DictReader(fh)}


def test_a_training_seed_grid_does_not_move_the_split(tiny_cohort, make_params, run_ingest, ingested_cohort,
                                                      tmp_path: Path, no_secret) -> None:  # fmt: skip
    """base.seed is training's (init, order, augmentation): a grid over it keeps the patients where they were.
    base.split_seed is the split's: another value is another split."""
    if ingested_cohort.summary["secret"] != "development-default":
        pytest.skip("the session's cohort was ingested with MEDPIPE_DEID_SECRET set")
    base = make_params({"ingest.input": str(tiny_cohort.dicom_dir)})
    reference = _splits(ingested_cohort.manifest)
    assert set(reference.values()) == {"train", "val", "test"}
    for seed in (0, 1, base.base.seed + 1):
        res = run_ingest(make_params({"ingest.input": str(tiny_cohort.dicom_dir), "base.seed": seed}),
                         tmp_path / f"seed{seed}")  # fmt: skip
        assert _splits(res.manifest) == reference, f"base.seed={seed} moved the split"
        assert res.manifest.read_bytes() == ingested_cohort.manifest.read_bytes()
    moved = run_ingest(make_params({"ingest.input": str(tiny_cohort.dicom_dir),
                                    "base.split_seed": base.base.split_seed + 1}), tmp_path / "split")  # fmt: skip
    other = _splits(moved.manifest)
    assert other.keys() == reference.keys() and other != reference, "base.split_seed did not change the split"
    assert moved.summary["params"]["split_seed"] == base.base.split_seed + 1
