"""Why a DICOM file cannot be used: the stable reason codes, :class:`DicomError`, which library exceptions are the
file's fault (:func:`parse_errors`, :func:`decode_errors`), and :func:`quiet_pydicom`, which keeps pydicom from
validating or logging values (they quote identifiers) and restores its settings afterwards.
"""

from __future__ import annotations

import logging
import re
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

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
    # a bad character set), the data set loses sync while it is parsed, or its sequences nest deeper than the
    # reader can follow (a RecursionError in pydicom's parser or the profile): a damaged file, not a cut one
    # --- decode sanity (tasks/dicom/sanity.py): the pixels decoded, but they are not an image to learn from
    "implausible_values",  # decoded stored values outside what BitsStored / PixelRepresentation can hold (a codec's
    # garbage: pydicom masks native data to BitsStored), or NaN / infinity in float pixel data
    "constant_image",  # every pixel holds one value, or more than ingest.sanity.max_mode_fraction of them do
    "corrupt_stream",  # a damaged compressed stream: its header contradicts the data set (precision, size,
    # samples), GDCM (CharLS) rejects a JPEG-LS stream that pylibjpeg decodes anyway, or the decoded grayscale
    # image is striped noise (more than ingest.sanity.max_jump_fraction of a row band's neighbours far apart)
    "excluded_image_type",  # an ImageType value listed in ingest.exclude_image_types (LOCALIZER: scouts)
)

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
