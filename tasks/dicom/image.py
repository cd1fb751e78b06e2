"""What a read DICOM instance is: :class:`DicomImage` (pixels, geometry, flags) and the identifying
:class:`SourceIds` that a caller pseudonymises before anything is written. Plain data, no pydicom."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SourceIds:
    """Identifying values read from the file. Never write them anywhere: pseudonymise with :mod:`tasks.dicom.pseudonym`.

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
            Modality LUT (Hounsfield units for CT) and with MONOCHROME1 inverted so that higher means brighter;
            colour: RGB with a trailing axis of 3, in its stored integer dtype (uint8/uint16/uint32).
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
        deid_counts: PS3.15 actions applied to the instance (:mod:`tasks.dicom.profile`), None if not applied.
        notes: what the reader did beyond the standard path, one short fixed sentence each (no values of the
            file), for the manifest: a gzip-wrapped file unwrapped, MONOCHROME2 assumed for an ACR-NEMA file
            without PhotometricInterpretation, an empty LUT Sequence item ignored, a decoder outside pydicom's
            plugins used (the NOTE_* constants of :mod:`tasks.dicom.load`, :mod:`tasks.dicom.read` and
            :mod:`tasks.dicom.decode`).
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
    deid_counts: dict[str, int] | None = None
    notes: tuple[str, ...] = ()
