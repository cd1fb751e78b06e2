"""Writing DICOM: the synthetic cohort's CT slices (Explicit VR Little Endian, with file meta information)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

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
