"""Decoding a loaded data set's pixels: stored values with pydicom's pixel plugins (:func:`stored_values`), then
modality values (:func:`to_values`: the Modality LUT or rescale, the VOI LUT / window when asked, MONOCHROME1
inverted, colour to RGB).

Where pydicom's plugins alone would lose an image or return garbage, and a plugin that is installed does better:

* JPEG-LS: decoded with GDCM (CharLS) when it is available and supports the stream; a stream CharLS rejects but
  pylibjpeg decodes is ``corrupt_stream`` (pylibjpeg decodes damaged JPEG-LS streams into garbage without an
  error: of 96 damaged streams measured, CharLS rejected 95, pylibjpeg none).
* 12-bit JPEG Extended (process 2 & 4) that no plugin decodes: decoded with GDCM directly. pydicom's GDCM plugin
  declines 12-bit JPEG Extended although python-gdcm carries IJG's 12-bit codec, Pillow has no 12-bit JPEG, and
  libjpeg (pylibjpeg) rejects streams whose sequential scan header is non-conformant (pydicom's JPEG-lossy.dcm:
  GDCM decodes it to within 1 of its corrected copy JPGExtended.dcm decoded by libjpeg).
* A Modality or VOI LUT Sequence whose item is empty (no LUTDescriptor or LUTData) is ignored: the rescale (or
  the window) applies instead, and the image carries a note saying so.

What the plugins and LUT functions raise for the file's data becomes a :class:`DicomError` reason here; anything
else propagates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from tasks.dicom.errors import DicomError, decode_errors, library_message

COLOR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "PALETTE COLOR")
GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")

# the manifest notes of this module (stable wording: a reader may count them)
NOTE_MODALITY_LUT = "empty Modality LUT Sequence item ignored: RescaleSlope/RescaleIntercept applied"
NOTE_VOI_LUT = "empty VOI LUT Sequence item ignored: the window (if any) applied"
NOTE_JPEG12_GDCM = "12-bit JPEG Extended decoded with GDCM directly (no pydicom plugin decodes it)"


def functional(ds: Any, frame: int, sequence: str, keyword: str) -> Any:
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
        slope = functional(ds, f, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = functional(ds, f, "PixelValueTransformationSequence", "RescaleIntercept")
        if slope is None and intercept is None:
            return None
        out.append((_number(slope, "RescaleSlope", 1.0), _number(intercept, "RescaleIntercept", 0.0)))
    return out


def lut_state(ds: Any, keyword: str) -> str:
    """"absent", "usable" or "empty": whether ``keyword`` (ModalityLUTSequence / VOILUTSequence) has a first item
    with both LUTDescriptor and LUTData (pydicom's LUT functions read only the first item)."""
    items = ds.get(keyword)
    if not items:
        return "absent"
    item = items[0]
    return "usable" if item.get("LUTDescriptor") and item.get("LUTData") else "empty"


def _check_window(ds: Any) -> None:
    """Refuse a window that pydicom's ``apply_windowing`` would choke on (it computes with the values as given)."""
    for keyword in ("WindowCenter", "WindowWidth"):
        value = ds.get(keyword)
        values = [value] if isinstance(value, (str, float, int)) or not hasattr(value, "__iter__") else value
        for v in values:
            _number(v, keyword, 0.0)


def _is_panic(exc: BaseException) -> bool:
    """A Rust decoder's panic (pyo3's ``PanicException``, a BaseException: pylibjpeg-rle panics on some damaged RLE
    segments). pydicom's plugin loop catches only Exception, so it ends decoding instead of the next plugin."""
    return type(exc).__name__ == "PanicException" and type(exc).__module__ == "pyo3_runtime"


def _attempt(decode: Callable[[], np.ndarray]) -> tuple[np.ndarray | None, BaseException | None]:
    """Run one of pydicom's decoding calls: (the array, None), or (None, what it raised for the file's data)."""
    try:
        return decode(), None
    except decode_errors() as exc:  # a codec missing, a corrupt stream, a bad group 0028
        return None, exc
    except BaseException as exc:
        if not _is_panic(exc):
            raise
        return None, exc


def _failure(exc: BaseException) -> DicomError:
    """The reason for a failed decoding call: truncated for pixel data shorter than its header says, else
    decode_failed."""
    if isinstance(exc, ValueError) and "less than expected" in str(exc):
        return DicomError("truncated", f"Pixel Data is shorter than Rows x Columns x Frames: {exc}")
    if _is_panic(exc):
        return DicomError("decode_failed", f"a decoder panicked on the stream: {library_message(exc)}")
    return DicomError("decode_failed", library_message(exc))


def stored_values(ds: Any, photometric: str, notes: list[str]) -> np.ndarray:
    """The stored values pydicom's plugins decode (YBR_* converted to RGB), before any LUT.

    Args:
        ds: the loaded data set (encapsulated frames already checked by
            :func:`tasks.dicom.sanity.check_codestream`).
        photometric: as judged by :func:`tasks.dicom.read.check_usable`: passed to the decoder when the file has
            no PhotometricInterpretation (ACR-NEMA), as SamplesPerPixel 1 when it has none either.
        notes: the image's notes; a decoding path outside pydicom's plugins adds one.

    Returns:
        (H, W), (F, H, W) or with a trailing axis of 3 for colour; the dtype pydicom gives (BitsAllocated,
        PixelRepresentation), float for Float Pixel Data.

    Raises:
        DicomError: decode_failed, truncated or corrupt_stream.
    """
    from pydicom.pixels import pixel_array
    from pydicom.uid import JPEGExtended12Bit, JPEGLSTransferSyntaxes

    options: dict[str, Any] = {}
    if "PhotometricInterpretation" not in ds:
        options["photometric_interpretation"] = photometric
    if "SamplesPerPixel" not in ds:
        options["samples_per_pixel"] = 1
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax in JPEGLSTransferSyntaxes and _gdcm_decodes_jpeg_ls(ds, syntax):
        strict, error = _attempt(lambda: pixel_array(ds, decoding_plugin="gdcm", **options))
        if strict is not None:
            return strict
        lenient, other = _attempt(lambda: pixel_array(ds, **options))  # the other plugins (pylibjpeg)
        if lenient is None:
            raise _failure(other) from None
        raise DicomError("corrupt_stream", f"GDCM (CharLS) rejects the JPEG-LS stream that pylibjpeg decodes "
                                           f"without an error, as it decodes damaged JPEG-LS streams into garbage; "
                                           f"GDCM: {library_message(error)}")  # fmt: skip
    stored, error = _attempt(lambda: pixel_array(ds, **options))
    if stored is not None:
        return stored
    if syntax == JPEGExtended12Bit and int(ds.get("BitsStored") or 8) > 8 and _have_gdcm():
        out = _gdcm_jpeg_extended(ds, library_message(error))
        notes.append(NOTE_JPEG12_GDCM)
        return out
    raise _failure(error) from None


def _have_gdcm() -> bool:
    try:
        import gdcm  # noqa: F401
    except ImportError:
        return False
    return True


def _gdcm_decodes_jpeg_ls(ds: Any, syntax: str) -> bool:
    """GDCM is one of pydicom's available plugins for ``syntax`` and takes this stream: pydicom 3.0's GDCM plugin
    declines 6- and 7-bit JPEG-LS and signed near-lossless JPEG-LS under 8 bits (then pylibjpeg decodes it)."""
    from pydicom.pixels.decoders.base import get_decoder
    from pydicom.uid import JPEGLSNearLossless

    if "gdcm" not in get_decoder(syntax).available_plugins:
        return False
    bits = int(ds.get("BitsStored") or 0)
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    return bits not in (6, 7) and not (syntax == JPEGLSNearLossless and signed and bits < 8)


def _gdcm_jpeg_extended(ds: Any, plugins: str) -> np.ndarray:
    """Decode 12-bit JPEG Extended (1.2.840.10008.1.2.4.51) single-sample frames with GDCM's API, as pydicom's
    GDCM plugin does for the other JPEG processes (its 12-bit refusal is the only difference).

    Args:
        plugins: why pydicom's plugins failed, for the detail when GDCM fails too.

    Returns:
        (H, W) or (F, H, W) in pydicom's dtype for the data set (BitsAllocated, PixelRepresentation).

    Raises:
        DicomError: decode_failed, with pydicom's plugins' messages and GDCM's.
    """
    import gdcm
    from pydicom.encaps import generate_frames
    from pydicom.pixels.utils import pixel_dtype

    rows, columns = int(ds.Rows), int(ds.Columns)
    n_frames = int(ds.get("NumberOfFrames") or 1)
    bits, allocated = int(ds.BitsStored), int(ds.BitsAllocated)
    if int(ds.get("SamplesPerPixel") or 1) != 1:
        raise DicomError("decode_failed", f"{plugins}; GDCM directly: only single-sample 12-bit JPEG Extended")
    dtype = pixel_dtype(ds)
    out = np.empty((n_frames, rows, columns), dtype=dtype)
    for index, src in enumerate(generate_frames(ds.PixelData, number_of_frames=n_frames)):
        fragment = gdcm.Fragment()
        fragment.SetByteStringValue(src)
        fragments = gdcm.SequenceOfFragments.New()
        fragments.AddFragment(fragment)
        element = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
        element.SetValue(fragments.__ref__())
        image = gdcm.Image()
        image.SetNumberOfDimensions(2)
        image.SetDimensions((columns, rows, 1))
        image.SetDataElement(element)
        image.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(gdcm.PhotometricInterpretation.MONOCHROME2))
        image.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGExtendedProcess2_4))
        image.SetPixelFormat(gdcm.PixelFormat(1, allocated, bits, bits - 1, int(ds.PixelRepresentation)))
        buffer = image.GetBuffer()  # None when GDCM cannot decode the frame
        if buffer is None:
            raise DicomError("decode_failed", f"{plugins}; GDCM directly: frame {index} does not decode")
        frame = np.frombuffer(buffer.encode("utf-8", "surrogateescape"), dtype=dtype)  # GDCM returns char* as str
        if frame.size != rows * columns:
            raise DicomError("decode_failed", f"{plugins}; GDCM directly: frame {index} decodes to {frame.size} "
                                              f"values, not Rows x Columns {rows * columns}")
        out[index] = frame.reshape(rows, columns)
        if index + 1 >= n_frames:
            break
    return out[0] if n_frames == 1 else out


def _lut(apply: Callable[..., np.ndarray], arr: np.ndarray, ds: Any, what: str) -> np.ndarray:
    """One of pydicom's LUT functions, with its failures on the file's LUT or window elements as reasons."""
    try:
        return apply(arr, ds)
    except decode_errors() as exc:
        raise DicomError("decode_failed", f"{what}: {library_message(exc)}") from None


def to_values(ds: Any, stored: np.ndarray, photometric: str, voi: bool, notes: list[str]) -> np.ndarray:
    """Stored values to float32: colour to RGB (trailing axis 3), else the Modality LUT (per frame for enhanced
    objects), then the VOI LUT / window when ``voi``, then MONOCHROME1 inverted.

    Args:
        stored: from :func:`stored_values`.
        notes: the image's notes; an empty LUT item ignored adds one.

    Returns:
        float32 in modality units (HU for CT; display units when ``voi``), or RGB in its integer dtype.

    Raises:
        DicomError: decode_failed for LUT, rescale or window elements that cannot be applied.
    """
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, apply_windowing

    if photometric in COLOR:  # colour keeps its integer dtype (native byte order): 4x less to move than float32
        rgb = _lut(apply_color_lut, stored, ds, "palette colour LUT") if photometric == "PALETTE COLOR" else stored
        return np.ascontiguousarray(rgb, dtype=rgb.dtype.newbyteorder("="))
    n_frames = int(ds.get("NumberOfFrames") or 1)  # pydicom has just decoded that many frames
    per_frame = _frame_rescale(ds, n_frames) if n_frames > 1 else None
    modality_lut = lut_state(ds, "ModalityLUTSequence")
    lut = per_frame is None and modality_lut == "usable"
    if per_frame is None and modality_lut == "empty":
        notes.append(NOTE_MODALITY_LUT)
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
    if voi:
        voi_lut = lut_state(ds, "VOILUTSequence")
        if voi_lut == "usable":  # pydicom prefers the LUT over a window, as the standard does
            values = _lut(apply_voi_lut, values, ds, "VOI LUT")
        elif ds.get("WindowCenter") is not None:
            _check_window(ds)
            values = _lut(apply_windowing, values, ds, "window")
        if voi_lut == "empty":
            notes.append(NOTE_VOI_LUT)
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
