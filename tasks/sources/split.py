"""Patient-level train/val/test splits: no patient ever appears in two splits.

scikit-learn's :class:`~sklearn.model_selection.StratifiedGroupKFold` does the work twice: the test split is
one fold of ``round(1 / test_fraction)`` folds over all images, then the validation split is one fold of
``round((1 - test) / val_fraction)`` folds over the rest. Folds are whole patients with (as far as the groups
allow) the label distribution of the whole, so the realised fractions are close to, not exactly, the requested
ones; ``val_fraction=0.15, test_fraction=0.2`` gives 0.2 / 0.16 / 0.64.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

SPLITS = ("train", "val", "test")


def _one_fold(labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the images in one stratified, grouped fold of about ``fraction`` of the groups."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = len(np.unique(groups))
    n_splits = max(2, round(1.0 / fraction))
    if n_groups < n_splits:
        raise ValueError(
            f"cannot split {n_groups} patients into folds of {fraction:.2f}: need at least {n_splits} patients"
        )
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # "The least populated class in y has only k members": expected for small or unlabelled cohorts.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        _, held_out = next(splitter.split(np.zeros(len(labels)), labels, groups))
    mask = np.zeros(len(labels), dtype=bool)
    mask[held_out] = True
    return mask


def split_by_patient(
    patient_ids: Sequence[str],
    labels: Sequence[int] | None,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> np.ndarray:
    """Assign each image to train, val or test, grouped by patient and stratified by label.

    Args:
        patient_ids: (N,) pseudonymous patient id of each image.
        labels: (N,) integer class of each image, or None for unlabelled data (grouping only).
        val_fraction: wanted share of images in val, in (0, 0.5).
        test_fraction: wanted share of images in test, in [0, 0.5); 0: no test split (a source that fixes its own
            test split: the rest is split into train and val only).
        seed: seeds the shuffling of patients; the same inputs and seed give the same split.

    Returns:
        (N,) array of str, each "train", "val" or "test".

    Raises:
        ValueError: inputs of different lengths, or too few patients for the fractions.
    """
    groups = np.asarray(patient_ids, dtype=str)
    y = np.zeros(len(groups), dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
    if y.shape != groups.shape:
        raise ValueError(f"{len(groups)} patient ids but {len(y)} labels")
    if not 0 < val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction={val_fraction}, test_fraction={test_fraction}: val in (0, 1), test in [0, 1), "
                         "sum < 1")

    out = np.full(len(groups), "train", dtype="<U5")
    test = _one_fold(y, groups, test_fraction, seed) if test_fraction > 0 else np.zeros(len(groups), bool)
    out[test] = "test"
    rest = np.flatnonzero(~test)
    val = _one_fold(y[rest], groups[rest], val_fraction / (1.0 - test_fraction), seed + 1)
    out[rest[val]] = "val"
    check_patient_disjoint(groups, out)
    return out


def check_patient_disjoint(patient_ids: Sequence[str], splits: Sequence[str]) -> None:
    """Raise if any patient has images in more than one split (a leak between train and evaluation).

    Args:
        patient_ids: (N,) patient id of each image.
        splits: (N,) split name of each image.

    Raises:
        ValueError: naming up to five leaking patients and their splits.
    """
    seen: dict[str, set[str]] = {}
    for pid, split in zip(patient_ids, splits, strict=True):
        seen.setdefault(str(pid), set()).add(str(split))
    leaks = {pid: sorted(s) for pid, s in seen.items() if len(s) > 1}
    if leaks:
        shown = ", ".join(f"{pid} in {'+'.join(s)}" for pid, s in sorted(leaks.items())[:5])
        raise ValueError(f"{len(leaks)} patient(s) appear in more than one split: {shown}")
