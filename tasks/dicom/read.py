"""Reading DICOM: one Part 10 file to a :class:`DicomImage` (pixels in modality units, geometry, flags).

Every failure is a :class:`DicomError` with a short, stable reason code, so that a stage can quarantine the file
and go on.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Stable reason codes: they end up in quarantine.csv and summary.json, so only ever add to this set.
REASONS = (
    "empty_file",  # zero bytes
    "unreadable",  # the operating system could not read it
    "not_dicom",  # no DICOM Part 10 preamble/prefix ("DICM"); read with force=False
    "truncated",  # the file ends inside an element (header or pixel data)
    "no_pixel_data",  # a DICOM object without (7FE0,0010) Pixel Data (SR, presentation state, DICOMDIR, ...)
    "unsupported_photometric",  # not MONOCHROME1/MONOCHROME2 single-sample (RGB, YBR, PALETTE COLOR, ...)
    "decode_failed",  # pixel data present but could not be decoded (codec missing, corrupt, bad group 0028)
)

_GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
_UNDEFINED_LENGTH = 0xFFFFFFFF


class DicomError(Exception):
    """A file that cannot be used, with a stable ``reason`` code (one of :data:`REASONS`) and a human detail.

    The detail never contains values of identifying attributes: only keywords, sizes and library messages.
    """

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown DicomError reason {reason!r}; add it to tasks.dicom.REASONS")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across worker processes
        return (DicomError, (self.reason, self.detail))


@dataclass(frozen=True)
class SourceIds:
    """Identifying values read from the file. Never write them anywhere: pseudonymise with :mod:`tasks.deid`.

    Attributes:
        patient_id: (0010,0020) PatientID, "" when absent.
        study_uid: (0020,000D) StudyInstanceUID.
        series_uid: (0020,000E) SeriesInstanceUID.
        sop_uid: (0008,0018) SOPInstanceUID.
        study_date: (0008,0020) StudyDate as DICOM DA ``YYYYMMDD``, "" when absent.
        label_value: the value of the label-key attribute (e.g. AccessionNumber), None when absent.
    """

    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    study_date: str
    label_value: str | None


@dataclass(frozen=True)
class DicomImage:
    """One decoded DICOM instance.

    Attributes:
        pixels: float32 array, (H, W) for a single frame or (F, H, W) for a multi-frame object, after the
            Modality LUT (Hounsfield units for CT) and with MONOCHROME1 inverted so that higher means brighter.
        modality: (0008,0060) Modality, e.g. "CT".
        unit: "HU" for CT, otherwise (0028,1054) RescaleType or "stored".
        rows: (0028,0010) Rows (H).
        columns: (0028,0011) Columns (W).
        n_frames: (0028,0008) NumberOfFrames, 1 for single-frame objects.
        pixel_spacing: (row spacing, column spacing) in mm from PixelSpacing (or ImagerPixelSpacing), or None.
        slice_thickness: (0018,0050) SliceThickness in mm, or None.
        image_position: (0020,0032) ImagePositionPatient, x, y, z in mm of the first voxel's centre, or None.
        image_orientation: (0020,0037) ImageOrientationPatient, row then column direction cosines, or None.
        window_center: first value of (0028,1050) WindowCenter, or None.
        window_width: first value of (0028,1051) WindowWidth, or None.
        instance_number: (0020,0013) InstanceNumber, or None.
        photometric: (0028,0004) PhotometricInterpretation as stored.
        transfer_syntax: (0002,0010) TransferSyntaxUID.
        sop_class_uid: (0008,0016) SOPClassUID (a standard UID, not identifying).
        ids: identifying values, only for pseudonymisation.
        frame_positions: per-frame ImagePositionPatient of an enhanced multi-frame object (per-frame functional
            groups), one (x, y, z) in mm per frame; None for single-frame objects or without per-frame geometry.
            ``image_orientation``/``pixel_spacing``/``slice_thickness`` then come from the shared (or first
            per-frame) functional groups.
        body_part: (0018,0015) BodyPartExamined, upper case, "" when absent.
        gantry_tilt: (0018,1120) GantryDetectorTilt in degrees, 0.0 when absent.
        burned_in_annotation: (0028,0301) BurnedInAnnotation as stored ("YES", "NO" or "" when absent).
        has_overlay: the object carries an overlay plane (group 60xx OverlayData).
        channels: 1 for grayscale; 3 for colour converted to RGB, then ``pixels`` has a trailing axis of 3.
    """

    pixels: np.ndarray
    modality: str
    unit: str
    rows: int
    columns: int
    n_frames: int
    pixel_spacing: tuple[float, float] | None
    slice_thickness: float | None
    image_position: tuple[float, float, float] | None
    image_orientation: tuple[float, float, float, float, float, float] | None
    window_center: float | None
    window_width: float | None
    instance_number: int | None
    photometric: str
    transfer_syntax: str
    sop_class_uid: str
    ids: SourceIds
    frame_positions: tuple[tuple[float, float, float], ...] | None = None
    body_part: str = ""
    gantry_tilt: float = 0.0
    burned_in_annotation: str = ""
    has_overlay: bool = False
    channels: int = 1


def is_dicom_keyword(keyword: str) -> bool:
    """Whether ``keyword`` is a DICOM data dictionary keyword (e.g. "AccessionNumber")."""
    from pydicom.datadict import tag_for_keyword

    return tag_for_keyword(keyword) is not None


def derive_uid(*entropy: object) -> str:
    """A deterministic UID under pydicom's root (``1.2.826.0.1.3680043.8.498.<int>``) for generated data.

    The same parts always give the same UID (SHA-512 of the parts); used for the synthetic cohort, whose files
    must be byte-identical for identical params. (``generate_uid(prefix=None)`` would ignore the entropy.)
    """
    from pydicom.uid import PYDICOM_ROOT_UID, generate_uid

    return str(generate_uid(prefix=PYDICOM_ROOT_UID, entropy_srcs=["\x1f".join(str(e) for e in entropy)]))


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def _first_float(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value[0] if hasattr(value, "__len__") and not isinstance(value, str) else value)
    except (TypeError, ValueError, IndexError):
        return None


def _text(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) and hasattr(value, "__iter__"):
        return "\\".join(str(v) for v in value).strip()
    return str(value).strip()


def _check_not_truncated(ds: Any) -> None:
    """Raise ``truncated`` when the last element read holds fewer bytes than its header declared.

    pydicom stops quietly at end of file; the last raw element is the evidence. A file cut exactly at an element
    boundary cannot be told from a complete one and is judged on what it contains.
    """
    if len(ds) == 0:
        raise DicomError("truncated", "the file ends after the file meta information (no data set)")
    last = ds.get_item(list(ds.keys())[-1])
    length = getattr(last, "length", None)
    value = getattr(last, "value", None)
    if isinstance(value, bytes) and length not in (None, _UNDEFINED_LENGTH) and len(value) < length:
        raise DicomError("truncated", f"element {last.tag} declares {length} bytes but the file holds {len(value)}")


def _decode(ds: Any) -> np.ndarray:
    """Stored values through the Modality LUT to float32, MONOCHROME1 inverted."""
    from pydicom.pixels import apply_modality_lut

    try:
        stored = ds.pixel_array
    except ValueError as exc:
        if "less than expected" in str(exc):
            raise DicomError("truncated", f"Pixel Data is shorter than Rows x Columns x Frames: {exc}") from None
        raise DicomError("decode_failed", f"{type(exc).__name__}: {exc}"[:300]) from None
    except Exception as exc:  # codec missing, corrupt stream, bad group 0028: all are "cannot decode"
        raise DicomError("decode_failed", f"{type(exc).__name__}: {exc}"[:300]) from None
    try:
        values = apply_modality_lut(stored, ds)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            bits = int(ds.BitsStored)
            lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if ds.PixelRepresentation == 1 else (0, 2**bits - 1)
            ends = apply_modality_lut(np.array([lo, hi]), ds).astype(np.float64)
            values = (ends.min() + ends.max()) - values.astype(np.float64)
    except Exception as exc:
        raise DicomError("decode_failed", f"modality LUT: {type(exc).__name__}: {exc}"[:300]) from None
    return np.ascontiguousarray(values, dtype=np.float32)


def read_dicom(path: Path | str, label_key: str | None = None) -> DicomImage:
    """Read and decode one DICOM file.

    Args:
        path: any file; non-DICOM files are rejected (pydicom ``force=False``).
        label_key: DICOM keyword whose value keys the label table (e.g. "AccessionNumber"), or None.

    Returns:
        The decoded image: float32 pixels (H, W) or (F, H, W) in modality units (HU for CT), geometry in mm.

    Raises:
        DicomError: with a reason from :data:`REASONS`; no other exception escapes for a bad file.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise DicomError("empty_file", "the file has 0 bytes")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns on invalid values; we judge the result instead
            ds = pydicom.dcmread(path, force=False)
    except DicomError:
        raise
    except InvalidDicomError as exc:
        raise DicomError("not_dicom", str(exc)[:300]) from None
    except OSError as exc:
        raise DicomError("unreadable", f"{type(exc).__name__}: {exc.strerror or exc}") from None
    except Exception as exc:  # struct.error, EOFError ... from a file cut inside its meta information
        raise DicomError("truncated", f"while parsing: {type(exc).__name__}: {exc}"[:300]) from None

    _check_not_truncated(ds)
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DicomError("no_pixel_data", f"no Pixel Data element (SOP class {ds.get('SOPClassUID', '?')})")
    photometric = _text(ds.get("PhotometricInterpretation"))
    samples = ds.get("SamplesPerPixel", 1)
    if photometric not in _GRAYSCALE or samples != 1:
        raise DicomError(
            "unsupported_photometric",
            f"PhotometricInterpretation {photometric or '<missing>'!r} with SamplesPerPixel {samples}; "
            f"only {' / '.join(_GRAYSCALE)} is supported",
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pixels = _decode(ds)

    modality = _text(ds.get("Modality")) or "OT"
    spacing = _floats(ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing"), 2)
    label_value = None
    if label_key:
        raw = ds.get(label_key)
        label_value = _text(raw) if raw is not None and _text(raw) != "" else None
    number = ds.get("InstanceNumber")
    return DicomImage(
        pixels=pixels,
        modality=modality,
        unit="HU" if modality == "CT" else (_text(ds.get("RescaleType")) or "stored"),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        n_frames=int(ds.get("NumberOfFrames") or 1),
        pixel_spacing=spacing,  # type: ignore[arg-type]
        slice_thickness=_first_float(ds.get("SliceThickness")),
        image_position=_floats(ds.get("ImagePositionPatient"), 3),  # type: ignore[arg-type]
        image_orientation=_floats(ds.get("ImageOrientationPatient"), 6),  # type: ignore[arg-type]
        window_center=_first_float(ds.get("WindowCenter")),
        window_width=_first_float(ds.get("WindowWidth")),
        instance_number=int(number) if number not in (None, "") else None,
        photometric=photometric,
        transfer_syntax=str(ds.file_meta.get("TransferSyntaxUID", "")),
        sop_class_uid=str(ds.get("SOPClassUID", "")),
        ids=SourceIds(
            patient_id=_text(ds.get("PatientID")),
            study_uid=_text(ds.get("StudyInstanceUID")),
            series_uid=_text(ds.get("SeriesInstanceUID")),
            sop_uid=_text(ds.get("SOPInstanceUID")),
            study_date=_text(ds.get("StudyDate")),
            label_value=label_value,
        ),
    )


