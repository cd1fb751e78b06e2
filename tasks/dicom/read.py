"""Reading DICOM: one Part 10 file to a :class:`DicomImage` (pixels in modality units, geometry, flags).

A file that cannot be used raises :class:`DicomError` with a short, stable reason code, so that a stage can
quarantine the file and go on. Only what pydicom and its pixel plugins raise for the file's data becomes a reason
(:func:`parse_errors`, :func:`decode_errors`); any other exception is a bug (ours, or of the environment) and
propagates. Nothing here writes files (:mod:`tasks.dicom.write` does) or leaves pydicom's global configuration
changed (:func:`quiet_pydicom` sets and restores it).
"""

from __future__ import annotations

import logging
import re
import struct
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
    "not_an_image",  # pixel data that is not an image to learn from (SEG, RT Dose, raw data): by SOP class
    "color_rejected",  # RGB / YBR / PALETTE COLOR while ingest.color is "reject" (a grayscale task)
    "deid_failed",  # the PS3.15 profile could not be applied (an element it must change does not parse), or the
    # de-identified instance could not be written as Part 10 (ingest.deid.write_dicom)
    "malformed",  # an element outside the pixel data does not parse (unknown VR, a length its VR does not allow,
    # a bad character set) or the data set loses sync while it is parsed: a damaged file, not a cut one
)

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


def parse_errors() -> tuple[type[BaseException], ...]:
    """The exceptions pydicom raises for data it cannot parse or convert: the file's fault, never medpipe's.

    Found in pydicom 3.0's ``filereader``, ``values``, ``hooks`` and ``charset`` and by reading damaged files:
    ``BytesLengthException`` (a value length its VR does not allow), ``NotImplementedError`` (an unknown VR),
    ``ValueError`` (a bad character set, a number that does not parse), ``OSError`` without an errno ("No tag to
    read at file position ...": a sequence item header missing), ``struct.error`` and ``EOFError`` (fewer bytes
    than a header needs). Catch them only around pydicom calls on the file's data.
    """
    from pydicom.errors import BytesLengthException

    return (BytesLengthException, NotImplementedError, ValueError, OSError, struct.error, EOFError)


def decode_errors() -> tuple[type[BaseException], ...]:
    """The exceptions pydicom's pixel pipeline raises for pixel data it cannot decode: the file's fault.

    Found in pydicom 3.0's ``pixels`` package, by the corpus tests and by reading damaged files:
    ``RuntimeError`` (every plugin failed: pydicom's decoder collects what pylibjpeg, openjpeg, libjpeg, rle, gdcm
    and Pillow raise into one RuntimeError, and raises it too when a plugin's dependencies are missing),
    ``NotImplementedError`` (a transfer syntax or bit depth no plugin supports), ``AttributeError`` (a required
    group 0028 element or the transfer syntax missing), ``ValueError`` (an invalid group 0028 value, pixel data
    shorter than the header says), ``TypeError`` (pydicom computes with the file's values as given: text where a
    number belongs, since values are not validated), ``IndexError`` (a LUT that does not fit its descriptor), plus
    :func:`parse_errors` (fragments and LUT elements are parsed on the way). Catch them only around a call of
    pydicom's pixel or LUT functions, where none of medpipe's code runs.
    """
    return (RuntimeError, AttributeError, TypeError, IndexError, *parse_errors())


# Python's conversion errors quote the text they could not convert: a value of the file, never put in a detail.
_QUOTED_VALUE = re.compile(r"(invalid literal for \w+\(\) with base \d+|could not convert string to \w+): [^\n]*")


def library_message(exc: BaseException) -> str:
    """``<type>: <message>`` of a library exception for a quarantine detail: one line, at most 300 characters,
    without the traceback pydicom appends to errors it re-raises with a tag, and without the value that Python's
    int()/float() errors quote (pydicom converts IS/DS values with them)."""
    text = str(exc).split("\nTraceback (most recent call last)")[0]
    text = _QUOTED_VALUE.sub(r"\1: <value not shown>", text)
    return " ".join(f"{type(exc).__name__}: {text}".split())[:300]


@contextmanager
def quiet_pydicom() -> Iterator[None]:
    """For the duration: pydicom neither validates values nor says anything; restored on exit, also on an error.

    pydicom's validation warnings and log records quote attribute values (a patient's name, an id), which must
    never reach a log; values are judged here instead (geometry parsing, the profile's actions). Uses pydicom's
    own ``config.disable_value_validation`` (reading and writing validation off, then the previous modes back),
    lowers the ``pydicom`` logger to CRITICAL and ignores warnings (then restores both). The settings are
    process-wide: ingest reads in worker processes, never in threads.
    """
    from pydicom import config

    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with config.disable_value_validation(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


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
