"""DICOM Segmentation (SEG) objects in and out, with highdicom: label maps written as BINARY SEG that reference
their source instances, and SEGs read back into label maps on a series' slices.

* :func:`write_seg`: a uint8 label map (S, H, W) on a series' slices -> one SEG, one segment per foreground class
  (segment number = label value = 1 + the class's index), a manual annotation (the synthetic cohort) or an
  automatic one with its algorithm (a prediction).
* :func:`prediction_source_datasets`: the minimal source data sets a prediction SEG needs, built from ingest's
  pseudonymised geometry (``geometry/<image_id>.json``), so that evaluate writes SEG without the original files.
* :func:`read_seg`: a SEG -> :class:`SegMask` (plain data, picklable): referenced series, frame of reference,
  per-source-instance planes and positions, segment labels; :meth:`SegMask.to_label_map` puts it on a series.

UIDs are kept as they are in the object read; ingest maps them with its pseudonymiser (:meth:`SegMask.with_uids`)
so that both sides of a reference use the same mapping. Nothing identifying is copied into a prediction SEG: its
patient and study attributes are the pseudonyms of the geometry, or empty.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MANUFACTURER = "medpipe"
# a class name with one of these words is a lesion (SCT Morphologically Altered Structure), any other an organ
LESION_WORDS = ("lesion", "tumor", "tumour", "nodule", "mass", "cancer", "metasta", "neoplasm", "carcinoma")


class SegError(ValueError):
    """A SEG that cannot be used: unreadable, without source references, or referencing other slices."""


def _codes(name: str) -> tuple[Any, Any]:
    """(segmented property category, type) for a class name: SCT codes for organs and lesions.

    A lesion-like name is SCT 49755003 Morphologically Altered Structure / 52988006 Lesion; an organ name with an
    SCT keyword in pydicom's code dictionary (lung, liver, heart, ...) is Anatomical Structure / that organ; any
    other name is Anatomical Structure / a local code (scheme ``99MEDPIPE``) whose meaning is the name.
    """
    from highdicom.sr import CodedConcept
    from pydicom.sr.codedict import codes

    low = name.strip().lower()
    if any(w in low for w in LESION_WORDS):
        category = CodedConcept("49755003", "SCT", "Morphologically Altered Structure")
        kind = codes.SCT.Neoplasm if ("neoplasm" in low or "tumo" in low) else codes.SCT.Lesion
        return category, kind
    camel = "".join(p.capitalize() for p in re.split(r"[^a-z0-9]+", low) if p)
    try:
        kind = getattr(codes.SCT, camel)
    except AttributeError:
        kind = CodedConcept(re.sub(r"[^A-Z0-9]", "", camel.upper())[:16] or "UNNAMED", "99MEDPIPE", name.strip())
    return codes.SCT.AnatomicalStructure, kind


def _along_normal(datasets: Sequence[Any]) -> list[int]:
    """Indices of ``datasets`` sorted along the slice normal (stable; as :func:`tasks.dicom.series.stack_series`)."""
    if len(datasets) == 1:
        return [0]
    iop = np.asarray([float(v) for v in datasets[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    along = [float(np.asarray([float(v) for v in ds.ImagePositionPatient]) @ normal) for ds in datasets]
    return [int(k) for k in np.argsort(along, kind="stable")]


def write_seg(
    source_datasets: Sequence[Any],
    label_map: np.ndarray,
    class_names: Sequence[str],
    path: Path | str,
    *,
    manual: bool,
    series_number: int,
    algorithm_name: str | None = None,
    algorithm_version: str | None = None,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    content_date: str | None = None,
    content_time: str | None = None,
) -> Path:
    """Write a label map as a BINARY DICOM SEG referencing its source instances (highdicom).

    Args:
        source_datasets: the source series' instances (pydicom data sets, pixel data not needed, or their files),
            any order.
        label_map: uint8 (S, H, W) (or (H, W) for one slice): 0 background, v = ``class_names[v - 1]``; slice k is
            the k-th source instance sorted along the slice normal (the order ingest stacks them in).
        class_names: the foreground class names (``ingest.masks.classes``); one segment per class, segment number =
            label value, segment label = the name.
        path: the file to write (parent folders are created).
        manual: a manual annotation (algorithm type MANUAL) or a prediction (AUTOMATIC; ``algorithm_name`` needed).
        series_number: the SEG series' SeriesNumber.
        algorithm_name: the algorithm's name (AlgorithmIdentificationSequence) for an automatic segmentation.
        algorithm_version: its version (e.g. the model's sha256 prefix).
        series_instance_uid: the SEG series' UID; default a new one (pass fixed UIDs for byte-identical output).
        sop_instance_uid: the SEG instance's UID; default a new one. Given, the Dimension Organization UID is
            derived from it (highdicom draws a random one).
        content_date: ContentDate (DA ``YYYYMMDD``); default now. With ``content_time``, also the instance
            creation date: pass both (and the UIDs) for byte-identical output.
        content_time: ContentTime (TM ``HHMMSS``); default now.

    Returns:
        ``path``.

    Raises:
        ValueError: a label map whose shape is not (number of sources, Rows, Columns), or values above the number
            of classes; ``manual=False`` without ``algorithm_name``.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from tasks.dicom.errors import quiet_pydicom

    labels = np.asarray(label_map)
    if labels.ndim == 2:
        labels = labels[None]
    if source_datasets and isinstance(source_datasets[0], (str, Path)):
        import pydicom

        with quiet_pydicom():
            source_datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in source_datasets]
    sources = [source_datasets[k] for k in _along_normal(source_datasets)]
    expected = (len(sources), int(sources[0].Rows), int(sources[0].Columns))
    if labels.shape != expected:
        raise ValueError(f"{path}: label map {labels.shape} does not fit {len(sources)} source slices of "
                         f"{expected[1]}x{expected[2]}: want {expected}")  # fmt: skip
    if labels.size and int(labels.max()) > len(class_names):
        raise ValueError(f"{path}: label value {int(labels.max())} but only {len(class_names)} classes "
                         f"({', '.join(class_names)})")  # fmt: skip
    if not manual and not algorithm_name:
        raise ValueError("write_seg: an automatic segmentation needs algorithm_name")
    algorithm = None
    if not manual:
        algorithm = hd.AlgorithmIdentificationSequence(
            name=algorithm_name, family=codes.cid7162.ArtificialIntelligence, version=algorithm_version or "unknown"
        )
    descriptions = []
    for number, name in enumerate(class_names, start=1):
        category, kind = _codes(name)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=name, segmented_property_category=category,
            segmented_property_type=kind,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL if manual
            else hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        ))  # fmt: skip
    with quiet_pydicom():
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=labels.astype(np.uint8),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=series_instance_uid or hd.UID(),
            series_number=series_number,
            sop_instance_uid=sop_instance_uid or hd.UID(),
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name="medpipe" if manual else algorithm_name,
            software_versions=algorithm_version or "medpipe",
            device_serial_number="0",
            content_label="MANUAL" if manual else "PREDICTION",
            content_description="medpipe annotation" if manual else f"{algorithm_name} prediction",
            omit_empty_frames=bool(labels.any()),  # an all-background map: keep its frames (a SEG needs one)
            content_date=content_date,
            content_time=content_time,
        )
        if content_date and content_time:  # the other clock readings: byte-identical output for fixed inputs
            seg.InstanceCreationDate, seg.InstanceCreationTime = content_date, content_time
            for item in seg.get("ContributingEquipmentSequence", []):
                if "ContributionDateTime" in item:
                    item.ContributionDateTime = content_date + content_time
        if sop_instance_uid:  # highdicom draws a random Dimension Organization UID: derive it from the SEG's
            from tasks.dicom.read import derive_uid

            organization = derive_uid(sop_instance_uid, "dimension-organization")
            for item in [*seg.get("DimensionOrganizationSequence", []), *seg.get("DimensionIndexSequence", [])]:
                item.DimensionOrganizationUID = organization
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        seg.save_as(path, enforce_file_format=True)
    return path


def prediction_source_datasets(geometry: dict) -> list[Any]:
    """Minimal source data sets (no pixel data) for :func:`write_seg` of a prediction, from ingest's geometry.

    Only what the geometry holds goes in: the pseudonymised UIDs, the patient pseudonym (as PatientID and
    PatientName), positions, orientation, spacing; other patient/study attributes are empty. Without
    ``slice_thickness`` the SliceThickness is the slice step (1 mm for one slice): highdicom's Pixel Measures need
    one.

    Args:
        geometry: a DICOM image's ``geometry/<image_id>.json`` (ingest): ``sop_instance_uids`` and
            ``image_positions`` per slice in stacked order, ``image_orientation``, ``pixel_spacing``, ``rows``,
            ``columns``, ``sop_class_uid``, ``study_instance_uid``, ``series_instance_uid``,
            ``frame_of_reference_uid``, ``patient_id``, optional ``slice_thickness`` and ``modality``.

    Returns:
        One pydicom Dataset per slice, in the geometry's order (the order of the predicted label map).

    Raises:
        KeyError: the geometry lacks a field listed above (not a DICOM image's geometry).
    """
    from pydicom.dataset import Dataset

    positions = np.asarray(geometry["image_positions"], float)
    step = float(np.median(np.linalg.norm(np.diff(positions, axis=0), axis=1))) if len(positions) > 1 else 0.0
    thickness = float(geometry.get("slice_thickness") or step or 1.0)  # highdicom needs one (Pixel Measures)
    out = []
    for k, (uid, position) in enumerate(zip(geometry["sop_instance_uids"], geometry["image_positions"], strict=True)):
        ds = Dataset()
        ds.SOPClassUID = geometry.get("sop_class_uid") or CT_IMAGE_STORAGE
        ds.SOPInstanceUID = uid
        ds.StudyInstanceUID = geometry["study_instance_uid"]
        ds.SeriesInstanceUID = geometry["series_instance_uid"]
        ds.FrameOfReferenceUID = geometry["frame_of_reference_uid"]
        ds.PatientID = geometry["patient_id"]
        ds.PatientName = geometry["patient_id"]
        ds.PatientBirthDate = ds.PatientSex = ds.StudyDate = ds.StudyTime = ""
        ds.AccessionNumber = ds.StudyID = ds.ReferringPhysicianName = ""
        ds.Modality = geometry.get("modality") or "CT"
        ds.InstanceNumber = k + 1
        ds.Rows, ds.Columns = int(geometry["rows"]), int(geometry["columns"])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelSpacing = [float(v) for v in geometry["pixel_spacing"]]
        ds.ImageOrientationPatient = [float(v) for v in geometry["image_orientation"]]
        ds.ImagePositionPatient = [float(v) for v in position]
        ds.SliceThickness = thickness
        out.append(ds)
    return out


def write_prediction_seg(
    geometry: dict, label_map: np.ndarray, class_names: Sequence[str], path: Path | str, *, algorithm_name: str,
    algorithm_version: str | None = None, series_number: int = 900,
) -> Path:  # fmt: skip
    """A predicted label map (S, H, W) (or (H, W)) on the original grid of a DICOM image -> SEG at ``path``
    (:func:`prediction_source_datasets` + :func:`write_seg`, automatic, with the algorithm's name and version).

    The SEG's UIDs are derived from the image's series UID, the algorithm and its version: the same model's
    prediction of the same image is the same object (a re-run replaces it in a PACS rather than adding a copy).
    """
    from tasks.dicom.read import derive_uid

    sources = prediction_source_datasets(geometry)  # in stacked order, i.e. already along the slice normal
    key = ("medpipe-prediction", geometry["series_instance_uid"], algorithm_name, algorithm_version or "")
    return write_seg(
        sources, label_map, class_names, path, manual=False, series_number=series_number,
        algorithm_name=algorithm_name, algorithm_version=algorithm_version,
        series_instance_uid=derive_uid(*key, "series"), sop_instance_uid=derive_uid(*key, "sop"),
    )  # fmt: skip


@dataclass(frozen=True)
class SegMask:
    """A read SEG, as plain data (picklable: ingest reads SEGs in worker processes).

    Attributes:
        study_uid: StudyInstanceUID of the SEG (= its source's).
        series_uid: the referenced source SeriesInstanceUID.
        frame_of_reference: FrameOfReferenceUID, "" when absent.
        source_sop_uids: the referenced source SOPInstanceUIDs that have frames, in the order of ``planes``.
        planes: bool (N, H, W, K): segment k's pixels on source instance n (K = len(segment_numbers)).
        segment_numbers: the segments along the last axis of ``planes``.
        segment_labels: SegmentLabel per segment number.
        positions: ImagePositionPatient (mm) of each plane's frames, (N, 3); None where the SEG has none.
        orientation: ImageOrientationPatient (6 floats) of the frames, or None.
        pixel_spacing: (row, column) mm of the frames, or None.
        sop_uid: the SEG's own SOPInstanceUID.
    """

    study_uid: str
    series_uid: str
    frame_of_reference: str
    source_sop_uids: tuple[str, ...]
    planes: np.ndarray
    segment_numbers: tuple[int, ...]
    segment_labels: dict[int, str]
    positions: np.ndarray | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    sop_uid: str = ""

    @property
    def shape(self) -> tuple[int, int]:
        """(Rows, Columns) of the frames."""
        return int(self.planes.shape[1]), int(self.planes.shape[2])

    def with_uids(self, remap: Callable[[str], str]) -> SegMask:
        """The same mask with every UID mapped (ingest's pseudonymiser: the images' UIDs are mapped alike)."""
        return replace(
            self, study_uid=remap(self.study_uid), series_uid=remap(self.series_uid),
            frame_of_reference=remap(self.frame_of_reference) if self.frame_of_reference else "",
            source_sop_uids=tuple(remap(u) for u in self.source_sop_uids),
            sop_uid=remap(self.sop_uid) if self.sop_uid else "",
        )  # fmt: skip

    def to_label_map(self, source_sop_uids_in_order: Sequence[str],
                     class_names: Sequence[str]) -> tuple[np.ndarray, list[str]]:  # fmt: skip
        """The label map on a series' slices.

        Args:
            source_sop_uids_in_order: the series' SOPInstanceUIDs in stacked order (slice k of the result), mapped
                the same way as this mask's UIDs.
            class_names: foreground class names; segment labels match them case-insensitively (value = 1 + index).

        Returns:
            (uint8 (S, H, W) label map (S = number of UIDs; slices without frames are background), notes): a
            segment whose label is not a class is left out (noted); voxels in several segments get the highest
            class value (noted with their count).

        Raises:
            SegError: frames reference instances that are not among ``source_sop_uids_in_order``.
        """
        index = {uid: k for k, uid in enumerate(source_sop_uids_in_order)}
        outside = [u for u in self.source_sop_uids if u not in index]
        if outside:
            raise SegError(f"frames reference {len(outside)} instance(s) that are not slices of the series "
                           f"({len(source_sop_uids_in_order)} slices)")  # fmt: skip
        lower = [c.strip().lower() for c in class_names]
        notes: list[str] = []
        values = []
        for j, number in enumerate(self.segment_numbers):
            label = self.segment_labels.get(number, "")
            if label.strip().lower() in lower:
                values.append((j, lower.index(label.strip().lower()) + 1))
            else:
                notes.append(f"segment {number} {label!r} is not in the class list ({', '.join(class_names)}): "
                             "left out")  # fmt: skip
        out = np.zeros((len(source_sop_uids_in_order), *self.shape), np.uint8)
        count = np.zeros_like(out)
        for n, uid in enumerate(self.source_sop_uids):
            k = index[uid]
            for j, value in sorted(values, key=lambda jv: jv[1]):  # the higher class value wins an overlap
                plane = self.planes[n, :, :, j]
                out[k][plane] = value
                count[k] += plane
        overlap = int((count > 1).sum())
        if overlap:
            notes.append(f"overlapping segments: {overlap} voxels in more than one segment (highest class kept)")
        return out, notes


def read_seg(path_or_dataset: Path | str | Any) -> SegMask:
    """Read a DICOM SEG (highdicom) into a :class:`SegMask`.

    Args:
        path_or_dataset: a SEG file, or a pydicom Dataset of one.

    Returns:
        The referenced series, frame of reference, planes per referenced source instance (highdicom's
        ``get_pixels_by_source_instance``), segment labels, and the frames' geometry.

    Raises:
        SegError: not a SEG, unreadable, or without per-frame references to its source instances.
    """
    import highdicom as hd

    from tasks.dicom.errors import parse_errors, quiet_pydicom

    with quiet_pydicom():
        try:
            if isinstance(path_or_dataset, (str, Path)):
                seg = hd.seg.segread(path_or_dataset)
            else:
                seg = hd.seg.Segmentation.from_dataset(path_or_dataset, copy=True)
        except (*parse_errors(), AttributeError, KeyError, ValueError, TypeError, OSError) as exc:
            raise SegError(f"not a readable DICOM SEG: {type(exc).__name__}: {exc}"[:300]) from None
        try:
            return _seg_mask(seg)
        except (*parse_errors(), AttributeError, KeyError, ValueError, TypeError, IndexError, RuntimeError) as exc:
            # highdicom raises RuntimeError for content it cannot index (inconsistent frames, missing references)
            raise SegError(f"SEG content not usable: {type(exc).__name__}: {exc}"[:300]) from None


def frame_of_reference_of(dataset: Any) -> str:
    """A data set's FrameOfReferenceUID ("" when absent): of a de-identified one, the remapped UID."""
    from tasks.dicom.errors import parse_errors, quiet_pydicom

    with quiet_pydicom():
        try:
            return str(dataset.get("FrameOfReferenceUID", "") or "")
        except parse_errors():
            return ""


def load_mask_dataset(path: Path | str) -> tuple[str, Any] | None:
    """(SOPClassUID, data set) of a SEG or RTSTRUCT file, or None for any other file (or one that is not DICOM).

    Read as ingest reads images (:func:`tasks.dicom.load.load_dataset`: gzip-wrapped and preamble-less files too);
    pass the data set on to :func:`read_seg` or :func:`tasks.dicom.rtstruct.read_contours`.
    """
    from tasks.dicom.errors import DicomError, parse_errors, quiet_pydicom
    from tasks.dicom.load import load_dataset

    try:
        with quiet_pydicom():
            ds = load_dataset(Path(path))
            sop_class = str(ds.get("SOPClassUID", ""))
    except (DicomError, *parse_errors()):
        return None
    return (sop_class, ds) if sop_class in (SEG_STORAGE, RTSTRUCT_STORAGE) else None


def _floats(value: Any) -> tuple[float, ...] | None:
    return None if value is None else tuple(float(v) for v in value)


def _seg_mask(seg: Any) -> SegMask:
    """The :class:`SegMask` of a highdicom Segmentation."""
    numbers = tuple(int(n) for n in seg.segment_numbers)
    labels = {n: str(seg.get_segment_description(n).segment_label) for n in numbers}
    frame_uid: list[str | None] = []
    frame_pos: list[tuple[float, ...] | None] = []
    for item in seg.get("PerFrameFunctionalGroupsSequence", []):
        uid = None
        for derivation in item.get("DerivationImageSequence", []):
            for source in derivation.get("SourceImageSequence", []):
                uid = uid or str(source.ReferencedSOPInstanceUID)
        frame_uid.append(uid)
        plane = item.get("PlanePositionSequence")
        frame_pos.append(_floats(plane[0].ImagePositionPatient) if plane else None)
    uids = list(dict.fromkeys(u for u in frame_uid if u))
    if not uids or any(u is None for u in frame_uid):
        raise SegError("frames without references to their source instances (DerivationImageSequence): "
                       "cannot place them on a series")  # fmt: skip
    # ignore_spatial_locations: whether a frame lies where its source does is checked by the caller, per frame,
    # against the image's geometry (ingest: tasks.sources.masks.geometry_mismatch), not taken from the SEG's flag
    planes = seg.get_pixels_by_source_instance(uids, segment_numbers=list(numbers), skip_overlap_checks=True,
                                               ignore_spatial_locations=True, dtype=bool)  # fmt: skip
    position_of: dict[str, tuple[float, ...] | None] = {}
    for uid, pos in zip(frame_uid, frame_pos, strict=True):
        position_of.setdefault(uid, pos)
    positions = None
    if all(position_of[u] is not None for u in uids):
        positions = np.asarray([position_of[u] for u in uids], float)
    shared = seg.get("SharedFunctionalGroupsSequence", [None])[0]
    first = seg.PerFrameFunctionalGroupsSequence[0]

    def functional(seq: str, attr: str) -> Any:
        for group in (shared, first):
            if group is not None and seq in group and attr in group[seq][0]:
                return group[seq][0].get(attr)
        return None

    orientation = _floats(functional("PlaneOrientationSequence", "ImageOrientationPatient"))
    spacing = _floats(functional("PixelMeasuresSequence", "PixelSpacing"))
    series = {s for _, s, _ in seg.get_source_image_uids()}
    referenced = [str(s.SeriesInstanceUID) for s in seg.get("ReferencedSeriesSequence", [])]
    series_uid = referenced[0] if referenced else (sorted(series)[0] if series else "")
    return SegMask(
        study_uid=str(seg.StudyInstanceUID), series_uid=series_uid,
        frame_of_reference=str(seg.get("FrameOfReferenceUID", "") or ""), source_sop_uids=tuple(uids),
        planes=np.asarray(planes, bool), segment_numbers=numbers, segment_labels=labels, positions=positions,
        orientation=orientation, pixel_spacing=spacing and (spacing[0], spacing[1]),
        sop_uid=str(seg.get("SOPInstanceUID", "") or ""),
    )  # fmt: skip
