"""DICOM SEG and RTSTRUCT masks attached to the DICOM images they reference (:mod:`tasks.sources.dicom_folder`).

Each mask file, read by an ingest worker (:mod:`tasks.dicom.seg`, :mod:`tasks.dicom.rtstruct`) with its UIDs mapped
by the images' pseudonymiser, is matched to the image of the series it references; its geometry is checked against
that image's per frame (:func:`tasks.sources.masks.geometry_mismatch`: size, spacing, orientation, position, frame
of reference). A mask that does not fit is quarantined (``mask_geometry``), never resampled; one that references no
ingested image is ``mask_orphan``; a second mask for the same image ``mask_duplicate``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tasks.sources.records import ImageRecord

QuarantineRow = tuple[str, str, str]


@dataclass(frozen=True)
class MaskFile:
    """A SEG or RTSTRUCT file read in a worker: its content with UIDs already mapped, or why it is unreadable."""

    kind: str  # "SEG" or "RTSTRUCT"
    data: Any = None  # tasks.dicom.seg.SegMask or tasks.dicom.rtstruct.RtContours; None when unreadable
    error: str = ""  # why it could not be read (mask_unreadable)


def _slice_geometry(g: dict[str, Any], k: int) -> Any:
    """:class:`tasks.sources.masks.Geometry` of slice ``k`` of an image's DICOM geometry."""
    from tasks.sources.masks import Geometry

    positions = g.get("image_positions")
    return Geometry(
        (int(g["rows"]), int(g["columns"])), spacing=tuple(g["pixel_spacing"]) if g.get("pixel_spacing") else None,
        origin=tuple(positions[k]) if positions else None,
        direction=tuple(g["image_orientation"]) if g.get("image_orientation") else None,
        frame_of_reference=g.get("frame_of_reference_uid") or None,
    )  # fmt: skip


def _seg_mismatch(seg: Any, g: dict[str, Any]) -> str | None:
    """What differs between a SEG's frames and the slices they reference (the first frame that differs), or None."""
    from tasks.sources.masks import Geometry, geometry_mismatch

    index = {uid: k for k, uid in enumerate(g["sop_instance_uids"])}
    outside = sum(uid not in index for uid in seg.source_sop_uids)
    if outside:
        return f"{outside} frame(s) reference instances that are not slices of image series {g['series_instance_uid']}"
    for n, uid in enumerate(seg.source_sop_uids):
        k = index[uid]
        mask = Geometry(
            seg.shape, spacing=seg.pixel_spacing,
            origin=tuple(seg.positions[n]) if seg.positions is not None else None,
            direction=seg.orientation, frame_of_reference=seg.frame_of_reference or None,
        )  # fmt: skip
        problem = geometry_mismatch(_slice_geometry(g, k), mask)
        if problem:
            return problem if len(index) == 1 else f"frame on slice {k}: {problem}"
    return None


def _spatial(record: ImageRecord, labels: np.ndarray) -> np.ndarray:
    """A (S, H, W) label map in the record's spatial shape ((H, W) for a 2D image)."""
    spatial = record.pixels.shape[1:] if record.channels > 1 else record.pixels.shape
    return labels.reshape(spatial)


def attach_masks(masks: list[tuple[str, MaskFile]], images: list[ImageRecord],
                 classes: list[str]) -> list[QuarantineRow]:  # fmt: skip
    """Attach each SEG / RTSTRUCT to the image of the series it references, after the geometry check.

    A record gets ``mask`` (uint8, its spatial shape; values checked by :func:`tasks.sources.masks.
    check_mask_values`, notes prefixed ``mask:``), ``mask_source`` and the mask file among its ``files``.

    Args:
        masks: (file pseudonym, mask read by a worker, UIDs already mapped) per mask file.
        images: the stacked images (their ``geometry`` from :func:`dicom_geometry`); changed in place.
        classes: ``ingest.masks.classes``.

    Returns:
        Quarantine rows: ``mask_orphan`` (no ingested image of the referenced series or frame of reference),
        ``mask_geometry`` (it does not fit its image: what differs), ``mask_duplicate`` (the image has a mask
        already, from the file named).
    """
    from tasks.dicom.rtstruct import RtStructError, rasterise, reference_mismatch
    from tasks.dicom.seg import SegError
    from tasks.sources.masks import Geometry, check_mask_values, geometry_mismatch

    by_series = {im.series_uid: im for im in images if im.geometry and im.geometry.get("kind") == "dicom"}
    mask_file: dict[str, str] = {}
    rows: list[QuarantineRow] = []
    for file, mask in sorted(masks, key=lambda fm: fm[0]):
        data = mask.data
        if mask.kind == "SEG":
            record = by_series.get(data.series_uid)
        else:  # RTSTRUCT: its referenced series, else the one image in its frame of reference
            candidates = [by_series[u] for u in data.series_uids if u in by_series]
            if not data.series_uids and data.frame_of_reference:
                candidates = [im for im in by_series.values()
                              if im.geometry.get("frame_of_reference_uid") == data.frame_of_reference]  # fmt: skip
            record = candidates[0] if len(candidates) == 1 else None
        if record is None:
            refs = data.series_uid if mask.kind == "SEG" else ", ".join(data.series_uids) or "(none)"
            rows.append((file, "mask_orphan", f"{mask.kind} references series {refs}: no image of it was ingested "
                                              "(absent, or quarantined)"))  # fmt: skip
            continue
        g = record.geometry
        try:
            if mask.kind == "SEG":
                problem = _seg_mismatch(data, g)
                if problem is None:
                    labels, notes = data.to_label_map(g["sop_instance_uids"], classes)
            else:
                problem = geometry_mismatch(  # the frame of reference: all a structure set's geometry says
                    Geometry((g["rows"], g["columns"]), frame_of_reference=g.get("frame_of_reference_uid") or None),
                    Geometry((g["rows"], g["columns"]), frame_of_reference=data.frame_of_reference or None),
                ) or (reference_mismatch(data, g) if g.get("image_positions") else "the image has no positions")
                if problem is None:
                    labels, notes = rasterise(data, g, classes)
        except (SegError, RtStructError) as exc:
            problem = str(exc)
        if problem is not None:
            rows.append((file, "mask_geometry", f"{mask.kind} for image {record.image_id}: {problem}"))
            continue
        if record.image_id in mask_file:
            rows.append((file, "mask_duplicate", f"image {record.image_id} has a mask already "
                                                 f"({mask_file[record.image_id]})"))  # fmt: skip
            continue
        values, value_notes = check_mask_values(_spatial(record, labels), classes)
        record.mask, record.mask_source = values, mask.kind
        record.notes = [*record.notes, *(f"mask: {n}" for n in [*notes, *value_notes])]
        record.files = [*record.files, file]
        mask_file[record.image_id] = file
    return rows
