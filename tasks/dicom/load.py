"""Loading a file into a pydicom Dataset: gzip-wrapped files unwrapped, files without the Part 10 preamble accepted
only when they hold DICOM image or SOP attributes, and a file that ends inside an element called ``truncated``
(pydicom itself stops quietly at the end of a file). Used by :mod:`tasks.dicom.read`, inside :func:`quiet_pydicom`.
"""

from __future__ import annotations

import gzip
import io
import struct
import zlib
from pathlib import Path
from typing import Any, BinaryIO

from tasks.dicom.errors import DicomError, library_message, parse_errors

_UNDEFINED_LENGTH = 0xFFFFFFFF
_LONGEST_HEADER = 12  # bytes of an element header: explicit VR OB/OW/SQ/UN/UT/...; 8 for the others and implicit VR
_DEFLATED = "1.2.840.10008.1.2.1.99"  # element offsets are in the inflated stream: no end-of-file comparison
_GZIP_MAGIC = b"\x1f\x8b"
_MAX_GUNZIPPED = 1 << 32  # bytes a gzip-wrapped file may unwrap to (4 GiB): a larger one is refused, not read

NOTE_GZIP = "gzip-wrapped file unwrapped"  # the manifest note of this module (stable wording: a reader may count it)
TOO_DEEP = "sequences nested deeper than the reader can follow (RecursionError)"


def _check_not_truncated(ds: Any, size: int | None) -> None:
    """Raise ``truncated`` when the file ends inside an element.

    pydicom stops quietly at end of file, also inside an element's header; the last element read is the evidence:
    its value holds fewer bytes than its header declared, or (a data set without pixel data) fewer bytes than an
    element header follow it (``size``: the file's length; None when offsets are not in file bytes). A
    file cut exactly at an element boundary cannot be told from a complete one and is judged on what it contains.
    """
    if len(ds) == 0:
        raise DicomError("truncated", "the file ends after the file meta information (no data set)")
    last = ds.get_item(list(ds.keys())[-1])
    length = getattr(last, "length", None)
    value = getattr(last, "value", None)
    if isinstance(value, bytes) and length not in (None, _UNDEFINED_LENGTH) and len(value) < length:
        raise DicomError("truncated", f"element {last.tag} declares {length} bytes but the file holds {len(value)}")
    tell = getattr(last, "value_tell", None)
    if size is None or tell is None or length in (None, _UNDEFINED_LENGTH) or any(
        k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
    ):
        return
    left = size - (tell + length)
    if 0 < left < _LONGEST_HEADER:
        raise DicomError("truncated", f"the file ends inside the header of the element after {last.tag} "
                                      f"({left} bytes of it)")


def _unwrap_gzip(path: Path) -> bytes:
    """The content of a gzip-wrapped file (``.dcm.gz``), at most :data:`_MAX_GUNZIPPED` bytes.

    Raises:
        DicomError: truncated (the gzip stream ends early) or malformed (it is damaged, or unwraps to more than
            4 GiB).
    """
    try:
        with gzip.open(path, "rb") as fh:
            data = fh.read(_MAX_GUNZIPPED + 1)
    except EOFError as exc:
        raise DicomError("truncated", f"the gzip stream ends early: {library_message(exc)}") from None
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise DicomError("malformed", f"a damaged gzip stream: {library_message(exc)}") from None
    if len(data) > _MAX_GUNZIPPED:
        raise DicomError("malformed", "the gzip-wrapped content is larger than 4 GiB: not unwrapped")
    return data


def load_dataset(path: Path, notes: list[str] | None = None) -> Any:
    """Read a file into a pydicom Dataset, validated as DICOM (inside :func:`quiet_pydicom`).

    A gzip-wrapped file is unwrapped first (a note says so). A file without the Part 10 preamble ("DICM" at byte
    128) is re-read with ``force=True`` and accepted only if it then holds DICOM image or SOP attributes; its
    transfer syntax is taken from how it parsed.

    Args:
        notes: the image's notes (appended to).

    Raises:
        DicomError: empty_file, unreadable, not_dicom, truncated or malformed.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        size = path.stat().st_size
        if size == 0:
            raise DicomError("empty_file", "the file has 0 bytes")
        with path.open("rb") as fh:
            wrapped = fh.read(2) == _GZIP_MAGIC
        source: Path | BinaryIO = path
        if wrapped:
            data = _unwrap_gzip(path)
            if notes is not None:
                notes.append(NOTE_GZIP)
            if not data:
                raise DicomError("empty_file", "the gzip-wrapped content has 0 bytes")
            source, size = io.BytesIO(data), len(data)
        try:
            ds = pydicom.dcmread(source, force=False)
        except InvalidDicomError:
            ds = _read_forced(source)
    except OSError as exc:
        if exc.errno is not None:  # the operating system's, not pydicom's "No tag to read at file position ..."
            raise DicomError("unreadable", f"{type(exc).__name__}: {exc.strerror or exc}") from None
        raise DicomError("truncated", f"while parsing: {library_message(exc)}") from None
    except (struct.error, EOFError) as exc:  # fewer bytes than a header needs: a file cut inside its meta or data
        raise DicomError("truncated", f"while parsing: {library_message(exc)}") from None
    except parse_errors() as exc:  # an unknown VR, a bad length, a bad character set in the header
        raise DicomError("malformed", f"while parsing: {library_message(exc)}") from None
    except RecursionError:  # pydicom parses nested sequences recursively: a damaged or hostile file
        raise DicomError("malformed", f"while parsing: {TOO_DEEP}") from None
    deflated = str(ds.file_meta.get("TransferSyntaxUID", "")) == _DEFLATED
    _check_not_truncated(ds, None if deflated else size)
    return ds


def _read_forced(source: Path | BinaryIO) -> Any:
    """A preamble-less file: parse with force, then insist on DICOM content (force parses anything)."""
    import pydicom
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if not isinstance(source, Path):
        source.seek(0)
    try:
        ds = pydicom.dcmread(source, force=True)
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
