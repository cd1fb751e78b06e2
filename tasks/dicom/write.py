"""Writing DICOM: the synthetic cohort's CT slices (Explicit VR Little Endian, with file meta information), and
de-identified instances."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.dicom.errors import DicomError, library_message, parse_errors, quiet_pydicom

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


@dataclass(frozen=True)
class CtSliceHeader:
    """Everything :func:`write_ct_slice` puts in a CT slice besides the pixels (strings in DICOM formats).

    Dates are DA ``YYYYMMDD``, times TM ``HHMMSS``, names PN ``FAMILY^GIVEN``; lengths in mm.
    """

    patient_name: str
    patient_id: str
    patient_birth_date: str
    patient_sex: str
    accession_number: str
    institution_name: str
    referring_physician_name: str
    study_date: str
    study_time: str
    study_id: str
    study_description: str
    study_uid: str
    series_uid: str
    sop_uid: str
    frame_of_reference_uid: str
    series_number: int
    instance_number: int
    pixel_spacing: tuple[float, float]
    slice_thickness: float
    image_position: tuple[float, float, float]
    image_orientation: tuple[float, float, float, float, float, float] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    window_center: float = 40.0
    window_width: float = 400.0
    rescale_intercept: float = -1024.0
    rescale_slope: float = 1.0
    manufacturer: str = "medpipe synthetic"
    series_description: str = "AXIAL 1"


def write_ct_slice(path: Path | str, stored: np.ndarray, header: CtSliceHeader) -> None:
    """Write one CT Image Storage slice as DICOM Part 10, Explicit VR Little Endian.

    Args:
        path: output file; parent folders are created.
        stored: int16 (H, W) stored values; HU = stored * rescale_slope + rescale_intercept.
        header: patient/study/series/geometry attributes.
    """
    from pydicom import dcmwrite
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    if stored.dtype != np.int16 or stored.ndim != 2:
        raise ValueError(f"stored must be int16 (H, W), got {stored.dtype} {stored.shape}")
    h = header
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = h.sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = h.sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = h.study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = h.study_time
    ds.AccessionNumber = h.accession_number
    ds.Modality = "CT"
    ds.Manufacturer = h.manufacturer
    ds.InstitutionName = h.institution_name
    ds.ReferringPhysicianName = h.referring_physician_name
    ds.StudyDescription = h.study_description
    ds.SeriesDescription = h.series_description
    ds.PatientName = h.patient_name
    ds.PatientID = h.patient_id
    ds.PatientBirthDate = h.patient_birth_date
    ds.PatientSex = h.patient_sex
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = f"{h.slice_thickness:.4g}"
    ds.KVP = "120"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = h.study_uid
    ds.SeriesInstanceUID = h.series_uid
    ds.StudyID = h.study_id
    ds.SeriesNumber = h.series_number
    ds.InstanceNumber = h.instance_number
    ds.ImagePositionPatient = [f"{v:.4f}" for v in h.image_position]
    ds.ImageOrientationPatient = [f"{v:g}" for v in h.image_orientation]
    ds.FrameOfReferenceUID = h.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = f"{h.image_position[2]:.4f}"
    ds.PixelSpacing = [f"{v:.6g}" for v in h.pixel_spacing]
    ds.WindowCenter = f"{h.window_center:g}"
    ds.WindowWidth = f"{h.window_width:g}"
    ds.RescaleIntercept = f"{h.rescale_intercept:g}"
    ds.RescaleSlope = f"{h.rescale_slope:g}"
    ds.RescaleType = "HU"
    # Rows, Columns, Bits*, PixelRepresentation, SamplesPerPixel, PhotometricInterpretation, PixelData
    ds.set_pixel_data(stored, photometric_interpretation="MONOCHROME2", bits_stored=16, generate_instance_uid=False)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dcmwrite(path, ds, enforce_file_format=True)


def write_deidentified(ds: Any, write_dir: Path | str) -> Path | None:
    """Write a de-identified instance as DICOM Part 10 to ``<write_dir>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``.

    The UIDs in the name are the instance's own, i.e. the remapped ones. The file meta is completed as pydicom's
    ``enforce_file_format`` does; the transfer syntax stays the one the file was read with. The instance is
    encoded in memory first, so that what pydicom refuses (the instance's fault) and what the disk refuses (the
    environment's) stay apart, and no partial file is left.

    Args:
        ds: the data set of :func:`tasks.dicom.read.read_instance` called with ``deidentify``.
        write_dir: the folder of de-identified instances (created).

    Returns:
        The file written; None for an instance without a SOPInstanceUID (nothing to name it by: not written).

    Raises:
        ValueError: ``ds`` is not de-identified (PatientIdentityRemoved is not YES): only de-identified
            instances are written.
        DicomError: deid_failed when pydicom cannot encode the instance (an element that does not parse or does
            not fit its VR, file meta it cannot complete).
        OSError: the folder or the file cannot be written (not the instance's fault).
    """
    import io

    with quiet_pydicom():  # the elements not yet converted are converted now: without validation, silently
        if str(ds.get("PatientIdentityRemoved", "")).upper() != "YES":
            raise ValueError(
                "write_deidentified: the data set is not de-identified (PatientIdentityRemoved is not YES); "
                "read it with read_instance(..., deidentify=...)"
            )
        if not ds.get("SOPInstanceUID"):
            return None
        target = Path(write_dir) / str(ds.get("SeriesInstanceUID") or "no-series") / f"{ds.SOPInstanceUID}.dcm"
        buffer = io.BytesIO()
        try:
            for _ in ds.iterall():  # convert what the profile left raw: an implicit-VR raw element has no VR
                pass
            ds.save_as(buffer, enforce_file_format=True)
        except TypeError as exc:
            # pydicom re-raises an element's encoding error as type(exc)(message), which fails for a
            # UnicodeEncodeError (a value its character set cannot encode): that TypeError is the value's fault
            if not isinstance(exc.__context__, UnicodeError):
                raise  # a value of the wrong Python type: set by our code, a bug
            detail = f"writing the de-identified copy: {library_message(exc.__context__)}"
            raise DicomError("deid_failed", detail) from None
        except (AttributeError, *parse_errors()) as exc:  # AttributeError: file meta pydicom cannot complete
            raise DicomError("deid_failed", f"writing the de-identified copy: {library_message(exc)}") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(buffer.getvalue())
    return target
