"""Reading DICOM: one Part 10 file to a :class:`DicomImage` (pixels in modality units, geometry, flags, notes).

A file that cannot be used raises :class:`DicomError` with a short, stable reason code, so that a stage can
quarantine the file and go on. Only what pydicom and its pixel plugins raise for the file's data becomes a reason
(:func:`parse_errors`, :func:`decode_errors`); any other exception is a bug (ours, or of the environment) and
propagates. Nothing here writes files (:mod:`tasks.dicom.write` does) or leaves pydicom's global configuration
changed (:func:`quiet_pydicom` sets and restores it).

The pixels are decoded by :mod:`tasks.dicom.decode` and judged by :mod:`tasks.dicom.sanity` (garbage that decoded
without an error is a reason too). What a careful reader keeps, and says so in ``DicomImage.notes``: a gzip-wrapped
file (unwrapped, then read), an ACR-NEMA file without PhotometricInterpretation / SamplesPerPixel (MONOCHROME2
for one sample), an empty Modality / VOI LUT Sequence item (ignored), 12-bit JPEG Extended (GDCM directly).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from tasks.dicom.decode import COLOR, GRAYSCALE, functional, stored_values, to_values
from tasks.dicom.errors import (  # noqa: F401  (REASONS: re-exported for callers of tasks.dicom.read)
    REASONS,
    DicomError,
    decode_errors,
    library_message,
    parse_errors,
    quiet_pydicom,
)
from tasks.dicom.image import DicomImage, SourceIds
from tasks.dicom.load import TOO_DEEP, load_dataset
from tasks.dicom.sanity import SanityLimits, check_codestream, check_stored

# SOP classes whose pixel data is not an image (segmentations are labels, RT Dose a dose grid): the segmentation
# task will read SEG as a label source, not as input images.
NON_IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation",
    "1.2.840.10008.5.1.4.1.1.66.7": "Label Map Segmentation",
    "1.2.840.10008.5.1.4.1.1.66.5": "Surface Segmentation",
    "1.2.840.10008.5.1.4.1.1.481.2": "RT Dose",
    "1.2.840.10008.5.1.4.1.1.66": "Raw Data",
    "1.2.840.10008.5.1.4.1.1.104.1": "Encapsulated PDF",
}

# the manifest note of this module (stable wording: a reader may count it)
NOTE_PHOTOMETRIC = "PhotometricInterpretation absent (ACR-NEMA): MONOCHROME2 assumed for one sample per pixel"


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


def source_ids(ds: Any, label_key: str | None) -> SourceIds:
    """The identifying values a caller pseudonymises (read before de-identification)."""
    label_value = None
    if label_key:
        raw = ds.get(label_key)
        label_value = _text(raw) if raw is not None and _text(raw) != "" else None
    return SourceIds(
        patient_id=_text(ds.get("PatientID")),
        study_uid=_text(ds.get("StudyInstanceUID")),
        series_uid=_text(ds.get("SeriesInstanceUID")),
        sop_uid=_text(ds.get("SOPInstanceUID")),
        study_date=_text(ds.get("StudyDate")),
        label_value=label_value,
    )


def image_types(ds: Any) -> list[str]:
    """(0008,0008) ImageType values, upper case ("ORIGINAL", "PRIMARY", "LOCALIZER", ...); [] when absent."""
    return [v.strip().upper() for v in _text(ds.get("ImageType")).split("\\") if v.strip()]


def check_usable(
    ds: Any, color: str = "reject", exclude_image_types: Collection[str] = (), notes: list[str] | None = None
) -> str:
    """Judge a loaded data set before decoding; returns its PhotometricInterpretation (MONOCHROME2 when absent
    with one sample per pixel, as ACR-NEMA files have it; ``notes`` then says so).

    Args:
        exclude_image_types: ImageType values (upper case) whose images are not used (``ingest.exclude_image_types``:
            LOCALIZER for scouts); one matching value of the file's ImageType excludes it.

    Raises:
        DicomError: no_pixel_data, not_an_image (by SOP class), excluded_image_type, decode_failed (no Rows,
            Columns or BitsAllocated: pixel data nothing can interpret), color_rejected or unsupported_photometric.
    """
    sop_class = str(ds.get("SOPClassUID", ""))
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DicomError("no_pixel_data", f"no Pixel Data element (SOP class {sop_class or '?'})")
    if sop_class in NON_IMAGE_SOP_CLASSES:
        raise DicomError("not_an_image", f"{NON_IMAGE_SOP_CLASSES[sop_class]} object ({sop_class}): not an image")
    excluded = [v for v in image_types(ds) if v in exclude_image_types]
    if excluded:
        raise DicomError("excluded_image_type", f"ImageType {'/'.join(image_types(ds))}: {excluded[0]} is in "
                                                "ingest.exclude_image_types")
    missing = [k for k in ("Rows", "Columns", "BitsAllocated") if ds.get(k) in (None, "")]
    if missing:
        raise DicomError("decode_failed", f"pixel data without the Image Pixel module's {', '.join(missing)}: "
                                          "nothing to interpret it with")
    photometric = _text(ds.get("PhotometricInterpretation"))
    samples = ds.get("SamplesPerPixel")
    if not photometric and samples in (None, "", 1):
        if notes is not None:
            notes.append(NOTE_PHOTOMETRIC)
        return "MONOCHROME2"
    samples = 1 if samples in (None, "") else samples
    if photometric in COLOR:
        if color == "reject":
            raise DicomError("color_rejected", f"{photometric} image; ingest.color is 'reject' (a grayscale task); "
                                               "set ingest.color: rgb to convert it to RGB")
        return photometric
    if photometric not in GRAYSCALE or samples != 1:
        raise DicomError(
            "unsupported_photometric",
            f"PhotometricInterpretation {photometric or '<missing>'!r} with SamplesPerPixel {samples}; "
            f"supported: {' / '.join(GRAYSCALE + COLOR)}",
        )
    return photometric


def _geometry(ds: Any, n_frames: int) -> dict[str, Any]:
    """Spacing, thickness, position and orientation; from the functional groups for enhanced objects."""
    spacing = _floats(ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing"), 2)
    thickness = _first_float(ds.get("SliceThickness"))
    position = _floats(ds.get("ImagePositionPatient"), 3)
    orientation = _floats(ds.get("ImageOrientationPatient"), 6)
    frame_positions = None
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        spacing = spacing or _floats(functional(ds, 0, "PixelMeasuresSequence", "PixelSpacing"), 2)
        thickness = thickness or _first_float(functional(ds, 0, "PixelMeasuresSequence", "SliceThickness"))
        orients = {_floats(functional(ds, f, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
                   for f in range(n_frames)}
        positions = [_floats(functional(ds, f, "PlanePositionSequence", "ImagePositionPatient"), 3)
                     for f in range(n_frames)]
        if len(orients) == 1 and None not in orients:
            orientation = orientation or next(iter(orients))
            if n_frames > 1 and all(p is not None for p in positions):
                frame_positions = tuple(positions)
            position = position or positions[0]
    return {"pixel_spacing": spacing, "slice_thickness": thickness, "image_position": position,
            "image_orientation": orientation, "frame_positions": frame_positions}


def read_dicom(
    path: Path | str,
    label_key: str | None = None,
    *,
    color: str = "reject",
    voi: bool = False,
    deidentify: Callable[[Any], Counter[str]] | None = None,
    exclude_image_types: Collection[str] = (),
    sanity: SanityLimits | None = SanityLimits(),  # noqa: B008  (frozen: one shared default is safe)
) -> DicomImage:
    """Read, judge, (de-identify), decode and sanity-check one DICOM file.

    Args:
        path: any file; one without the Part 10 preamble is accepted only if it parses as DICOM image or SOP
            attributes; a gzip-wrapped one is unwrapped first.
        label_key: DICOM keyword whose value keys the label table (e.g. "AccessionNumber"), or None.
        color: "reject" (colour images are quarantined: a grayscale task) or "rgb" (converted to RGB).
        voi: apply the file's VOI LUT / first window after the Modality LUT (values become display units).
        deidentify: applied to the data set after the identifying values are read and before anything else is
            taken from it (``tasks.dicom.profile.deidentify`` bound to the project's pseudonymiser); its action
            counts are returned in ``DicomImage.deid_counts``.
        exclude_image_types: ImageType values (upper case) whose images are refused (excluded_image_type).
        sanity: the thresholds of the decode sanity checks (:mod:`tasks.dicom.sanity`); None: not checked (the
            codestream header check, which keeps a damaged header away from the decoders, always runs).

    Returns:
        The decoded image: float32 pixels (H, W) or (F, H, W) in modality units (HU for CT), or with a trailing
        RGB axis; geometry in mm; ``ids`` hold the original identifying values (memory only); ``notes`` what the
        reader did beyond the standard path.

    Raises:
        DicomError: with a reason from :data:`REASONS`, for what pydicom and its plugins raise on the file's data,
            and for decoded values that are not an image. Any other exception is not the file's fault (a bug, the
            environment) and propagates unchanged.
    """
    return read_instance(path, label_key, color=color, voi=voi, deidentify=deidentify,
                         exclude_image_types=exclude_image_types, sanity=sanity)[0]  # fmt: skip


def read_instance(
    path: Path | str,
    label_key: str | None = None,
    *,
    color: str = "reject",
    voi: bool = False,
    deidentify: Callable[[Any], Counter[str]] | None = None,
    exclude_image_types: Collection[str] = (),
    sanity: SanityLimits | None = SanityLimits(),  # noqa: B008  (frozen: one shared default is safe)
) -> tuple[DicomImage, Any]:
    """:func:`read_dicom`, and the data set it read: de-identified when ``deidentify`` is given.

    For a caller that writes the de-identified instance (:func:`tasks.dicom.write.write_deidentified`) without
    reading the file twice. The data set is a pydicom ``Dataset``: pass it on, do not read values from it outside
    :mod:`tasks.dicom` (elements not yet converted would be converted with pydicom's global settings).

    Returns:
        (the decoded image, the data set).

    Raises:
        DicomError: as :func:`read_dicom`; ``deid_failed`` when ``deidentify`` raises one of pydicom's parse
            errors (an element it must change does not parse).
    """
    # check_usable, source_ids and _image only read elements (pydicom converts each on first access) and parse
    # values defensively; decode turns what pydicom's pixel functions raise into reasons itself. So the parse
    # errors caught around them are pydicom's, on an element that does not parse.
    notes: list[str] = []
    with quiet_pydicom():
        ds = load_dataset(Path(path), notes)
        try:
            photometric = check_usable(ds, color, {v.upper() for v in exclude_image_types}, notes)
            ids = source_ids(ds, label_key)
        except parse_errors() as exc:
            raise DicomError("malformed", library_message(exc)) from None
        counts = None
        if deidentify is not None:
            try:
                counts = dict(deidentify(ds))
            except parse_errors() as exc:  # never use (or write) a half-cleaned object
                raise DicomError("deid_failed", f"de-identification: {library_message(exc)}") from None
            except RecursionError:  # the profile walks sequences recursively
                raise DicomError("malformed", f"de-identification: {TOO_DEEP}") from None
        try:
            stored = _stored(ds, photometric, sanity, notes)
            pixels = to_values(ds, stored, photometric, voi, notes)
            image = _image(ds, photometric, voi, ids, pixels, counts, notes)
        except parse_errors() as exc:
            raise DicomError("malformed", library_message(exc)) from None
    return image, ds


def _stored(ds: Any, photometric: str, sanity: SanityLimits | None, notes: list[str]) -> Any:
    """The decoded stored values, after the codestream header check and (``sanity`` not None) the sanity checks."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    compressed = syntax is not None and syntax.is_encapsulated and "PixelData" in ds
    if compressed:
        try:
            check_codestream(ds)
        except decode_errors() as exc:  # the fragments do not parse: pydicom's decoders would fail on them too
            raise DicomError("decode_failed", f"encapsulated frames: {library_message(exc)}") from None
    stored = stored_values(ds, photometric, notes)
    if sanity is not None:
        bits = int(ds.get("BitsStored") or ds.BitsAllocated)
        check_stored(stored, bits_stored=bits, signed=int(ds.get("PixelRepresentation") or 0) == 1,
                     grayscale=photometric in GRAYSCALE, compressed=compressed, limits=sanity)  # fmt: skip
    return stored


def _image(
    ds: Any, photometric: str, voi: bool, ids: SourceIds, pixels: Any, counts: dict[str, int] | None,
    notes: list[str],
) -> DicomImage:
    """The :class:`DicomImage` of a decoded data set (its non-identifying attributes and geometry)."""
    modality = _text(ds.get("Modality")) or "OT"
    n_frames = int(ds.get("NumberOfFrames") or 1)
    colour = photometric in COLOR
    unit = "RGB" if colour else "display" if voi else "HU" if modality == "CT" else (
        _text(ds.get("RescaleType")) or "stored")
    return DicomImage(
        pixels=pixels,
        modality=modality,
        unit=unit,
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        n_frames=n_frames,
        window_center=_first_float(ds.get("WindowCenter")),
        window_width=_first_float(ds.get("WindowWidth")),
        instance_number=_int_or_none(ds.get("InstanceNumber")),
        photometric=photometric,
        transfer_syntax=str(ds.file_meta.get("TransferSyntaxUID", "")),
        sop_class_uid=str(ds.get("SOPClassUID", "")),
        ids=ids,
        body_part=_text(ds.get("BodyPartExamined")).upper(),
        gantry_tilt=_first_float(ds.get("GantryDetectorTilt")) or 0.0,
        burned_in_annotation=_text(ds.get("BurnedInAnnotation")).upper(),
        has_overlay=any((int(t) >> 16) & 0xFF01 == 0x6000 and int(t) & 0xFFFF == 0x3000 for t in ds.keys()),
        channels=3 if colour else 1,
        deid_counts=counts,
        notes=tuple(notes),
        **_geometry(ds, n_frames),
    )


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
