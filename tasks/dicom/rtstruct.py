"""DICOM RT Structure Sets (RTSTRUCT): ROI contours rasterised onto an image's grid.

:func:`read_contours` reads a structure set into :class:`RtContours` (plain data, picklable: ingest reads files in
worker processes); :func:`rasterise` puts them on an image's slices, given ingest's geometry of the image
(``ImageRecord.geometry``): contour points (patient mm) go to pixel indices with highdicom's
:class:`highdicom.spatial.ReferenceToPixelTransformer`, and each closed planar contour is filled by the
centre-in-polygon rule (matplotlib's ``Path.contains_points``: a pixel is inside when its centre is). Contours of
one ROI on one slice are combined by even-odd (an inner contour is a hole), the convention of RT planning systems.
ROI names are matched to the class list case-insensitively.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

# a contour whose plane lies further than this fraction of the slice step from a slice is not on the image's grid
OFF_SLICE_FRACTION = 0.1


class RtStructError(ValueError):
    """A structure set that cannot be placed on an image: unreadable, or contours off its grid."""


@dataclass(frozen=True)
class RtContours:
    """A structure set's closed planar contours.

    Attributes:
        frame_of_reference: the ReferencedFrameOfReferenceUID of the ROIs ("" when absent).
        series_uids: the image series the structure set references (RT Referenced Series), may be empty.
        rois: (ROI name, contours) per ROI with contours; each contour (N, 3) float, patient coordinates in mm.
        notes: what was left out (open contours, ROIs without contours).
        sop_uid: the structure set's own SOPInstanceUID.
    """

    frame_of_reference: str
    series_uids: tuple[str, ...]
    rois: tuple[tuple[str, tuple[np.ndarray, ...]], ...]
    notes: tuple[str, ...] = ()
    sop_uid: str = ""

    def with_uids(self, remap: Callable[[str], str]) -> RtContours:
        """The same contours with the UIDs mapped (ingest's pseudonymiser, as for the images)."""
        return replace(self, frame_of_reference=remap(self.frame_of_reference) if self.frame_of_reference else "",
                       series_uids=tuple(remap(u) for u in self.series_uids),
            sop_uid=remap(self.sop_uid) if self.sop_uid else "")  # fmt: skip


def read_contours(dataset: Any) -> RtContours:
    """The ROIs' closed planar contours of an RTSTRUCT (a pydicom data set, or a file).

    Raises:
        RtStructError: unreadable, no StructureSetROISequence / ROIContourSequence, or contour data that do not
            parse.
    """
    from pathlib import Path

    from tasks.dicom.errors import parse_errors, quiet_pydicom

    with quiet_pydicom():
        try:
            if isinstance(dataset, (str, Path)):
                import pydicom

                dataset = pydicom.dcmread(dataset)
            names = {int(r.ROINumber): str(r.get("ROIName", "")) for r in dataset.StructureSetROISequence}
            frames = {str(r.get("ReferencedFrameOfReferenceUID", "")) for r in dataset.StructureSetROISequence}
            frames |= {str(f.FrameOfReferenceUID) for f in dataset.get("ReferencedFrameOfReferenceSequence", [])
                       if f.get("FrameOfReferenceUID")}  # fmt: skip
            series = []
            for ref in dataset.get("ReferencedFrameOfReferenceSequence", []):
                for study in ref.get("RTReferencedStudySequence", []):
                    series += [str(s.SeriesInstanceUID) for s in study.get("RTReferencedSeriesSequence", [])]
            rois, notes = [], []
            for item in dataset.ROIContourSequence:
                name = names.get(int(item.ReferencedROINumber), f"ROI {int(item.ReferencedROINumber)}")
                contours = []
                for contour in item.get("ContourSequence", []):
                    kind = str(contour.get("ContourGeometricType", "CLOSED_PLANAR"))
                    if kind != "CLOSED_PLANAR":
                        notes.append(f"ROI {name!r}: a {kind} contour left out (only CLOSED_PLANAR is filled)")
                        continue
                    contours.append(np.asarray([float(v) for v in contour.ContourData], float).reshape(-1, 3))
                if contours:
                    rois.append((name, tuple(contours)))
                else:
                    notes.append(f"ROI {name!r}: no closed planar contours")
        except (*parse_errors(), AttributeError, KeyError, ValueError, TypeError, OSError) as exc:
            raise RtStructError(f"not a usable RT Structure Set: {type(exc).__name__}: {exc}"[:300]) from None
    frames.discard("")
    if len(frames) > 1:
        raise RtStructError(f"ROIs in {len(frames)} frames of reference: one image grid cannot hold them")
    sop_uid = str(dataset.get("SOPInstanceUID", "") or "")
    return RtContours(next(iter(frames), ""), tuple(dict.fromkeys(series)), tuple(rois), tuple(notes), sop_uid)


def rasterise(contours: RtContours, image_geometry: dict,
              class_names: Sequence[str]) -> tuple[np.ndarray, list[str]]:  # fmt: skip
    """Fill the contours on the image's slices.

    Args:
        contours: from :func:`read_contours` (UIDs mapped like the image's).
        image_geometry: the image's DICOM geometry (ingest): ``image_positions`` per slice in stacked order,
            ``image_orientation``, ``pixel_spacing`` (row, column mm), ``rows``, ``columns``.
        class_names: foreground class names; ROI names match them case-insensitively (value = 1 + index).

    Returns:
        (uint8 label map (S, H, W), or (H, W) for a 2D image (one slice), notes): ROIs whose name is not a class are
        left out (noted); where ROIs overlap the higher class value is kept (noted).

    Raises:
        RtStructError: a contour off the image's slices (between slices, outside the volume, or not planar in
            the image's plane): the structure set does not fit the image.
    """
    import highdicom as hd
    from matplotlib.path import Path as Polygon

    g = image_geometry
    positions = np.asarray(g["image_positions"], float)
    rows, cols = int(g["rows"]), int(g["columns"])
    iop = [float(v) for v in g["image_orientation"]]
    normal = np.cross(iop[:3], iop[3:])
    along = positions @ normal
    step = float(np.median(np.diff(along))) if len(along) > 1 else 1.0
    to_pixel = hd.spatial.ReferenceToPixelTransformer(
        image_position=positions[0].tolist(), image_orientation=iop,
        pixel_spacing=[float(v) for v in g["pixel_spacing"]], spacing_between_slices=step, round_output=False,
    )  # fmt: skip
    lower = [c.strip().lower() for c in class_names]
    notes = list(contours.notes)
    out = np.zeros((len(positions), rows, cols), np.uint8)
    count = np.zeros_like(out)
    centres = np.stack(np.meshgrid(np.arange(cols), np.arange(rows)), axis=-1).reshape(-1, 2)  # (col, row)
    ordered = []
    for name, rings in contours.rois:
        if name.strip().lower() in lower:
            ordered.append((lower.index(name.strip().lower()) + 1, name, rings))
        else:
            notes.append(f"ROI {name!r} is not in the class list ({', '.join(class_names)}): left out")
    for value, name, rings in sorted(ordered, key=lambda t: t[0]):  # the higher class value wins an overlap
        roi = np.zeros(out.shape, bool)
        for ring in rings:
            idx = to_pixel(ring)  # (column, row, slice) indices, floats
            k = float(np.median(idx[:, 2]))
            if np.ptp(idx[:, 2]) > 2 * OFF_SLICE_FRACTION or abs(k - round(k)) > OFF_SLICE_FRACTION:
                raise RtStructError(f"ROI {name!r}: a contour at {k:.3g} slice steps from the first slice is not on "
                                    "a slice of the image (or not in its plane)")  # fmt: skip
            k = round(k)
            if not 0 <= k < len(positions):
                raise RtStructError(f"ROI {name!r}: a contour on slice {k}, outside the image's {len(positions)} "
                                    "slices")  # fmt: skip
            inside = Polygon(idx[:, :2]).contains_points(centres).reshape(rows, cols)
            roi[k] ^= inside  # even-odd: a contour inside another is a hole
        out[roi] = value
        count += roi
    overlap = int((count > 1).sum())
    if overlap:
        notes.append(f"overlapping ROIs: {overlap} voxels in more than one ROI (highest class kept)")
    return out, notes


def read_rtstruct(dataset: Any, image_geometry: dict,
                  class_names: Sequence[str] = ("lung", "lesion")) -> tuple[np.ndarray, list[str]]:  # fmt: skip
    """An RTSTRUCT's ROIs as a label map on an image (:func:`read_contours` then :func:`rasterise`).

    The referenced frame of reference must be the image's (``image_geometry["frame_of_reference_uid"]``), and a
    referenced series, when the structure set names any, the image's (``series_instance_uid``); the caller maps
    UIDs the same way on both sides first (ingest: its pseudonymiser).

    Raises:
        RtStructError: unreadable, another frame of reference or series, or contours off the image's grid.
    """
    contours = read_contours(dataset)
    problem = reference_mismatch(contours, image_geometry)
    if problem:
        raise RtStructError(problem)
    return rasterise(contours, image_geometry, class_names)


def reference_mismatch(contours: RtContours, image_geometry: dict) -> str | None:
    """Why a structure set does not belong on an image (frame of reference, series), or None.

    Ingest checks the frame of reference with :func:`tasks.sources.masks.geometry_mismatch` first (with the rest of
    the geometry); this plain comparison is for a caller outside ingest (tasks.dicom sits below tasks.sources).
    """
    frame = image_geometry.get("frame_of_reference_uid") or ""
    if contours.frame_of_reference and frame and contours.frame_of_reference != frame:
        return "frame of reference differs from the image's"
    series = image_geometry.get("series_instance_uid") or ""
    if contours.series_uids and series and series not in contours.series_uids:
        return "the structure set references other series than the image's"
    return None
