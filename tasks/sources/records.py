"""The records every source hands to ingest: one image (a DICOM series, a MedMNIST sample, ...) with its fields."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ImageRecord:
    """One output image (a series): pixels plus its manifest fields."""

    image_id: str
    patient_id: str
    study_id: str
    series_uid: str
    study_date: str
    pixels: np.ndarray
    spacing: list[float] | None
    modality: str
    unit: str
    files: list[str]
    label_value: str | None = field(repr=False)
    label: int | None = None
    split: str = ""
    channels: int = 1  # > 1: pixels are channel-first (C, *S)
    selection: str = ""  # why the series was used (tasks.dicom.series.select_series)
    notes: list[str] = field(default_factory=list)  # what the reader did beyond the standard path (DicomImage.notes)
    # uint8 label map with exactly the spatial shape of ``pixels`` (no channel axis): 0 background, v = the mask
    # class ``ingest.masks.classes[v - 1]``; None: no mask for this image
    mask: np.ndarray | None = field(default=None, repr=False)
    mask_source: str = ""  # the mask's format: SEG, RTSTRUCT, NIfTI, NRRD, PNG, ...
    # JSON-able geometry needed to map a prediction back and to write it as DICOM SEG (pseudonymised UIDs only)
    geometry: dict | None = field(default=None, repr=False)

