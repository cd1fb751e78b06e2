"""Checks every mask source shares: does a mask fit its image, and are its values what the class list allows.

A mask that does not fit (size, spacing, orientation, origin, frame of reference) is never resampled: the source
quarantines the mask file with :func:`geometry_mismatch`'s reason and keeps the image without a mask. Values are
checked by :func:`check_mask_values`: empty masks, labels outside the class list and non-binary values are reported
(notes), never silently changed beyond the one documented mapping (an 8-bit {0, 255} mask is binary: 255 -> 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MASK_REASONS = {
    "mask_geometry": "the mask does not fit its image (size, spacing, orientation, origin or frame of reference)",
    "mask_unreadable": "the mask file could not be read",
    "mask_orphan": "the mask refers to no image that was ingested",
    "mask_duplicate": "a second mask for an image that has one already",
}


@dataclass(frozen=True)
class Geometry:
    """Where an image's (or a mask's) voxels lie. Unknown parts are None and are not compared.

    Attributes:
        shape: spatial shape, (H, W) or (S, H, W).
        spacing: mm per voxel along the same axes as ``shape``.
        origin: patient coordinates (mm) of the first voxel's centre.
        direction: the axes' unit direction cosines, flattened (DICOM: row cosines then column cosines; NIfTI/NRRD:
            the 3x3 direction matrix row-major).
        frame_of_reference: DICOM FrameOfReferenceUID (pseudonymised the same way on both sides) or None.
    """

    shape: tuple[int, ...]
    spacing: tuple[float, ...] | None = None
    origin: tuple[float, ...] | None = None
    direction: tuple[float, ...] | None = None
    frame_of_reference: str | None = None


def _fmt(values: tuple[float, ...], unit: str = "") -> str:
    return "x".join(f"{v:.4g}" for v in values) + unit


def geometry_mismatch(image: Geometry, mask: Geometry, *, atol_mm: float = 1e-3, rtol: float = 1e-3,
                      atol_cos: float = 1e-4) -> str | None:  # fmt: skip
    """What differs between a mask's geometry and its image's, or None when it fits.

    Spacing is compared relatively (``rtol``) and absolutely (``atol_mm``), origins within ``atol_mm`` plus 1e-3 of
    a voxel, direction cosines within ``atol_cos``. Parts that either side does not know (None) are not compared.

    Returns:
        e.g. ``"size 512x512 vs image 256x256"``; several differences are joined with ``"; "``.
    """
    problems = []
    if tuple(mask.shape) != tuple(image.shape):
        problems.append(f"size {_fmt(mask.shape)} vs image {_fmt(image.shape)}")
    if image.spacing is not None and mask.spacing is not None:
        a, b = np.asarray(image.spacing, float), np.asarray(mask.spacing, float)
        if a.shape != b.shape or not np.allclose(a, b, rtol=rtol, atol=atol_mm):
            problems.append(f"spacing {_fmt(mask.spacing, ' mm')} vs image {_fmt(image.spacing, ' mm')}")
    if image.direction is not None and mask.direction is not None:
        a, b = np.asarray(image.direction, float), np.asarray(mask.direction, float)
        if a.shape != b.shape or not np.allclose(a, b, atol=atol_cos):
            problems.append(f"orientation {_fmt(mask.direction)} vs image {_fmt(image.direction)}")
    if image.origin is not None and mask.origin is not None:
        a, b = np.asarray(image.origin, float), np.asarray(mask.origin, float)
        tol = atol_mm + 1e-3 * (min(image.spacing) if image.spacing else 1.0)
        if a.shape != b.shape or not np.allclose(a, b, rtol=0, atol=tol):
            problems.append(f"origin {_fmt(mask.origin, ' mm')} vs image {_fmt(image.origin, ' mm')}")
    if image.frame_of_reference and mask.frame_of_reference and image.frame_of_reference != mask.frame_of_reference:
        problems.append("frame of reference differs from the image's")
    return "; ".join(problems) or None


def check_mask_values(mask: np.ndarray, class_names: list[str]) -> tuple[np.ndarray, list[str]]:
    """Validate a label map's values against the foreground class list (``ingest.masks.classes``).

    Args:
        mask: integer or boolean label map (any shape); 0 = background, v = ``class_names[v - 1]``.
        class_names: the foreground class names (K of them: values 1..K allowed).

    Returns:
        (uint8 label map, notes). The one mapping applied: a mask whose only values are {0, 255} (an 8-bit binary
        image) becomes {0, 1}. Values outside 0..K are set to 0 with a note naming them (``labels outside the class
        list``); an all-zero mask gets the note ``empty mask``; non-integer (fractional) values are rounded with a note
        ``non-binary values``.
    """
    notes: list[str] = []
    arr = np.asarray(mask)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            notes.append("non-binary values: fractional mask values rounded to the nearest label")
        arr = np.round(np.nan_to_num(arr, nan=0.0))
    values = set(np.unique(arr).tolist())
    k = len(class_names)
    if values == {0, 255} or values == {255}:
        arr = (arr == 255).astype(np.uint8)
        values = {int(v) for v in np.unique(arr)}
    elif k == 1 and len(values - {0}) > 1:
        notes.append(f"non-binary values: {sorted(int(v) for v in values)} in a one-class mask")
    outside = sorted(int(v) for v in values if v < 0 or v > k)
    if outside:
        notes.append(f"labels outside the class list: {outside} (classes 1..{k}: {', '.join(class_names)}); set to 0")
        arr = np.where((arr < 0) | (arr > k), 0, arr)
    out = arr.astype(np.uint8)
    if not out.any():
        notes.append("empty mask")
    return out, notes
