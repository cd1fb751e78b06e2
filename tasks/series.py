"""Series geometry: stack the decoded instances of one DICOM series into a volume (no pydicom here).

Slices are ordered by ImagePositionPatient projected on the slice normal (the cross product of the row and
column direction cosines of ImageOrientationPatient), the convention of dcm2niix and ITK; InstanceNumber is a
recorded fallback when the geometry is missing. Issue 4's series selection (localizers, several acquisitions
in one series, enhanced multi-frame per-frame geometry) belongs here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from tasks.dicom import DicomImage


class Stacked(NamedTuple):
    """A stacked series.

    Attributes:
        pixels: float32, (H, W) for one single-frame instance, (F, H, W) for one multi-frame instance, else
            (D, H, W) ascending along the slice normal.
        spacing: mm per array axis, in array axis order ((row, col) or (slice, row, col)); None if unknown.
        warning: something a person should know (e.g. the ordering fallback), or None.
    """

    pixels: np.ndarray
    spacing: list[float] | None
    warning: str | None


def _check_consistent(images: Sequence[DicomImage]) -> None:
    if any(im.n_frames != 1 for im in images):
        raise ValueError("multi-frame instances in a multi-instance series are not supported yet")
    for what, values in (
        ("Rows x Columns", {(im.rows, im.columns) for im in images}),
        ("StudyInstanceUID", {im.ids.study_uid for im in images}),
        ("PatientID", {im.ids.patient_id for im in images}),
        ("Modality", {im.modality for im in images}),
        ("label-key value", {im.ids.label_value for im in images}),
    ):
        if len(values) > 1:  # the count only: the values may be identifying
            raise ValueError(f"{len(images)} instances differ in {what} ({len(values)} distinct values)")


def stack_series(images: Sequence[DicomImage]) -> Stacked:
    """Stack one series' decoded instances.

    Args:
        images: the readable instances of one series, in any order.

    Returns:
        The volume, its spacing and an optional warning (see :class:`Stacked`).

    Raises:
        ValueError: the instances cannot form one volume (sizes, orientations or studies differ, two slices at
            one position, no geometry and no InstanceNumber); the message names the cause, never a value.
    """
    first = images[0]
    row_col = [float(s) for s in first.pixel_spacing] if first.pixel_spacing else None
    if len(images) == 1:
        if first.n_frames == 1:
            return Stacked(first.pixels.reshape(first.rows, first.columns), row_col, None)
        depth = first.slice_thickness  # per-frame geometry of enhanced objects: issue 4
        return Stacked(first.pixels, [depth, *row_col] if row_col and depth else None, None)

    _check_consistent(images)
    warning = None
    if all(im.image_orientation and im.image_position for im in images):
        orient = np.array([im.image_orientation for im in images], dtype=float)
        if not np.allclose(orient, orient[0], atol=1e-4):
            raise ValueError("slices differ in ImageOrientationPatient (a localizer in the series?)")
        normal = np.cross(orient[0, :3], orient[0, 3:])
        along = np.array([im.image_position for im in images], dtype=float) @ normal
    elif all(im.instance_number is not None for im in images):
        along = np.array([im.instance_number for im in images], dtype=float)
        warning = "no ImagePositionPatient/ImageOrientationPatient: slices sorted by InstanceNumber"
    else:
        raise ValueError("no ImagePositionPatient/ImageOrientationPatient nor InstanceNumber to order the slices")

    order = np.argsort(along, kind="stable")
    gaps = np.diff(along[order])
    if np.any(gaps < 1e-3):
        raise ValueError(f"{int(np.sum(gaps < 1e-3)) + 1} slices share a position (several acquisitions?)")
    if warning is None:
        step = float(np.median(gaps))
        if np.ptp(gaps) > 0.01 * step + 1e-3:
            warning = f"uneven slice spacing {gaps.min():.3g}..{gaps.max():.3g} mm (median used)"
    else:
        step = first.slice_thickness
    volume = np.stack([images[k].pixels.reshape(first.rows, first.columns) for k in order]).astype(np.float32)
    return Stacked(volume, [step, *row_col] if row_col and step else None, warning)
