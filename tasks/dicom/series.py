"""Series geometry: stack the decoded instances of one DICOM series into a volume, and choose series (no pydicom).

Slices are ordered by ImagePositionPatient projected on the slice normal (the cross product of the row and
column direction cosines of ImageOrientationPatient), the convention of dcm2niix and ITK, and the slice spacing
is the median step of those projections, never SliceThickness (which may differ: overlapping or gapped
reconstructions). A series that cannot be one regular volume (missing or duplicated slices, differing
orientation, pixel spacing or size, a tilted gantry, mixed studies) raises :class:`SeriesError` with a stable
reason instead of being stacked by guesswork (MONAI issues 8265 and 8468). Only a series without any geometry
but with InstanceNumber is stacked by a recorded fallback.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from tasks.dicom import DicomImage

if TYPE_CHECKING:
    from tasks.schema import SeriesParams

# Stable reason codes: they end up in quarantine.csv, so only ever add to this set.
SERIES_REASONS = (
    "series_missing_slices",  # a step along the normal over max_gap_factor x the median step
    "series_duplicate_positions",  # two slices (or frames) at one position along the normal
    "series_inconsistent_orientation",  # ImageOrientationPatient differs between slices (a localizer?)
    "series_inconsistent_spacing",  # PixelSpacing differs between slices
    "series_inconsistent_shape",  # Rows/Columns/colour channels differ, or frame positions != frames
    "series_gantry_tilt",  # GantryDetectorTilt != 0, or slice steps not along the normal (sheared volume)
    "series_no_geometry",  # several slices and neither complete position/orientation nor InstanceNumber
    "series_mixed",  # studies, patients, modalities or label-key values differ within the series
    "series_multiframe_mix",  # a multi-frame instance together with other instances
)

ORIENTATION_TOL = 1e-4  # direction cosines that differ by more are another orientation
PIXEL_SPACING_TOL_MM = 1e-4  # PixelSpacing values that differ by more are another sampling
SAME_POSITION_MM = 0.01  # slices closer than this along the normal are at one position
TILT_DEG = 0.01  # GantryDetectorTilt beyond this (degrees) is a tilted acquisition
SHEAR_FRACTION = 0.01  # an in-plane step over this fraction of the step along the normal is a tilt
UNEVEN_FRACTION = 0.01  # steps spread wider than this fraction of the median step are reported
OBLIQUE_BELOW = 0.8  # a normal whose largest patient-axis component is below this (~37 deg off) is oblique


class SeriesError(ValueError):
    """A series that cannot be one volume, with a stable ``reason`` (one of :data:`SERIES_REASONS`).

    The detail holds counts, indices, mm and degrees only, never a value that could identify a patient.
    """

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in SERIES_REASONS:
            raise ValueError(f"unknown SeriesError reason {reason!r}; add it to tasks.dicom.series.SERIES_REASONS")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across worker processes
        return (SeriesError, (self.reason, self.detail))


class Stacked(NamedTuple):
    """A stacked series.

    Attributes:
        pixels: float32 (colour: its integer dtype), (H, W) for one single-frame instance, (F, H, W) for one
            multi-frame instance without per-frame positions (cine, US, XA: frames in stored order), else
            (D, H, W) ascending along the slice normal; colour (``channels == 3``) adds a trailing axis of 3.
        spacing: mm per spatial array axis, in array axis order ((row, col) or (slice, row, col)); None if unknown.
        warning: something a person should know (the InstanceNumber fallback, uneven steps), or None.
    """

    pixels: np.ndarray
    spacing: list[float] | None
    warning: str | None


def slice_normal(iop: Sequence[float]) -> np.ndarray:
    """The unit slice normal, row cosines x column cosines, of an ImageOrientationPatient (6 floats).

    Raises:
        SeriesError: ``series_no_geometry`` when the cosines are not two orthogonal unit vectors.
    """
    row, col = np.asarray(iop[:3], dtype=float), np.asarray(iop[3:], dtype=float)
    normal = np.cross(row, col)
    if abs(np.linalg.norm(row) - 1) > 0.01 or abs(np.linalg.norm(col) - 1) > 0.01 or abs(row @ col) > 0.01:
        raise SeriesError("series_no_geometry", "ImageOrientationPatient is not two orthogonal unit vectors")
    return normal / np.linalg.norm(normal)


def orientation_of(iop: Sequence[float]) -> str:
    """The orientation name: "axial", "coronal" or "sagittal" by the patient axis (z, y, x) nearest the normal.

    The normal is "oblique" when its largest component is below :data:`OBLIQUE_BELOW` (0.8, i.e. more than about
    37 degrees from every patient axis).

    Args:
        iop: ImageOrientationPatient, row then column direction cosines (6 floats).
    """
    normal = np.abs(slice_normal(iop))
    if normal.max() < OBLIQUE_BELOW:
        return "oblique"
    return ("sagittal", "coronal", "axial")[int(np.argmax(normal))]


def _frame(im: DicomImage) -> tuple[int, ...]:
    return (im.rows, im.columns, 3) if im.channels == 3 else (im.rows, im.columns)


def _check_instances(images: Sequence[DicomImage]) -> None:
    """Several single-frame instances: same study, patient, modality, label, size and pixel spacing."""
    n = len(images)
    if any(im.n_frames != 1 for im in images):
        multi = sum(im.n_frames != 1 for im in images)
        raise SeriesError("series_multiframe_mix", f"{multi} multi-frame instance(s) among {n} instances")
    for what, values in (
        ("StudyInstanceUID", {im.ids.study_uid for im in images}),
        ("PatientID", {im.ids.patient_id for im in images}),
        ("Modality", {im.modality for im in images}),
        ("label-key value", {im.ids.label_value for im in images}),
    ):
        if len(values) > 1:  # the count only: the values may be identifying
            raise SeriesError("series_mixed", f"{n} instances differ in {what} ({len(values)} distinct values)")
    shapes = {_frame(im) for im in images}
    if len(shapes) > 1:
        raise SeriesError("series_inconsistent_shape", f"{n} instances have {len(shapes)} Rows x Columns (x RGB)")
    spacings = [im.pixel_spacing for im in images]
    if any(s is None for s in spacings) != all(s is None for s in spacings) or (
        spacings[0] is not None and not np.allclose(spacings, spacings[0], atol=PIXEL_SPACING_TOL_MM)
    ):
        raise SeriesError("series_inconsistent_spacing", f"PixelSpacing differs (or is absent) among {n} instances")


def _check_tilt(images: Sequence[DicomImage]) -> None:
    tilt = max(abs(im.gantry_tilt) for im in images)
    if tilt > TILT_DEG:
        raise SeriesError("series_gantry_tilt", f"GantryDetectorTilt {tilt:.3g} deg; the volume would be sheared")


def _order(positions: np.ndarray, normal: np.ndarray, max_gap_factor: float) -> tuple[np.ndarray, float, str | None]:
    """Sort (N, 3) positions along ``normal`` and check that they are one regular, untilted stack.

    Returns:
        (order (N,), median step along the normal in mm, warning or None)

    Raises:
        SeriesError: duplicate positions, a tilted (sheared) stack, or missing slices.
    """
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    gaps = np.diff(along[order])
    n = len(order)
    if np.any(gaps < SAME_POSITION_MM):
        raise SeriesError(
            "series_duplicate_positions",
            f"{int(np.sum(gaps < SAME_POSITION_MM))} of {n} slices repeat a position (several acquisitions?)",
        )
    steps = np.diff(positions[order], axis=0)
    in_plane = np.linalg.norm(steps - np.outer(steps @ normal, normal), axis=1)
    if np.any(in_plane > SHEAR_FRACTION * gaps + 1e-3):
        angle = float(np.degrees(np.arctan2(in_plane.max(), gaps[int(np.argmax(in_plane))])))
        raise SeriesError(
            "series_gantry_tilt", f"slice positions step {angle:.3g} deg off the slice normal (tilt or shear)"
        )
    step = float(np.median(gaps))
    big = np.flatnonzero(gaps > max_gap_factor * step)
    if big.size:
        missing = int(sum(max(1, round(gaps[k] / step) - 1) for k in big))
        where = ", ".join(f"{k}-{k + 1}" for k in big[:5]) + (" ..." if big.size > 5 else "")
        raise SeriesError(
            "series_missing_slices",
            f"about {missing} slice(s) missing between sorted slice indices {where} of {n} "
            f"(gap up to {gaps[big].max():.3g} mm, median step {step:.3g} mm)",
        )
    warning = None
    if np.ptp(gaps) > UNEVEN_FRACTION * step + 1e-3:
        warning = f"uneven slice spacing {gaps.min():.3g}..{gaps.max():.3g} mm (median used)"
    return order, step, warning


def _spacing(step: float | None, row_col: list[float] | None) -> list[float] | None:
    return [step, *row_col] if row_col and step else None


def stack_series(images: Sequence[DicomImage], max_gap_factor: float = 1.5) -> Stacked:
    """Stack one series' decoded instances into an image or a volume, or refuse.

    * one single-frame instance: (H, W), spacing (row, col) mm;
    * one multi-frame instance with ``frame_positions`` (enhanced CT/MR): frames sorted along the normal, (D, H, W),
      slice spacing from the positions;
    * one multi-frame instance without them (cine, US, XA): (F, H, W) as stored, spacing (SliceThickness, row, col)
      or None;
    * several single-frame instances: sorted along the normal, (D, H, W), slice spacing from the positions; with no
      position/orientation at all but InstanceNumber on every instance, sorted by it with a warning and
      SliceThickness as the (assumed) slice spacing.

    Colour instances (``channels == 3``) keep a trailing axis of 3.

    Args:
        images: the readable instances of one series, in any order (at least one).
        max_gap_factor: a step along the normal over this x the median step means missing slices (> 1).

    Returns:
        float32 pixels, spacing in mm per spatial axis, and an optional warning (see :class:`Stacked`).

    Raises:
        SeriesError: the instances cannot form one regular volume; ``reason`` is one of :data:`SERIES_REASONS`
            and the detail names the cause, never an identifying value.
    """
    first = images[0]
    row_col = [float(s) for s in first.pixel_spacing] if first.pixel_spacing else None
    if len(images) == 1 and first.n_frames == 1:
        return Stacked(first.pixels.reshape(_frame(first)).astype(first.pixels.dtype, copy=False), row_col, None)
    if len(images) == 1:
        frames = first.pixels.reshape(first.n_frames, *_frame(first)).astype(first.pixels.dtype, copy=False)
        if first.frame_positions is None:
            return Stacked(frames, _spacing(first.slice_thickness, row_col), None)
        if len(first.frame_positions) != first.n_frames:
            raise SeriesError(
                "series_inconsistent_shape", f"{len(first.frame_positions)} frame positions for {first.n_frames} frames"
            )
        if first.image_orientation is None:
            raise SeriesError("series_no_geometry", "frame positions without ImageOrientationPatient")
        _check_tilt(images)
        normal = slice_normal(first.image_orientation)
        order, step, warning = _order(np.array(first.frame_positions, dtype=float), normal, max_gap_factor)
        return Stacked(frames[order], _spacing(step, row_col), warning)

    _check_instances(images)
    n = len(images)
    with_geometry = sum(im.image_orientation is not None and im.image_position is not None for im in images)
    if with_geometry == n:
        orient = np.array([im.image_orientation for im in images], dtype=float)
        if not np.allclose(orient, orient[0], atol=ORIENTATION_TOL):
            distinct = len({tuple(np.round(o, 4)) for o in orient})
            raise SeriesError(
                "series_inconsistent_orientation",
                f"{n} slices have {distinct} ImageOrientationPatient (a localizer in the series?)",
            )
        _check_tilt(images)
        positions = np.array([im.image_position for im in images], dtype=float)
        order, step, warning = _order(positions, slice_normal(orient[0]), max_gap_factor)
    elif with_geometry == 0 and all(im.instance_number is not None for im in images):
        numbers = np.array([im.instance_number for im in images])
        order = np.argsort(numbers, kind="stable")
        if len(set(numbers.tolist())) < n:
            raise SeriesError("series_duplicate_positions", f"{n - len(set(numbers.tolist()))} InstanceNumber repeats")
        step = first.slice_thickness
        warning = "no ImagePositionPatient/ImageOrientationPatient: slices sorted by InstanceNumber"
        warning += ", SliceThickness taken as slice spacing" if step else ", slice spacing unknown"
    else:
        raise SeriesError(
            "series_no_geometry",
            f"{n - with_geometry} of {n} slices lack ImagePositionPatient/ImageOrientationPatient "
            "and not all have InstanceNumber",
        )
    volume = np.stack([images[k].pixels.reshape(_frame(first)) for k in order])  # float32, or integer RGB
    return Stacked(volume, _spacing(step, row_col), warning)


def select_series(images: Sequence[DicomImage], n_slices: int, params: SeriesParams) -> tuple[bool, str]:
    """Whether a stacked series is used, and why, for the manifest.

    Checks, in order: modality, BodyPartExamined, orientation (of the first instance's ImageOrientationPatient),
    number of slices. Modality and body part are not identifying, so the reason may name them.

    Args:
        images: the series' instances (as given to :func:`stack_series`).
        n_slices: D of the stacked volume, F of a multi-frame one, 1 for a 2D image.
        params: the ``ingest.series`` settings.

    Returns:
        (used, reason), e.g. ``(True, "used: CT, CHEST, axial, 120 slices")`` or
        ``(False, "skipped: orientation coronal, want axial")``.
    """
    first = images[0]
    modalities = [m.upper() for m in params.modalities]
    if modalities and first.modality.upper() not in modalities:
        return False, f"skipped: modality {first.modality} not in [{', '.join(modalities)}]"
    parts, wanted = sorted({im.body_part.upper() for im in images}), [b.upper() for b in params.body_parts]
    if wanted and any(p not in wanted for p in parts):
        shown = ", ".join(p or "<absent>" for p in parts)
        return False, f"skipped: body part {shown} not in [{', '.join(wanted)}]"
    try:
        orientation = orientation_of(first.image_orientation) if first.image_orientation else None
    except SeriesError:  # cosines that are no orientation: as good as none
        orientation = None
    if params.orientation != "any" and orientation != params.orientation:
        shown = orientation or "unknown (no ImageOrientationPatient)"
        return False, f"skipped: orientation {shown}, want {params.orientation}"
    noun = "slice" if n_slices == 1 else "slices"
    if n_slices < params.min_slices:
        return False, f"skipped: {n_slices} {noun} < min_slices {params.min_slices}"
    described = [first.modality, *(p for p in parts if p), *([orientation] if orientation else [])]
    return True, f"used: {', '.join(described)}, {n_slices} {noun}"
