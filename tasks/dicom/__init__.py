"""DICOM in and out: the only package of medpipe that imports pydicom (and only inside functions, so that
importing it is cheap).

* :mod:`tasks.dicom.read`: one file to a :class:`DicomImage`: pixels after the Modality LUT (HU for CT), colour
  converted to RGB, the non-identifying geometry needed to build a volume (including the per-frame functional
  groups of enhanced multi-frame objects), and the few identifying values (:class:`SourceIds`) that the caller
  pseudonymises (:mod:`tasks.dicom.pseudonym`) before anything is written. What pydicom and its pixel plugins
  raise for a file's data becomes a :class:`DicomError` with a stable reason; anything else propagates (a bug is
  not the file's fault). pydicom's global settings are changed only inside :func:`quiet_pydicom`, and restored.
* :mod:`tasks.dicom.profile`: the DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile applied
  to a data set, with its options, and the audit counts per action.
* :mod:`tasks.dicom.write`: the synthetic cohort's CT slices, and de-identified instances
  (:func:`write_deidentified`, from the data set :func:`read_instance` returns).
"""

from tasks.dicom.errors import REASONS, DicomError, quiet_pydicom
from tasks.dicom.image import DicomImage, SourceIds
from tasks.dicom.read import derive_uid, is_dicom_keyword, read_dicom, read_instance
from tasks.dicom.write import CT_IMAGE_STORAGE, CtSliceHeader, write_ct_slice, write_deidentified

__all__ = [
    "CT_IMAGE_STORAGE",
    "REASONS",
    "CtSliceHeader",
    "DicomError",
    "DicomImage",
    "SourceIds",
    "derive_uid",
    "is_dicom_keyword",
    "quiet_pydicom",
    "read_dicom",
    "read_instance",
    "write_ct_slice",
    "write_deidentified",
]
