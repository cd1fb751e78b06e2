"""Reading DICOM: one Part 10 file to a :class:`DicomImage` (pixels in modality units, geometry, flags).

A file that cannot be used raises :class:`DicomError` with a short, stable reason code, so that a stage can
quarantine the file and go on. Only what pydicom and its pixel plugins raise for the file's data becomes a reason
(:func:`parse_errors`, :func:`decode_errors`); any other exception is a bug (ours, or of the environment) and
propagates. Nothing here writes files (:mod:`tasks.dicom.write` does) or leaves pydicom's global configuration
changed (:func:`quiet_pydicom` sets and restores it).
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tasks.dicom.errors import (  # noqa: F401  (REASONS: re-exported for callers of tasks.dicom.read)
    REASONS,
    DicomError,
    decode_errors,
    library_message,
    parse_errors,
    quiet_pydicom,
)
from tasks.dicom.image import DicomImage, SourceIds

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
_COLOR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "PALETTE COLOR")

_GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
_UNDEFINED_LENGTH = 0xFFFFFFFF


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


def _load_dataset(path: Path) -> Any:
    """Read a file into a pydicom Dataset, validated as DICOM (inside :func:`quiet_pydicom`).

    A file without the Part 10 preamble ("DICM" at byte 128) is re-read with ``force=True`` and accepted only if
    it then holds DICOM image or SOP attributes; its transfer syntax is taken from how it parsed.

    Raises:
        DicomError: empty_file, unreadable, not_dicom, truncated or malformed.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        if path.stat().st_size == 0:
            raise DicomError("empty_file", "the file has 0 bytes")
        try:
            ds = pydicom.dcmread(path, force=False)
        except InvalidDicomError:
            ds = _read_forced(path)
    except OSError as exc:
        if exc.errno is not None:  # the operating system's, not pydicom's "No tag to read at file position ..."
            raise DicomError("unreadable", f"{type(exc).__name__}: {exc.strerror or exc}") from None
        raise DicomError("truncated", f"while parsing: {library_message(exc)}") from None
    except (struct.error, EOFError) as exc:  # fewer bytes than a header needs: a file cut inside its meta or data
        raise DicomError("truncated", f"while parsing: {library_message(exc)}") from None
    except parse_errors() as exc:  # an unknown VR, a bad length, a bad character set in the header
        raise DicomError("malformed", f"while parsing: {library_message(exc)}") from None
    _check_not_truncated(ds)
    return ds


def _read_forced(path: Path) -> Any:
    """A preamble-less file: parse with force, then insist on DICOM content (force parses anything)."""
    import pydicom
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    try:
        ds = pydicom.dcmread(path, force=True)
        keys = set(ds.keys())
    except parse_errors() as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise  # the operating system's: unreadable
        raise DicomError("not_dicom", f"no DICOM preamble, and it does not parse ({type(exc).__name__})") from None
    if not ({0x00080016, 0x00080060} & keys or {0x7FE00010, 0x00280010} <= keys):
        raise DicomError("not_dicom", "no DICOM preamble and no SOP Class, Modality or image attributes")
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        )
    return ds


def _functional(ds: Any, frame: int, sequence: str, keyword: str) -> Any:
    """An attribute of an enhanced object's functional groups: the frame's own, else the shared one."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        if items and len(items) > index:
            inner = items[index].get(sequence)
            if inner and keyword in inner[0]:
                return inner[0].get(keyword)
    return None


def _number(value: Any, keyword: str, default: float) -> float:
    """A rescale or window value of the file as a float; ``default`` when absent or empty.

    Raises:
        DicomError: decode_failed when it is not one number (validation is off, so an invalid DS stays text).
    """
    if value is None or value == "":
        return default
    try:
        return float(value)
    except (TypeError, ValueError):  # float() of the file's value: text, or several values
        raise DicomError("decode_failed", f"{keyword} is not one number") from None


def _frame_rescale(ds: Any, n_frames: int) -> list[tuple[float, float]] | None:
    """Per-frame (slope, intercept) of an enhanced object's Pixel Value Transformation functional group.

    pydicom's ``apply_modality_lut`` reads only the top-level Rescale attributes, which enhanced objects keep in
    their functional groups instead; the rescale itself is the same linear map.
    """
    if "PerFrameFunctionalGroupsSequence" not in ds and "SharedFunctionalGroupsSequence" not in ds:
        return None
    out = []
    for f in range(n_frames):
        slope = _functional(ds, f, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _functional(ds, f, "PixelValueTransformationSequence", "RescaleIntercept")
        if slope is None and intercept is None:
            return None
        out.append((_number(slope, "RescaleSlope", 1.0), _number(intercept, "RescaleIntercept", 0.0)))
    return out


def _check_window(ds: Any) -> None:
    """Refuse a window that pydicom's ``apply_voi_lut`` would choke on (it computes with the values as given)."""
    if ds.get("VOILUTSequence"):
        return
    for keyword in ("WindowCenter", "WindowWidth"):
        value = ds.get(keyword)
        values = [value] if isinstance(value, (str, float, int)) or not hasattr(value, "__iter__") else value
        for v in values:
            _number(v, keyword, 0.0)


def _pixel_array(ds: Any) -> np.ndarray:
    """pydicom's ``pixel_array`` (YBR_* converted to RGB), with its failures as reasons."""
    try:
        return ds.pixel_array
    except decode_errors() as exc:  # a codec missing, a corrupt stream, a bad group 0028
        if isinstance(exc, ValueError) and "less than expected" in str(exc):
            raise DicomError("truncated", f"Pixel Data is shorter than Rows x Columns x Frames: {exc}") from None
        raise DicomError("decode_failed", library_message(exc)) from None


def _lut(apply: Callable[[np.ndarray, Any], np.ndarray], arr: np.ndarray, ds: Any, what: str) -> np.ndarray:
    """One of pydicom's LUT functions, with its failures on the file's LUT or window elements as reasons."""
    try:
        return apply(arr, ds)
    except decode_errors() as exc:
        raise DicomError("decode_failed", f"{what}: {library_message(exc)}") from None


def _decode(ds: Any, photometric: str, voi: bool) -> np.ndarray:
    """Stored values to float32: colour to RGB (trailing axis 3), else the Modality LUT (per frame for enhanced
    objects), then the VOI LUT / window when ``voi``, then MONOCHROME1 inverted."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    stored = _pixel_array(ds)
    if photometric in _COLOR:  # colour keeps its integer dtype (native byte order): 4x less to move than float32
        rgb = _lut(apply_color_lut, stored, ds, "palette colour LUT") if photometric == "PALETTE COLOR" else stored
        return np.ascontiguousarray(rgb, dtype=rgb.dtype.newbyteorder("="))
    n_frames = int(ds.get("NumberOfFrames") or 1)  # pydicom has just decoded that many frames
    per_frame = _frame_rescale(ds, n_frames) if n_frames > 1 else None
    lut = per_frame is None and "ModalityLUTSequence" in ds
    if per_frame is not None:
        values = stored.astype(np.float32).reshape(n_frames, *stored.shape[-2:])
        for f, (slope, intercept) in enumerate(per_frame):
            values[f] = values[f] * np.float32(slope) + np.float32(intercept)
        values = values.reshape(stored.shape)
        slope, intercept = per_frame[0]  # the first frame's, for MONOCHROME1 below
    elif lut:
        values = _lut(apply_modality_lut, stored, ds, "Modality LUT")
    else:  # the rescale in float32 (pydicom's apply_modality_lut computes it in float64: 2x the memory)
        slope = _number(ds.get("RescaleSlope"), "RescaleSlope", 1.0) or 1.0
        intercept = _number(ds.get("RescaleIntercept"), "RescaleIntercept", 0.0)
        values = stored.astype(np.float32)
        if (slope, intercept) != (1.0, 0.0):
            values *= np.float32(slope)
            values += np.float32(intercept)
    if voi and (ds.get("VOILUTSequence") or ds.get("WindowCenter") is not None):
        _check_window(ds)
        values = _lut(apply_voi_lut, values, ds, "VOI LUT")
    if photometric == "MONOCHROME1":  # pydicom validated BitsStored and PixelRepresentation while decoding
        bits = int(ds.BitsStored)
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if ds.PixelRepresentation == 1 else (0, 2**bits - 1)
        ends = np.array([lo, hi], dtype=np.float64)
        if lut:
            ends = _lut(apply_modality_lut, ends, ds, "Modality LUT").astype(np.float64)
        else:
            ends = ends * slope + intercept
        values = np.float32(ends.min() + ends.max()) - values.astype(np.float32, copy=False)
    return np.ascontiguousarray(values, dtype=np.float32)


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


def check_usable(ds: Any, color: str = "reject") -> str:
    """Judge a loaded data set before decoding; returns its PhotometricInterpretation.

    Raises:
        DicomError: no_pixel_data, not_an_image (by SOP class), color_rejected or unsupported_photometric.
    """
    sop_class = str(ds.get("SOPClassUID", ""))
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DicomError("no_pixel_data", f"no Pixel Data element (SOP class {sop_class or '?'})")
    if sop_class in NON_IMAGE_SOP_CLASSES:
        raise DicomError("not_an_image", f"{NON_IMAGE_SOP_CLASSES[sop_class]} object ({sop_class}): not an image")
    photometric = _text(ds.get("PhotometricInterpretation"))
    samples = ds.get("SamplesPerPixel", 1)
    if photometric in _COLOR:
        if color == "reject":
            raise DicomError("color_rejected", f"{photometric} image; ingest.color is 'reject' (a grayscale task); "
                                               "set ingest.color: rgb to convert it to RGB")
        return photometric
    if photometric not in _GRAYSCALE or samples != 1:
        raise DicomError(
            "unsupported_photometric",
            f"PhotometricInterpretation {photometric or '<missing>'!r} with SamplesPerPixel {samples}; "
            f"supported: {' / '.join(_GRAYSCALE + _COLOR)}",
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
        spacing = spacing or _floats(_functional(ds, 0, "PixelMeasuresSequence", "PixelSpacing"), 2)
        thickness = thickness or _first_float(_functional(ds, 0, "PixelMeasuresSequence", "SliceThickness"))
        orients = {_floats(_functional(ds, f, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
                   for f in range(n_frames)}
        positions = [_floats(_functional(ds, f, "PlanePositionSequence", "ImagePositionPatient"), 3)
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
) -> DicomImage:
    """Read, judge, (de-identify) and decode one DICOM file.

    Args:
        path: any file; one without the Part 10 preamble is accepted only if it parses as DICOM image or SOP
            attributes.
        label_key: DICOM keyword whose value keys the label table (e.g. "AccessionNumber"), or None.
        color: "reject" (colour images are quarantined: a grayscale task) or "rgb" (converted to RGB).
        voi: apply the file's VOI LUT / first window after the Modality LUT (values become display units).
        deidentify: applied to the data set after the identifying values are read and before anything else is
            taken from it (``tasks.dicom.profile.deidentify`` bound to the project's pseudonymiser); its action
            counts are returned in ``DicomImage.deid_counts``.

    Returns:
        The decoded image: float32 pixels (H, W) or (F, H, W) in modality units (HU for CT), or with a trailing
        RGB axis; geometry in mm; ``ids`` hold the original identifying values (memory only).

    Raises:
        DicomError: with a reason from :data:`REASONS`, for what pydicom and its plugins raise on the file's data.
            Any other exception is not the file's fault (a bug, the environment) and propagates unchanged.
    """
    return read_instance(path, label_key, color=color, voi=voi, deidentify=deidentify)[0]


def read_instance(
    path: Path | str,
    label_key: str | None = None,
    *,
    color: str = "reject",
    voi: bool = False,
    deidentify: Callable[[Any], Counter[str]] | None = None,
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
    # values defensively; _decode turns what pydicom's pixel functions raise into reasons itself. So the parse
    # errors caught around them are pydicom's, on an element that does not parse.
    with quiet_pydicom():
        ds = _load_dataset(Path(path))
        try:
            photometric = check_usable(ds, color)
            ids = source_ids(ds, label_key)
        except parse_errors() as exc:
            raise DicomError("malformed", library_message(exc)) from None
        counts = None
        if deidentify is not None:
            try:
                counts = dict(deidentify(ds))
            except parse_errors() as exc:  # never use (or write) a half-cleaned object
                raise DicomError("deid_failed", f"de-identification: {library_message(exc)}") from None
        try:
            pixels = _decode(ds, photometric, voi)
            image = _image(ds, photometric, voi, ids, pixels, counts)
        except parse_errors() as exc:
            raise DicomError("malformed", library_message(exc)) from None
    return image, ds


def _image(
    ds: Any, photometric: str, voi: bool, ids: SourceIds, pixels: np.ndarray, counts: dict[str, int] | None
) -> DicomImage:
    """The :class:`DicomImage` of a decoded data set (its non-identifying attributes and geometry)."""
    modality = _text(ds.get("Modality")) or "OT"
    n_frames = int(ds.get("NumberOfFrames") or 1)
    colour = photometric in _COLOR
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
        **_geometry(ds, n_frames),
    )


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
