"""tasks.sources.split: patient-grouped, label-stratified, seeded splits."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.sources.split import check_patient_disjoint, split_by_patient


def _cohort(n_patients: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """1-3 images per patient; about a third positive, labels varying within a patient."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 4, n_patients)
    pids = np.repeat([f"P{i:04d}" for i in range(n_patients)], counts)
    labels = (rng.random(len(pids)) < 0.33).astype(int)
    return pids, labels


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_no_patient_in_two_splits_and_stratified(seed: int) -> None:
    pids, labels = _cohort(seed=seed)
    splits = split_by_patient(pids, labels, val_fraction=0.15, test_fraction=0.2, seed=seed)
    assert set(splits) == {"train", "val", "test"}
    for pid in np.unique(pids):
        assert len(set(splits[pids == pid])) == 1, pid
    overall = labels.mean()
    for name, want in (("test", 0.2), ("val", 0.16), ("train", 0.64)):
        member = splits == name
        assert member.mean() == pytest.approx(want, abs=0.04), name
        assert labels[member].mean() == pytest.approx(overall, abs=0.06), f"{name} is not stratified"


def test_deterministic_for_a_seed() -> None:
    pids, labels = _cohort()
    a = split_by_patient(pids, labels, 0.15, 0.2, seed=7)
    assert np.array_equal(a, split_by_patient(pids, labels, 0.15, 0.2, seed=7))
    assert not np.array_equal(a, split_by_patient(pids, labels, 0.15, 0.2, seed=8))


def test_unlabelled_is_grouped_only() -> None:
    pids, _ = _cohort(60)
    splits = split_by_patient(pids, None, 0.15, 0.2, seed=0)
    check_patient_disjoint(pids, splits)
    assert set(splits) == {"train", "val", "test"}


def test_too_few_patients_is_an_error_naming_the_count() -> None:
    with pytest.raises(ValueError, match="3 patients"):
        split_by_patient(["a", "a", "b", "c"], [0, 1, 0, 1], 0.15, 0.2, seed=0)


def test_length_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="labels"):
        split_by_patient(["a", "b"], [0], 0.15, 0.2, seed=0)


def test_check_patient_disjoint_names_the_leak() -> None:
    check_patient_disjoint(["a", "a", "b"], ["train", "train", "test"])
    with pytest.raises(ValueError, match=r"1 patient\(s\).*a in test\+train"):
        check_patient_disjoint(["a", "a", "b"], ["train", "test", "test"])
