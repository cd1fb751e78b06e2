"""Decode sanity: is what a decoder returned an image, or garbage that decoded without an error?

Run on every decoded instance (:func:`tasks.dicom.read.read_instance`), on the stored values, before the Modality
LUT; each refusal is a quarantine reason of its own:

* ``corrupt_stream``, before decoding (:func:`check_codestream`, always on): a frame's JPEG / JPEG-LS / JPEG 2000
  header contradicts the data set (a sample precision over BitsAllocated, another size, another number of
  samples). Besides refusing what cannot be the image, this keeps a damaged header away from GDCM, which aborts
  the process on a precision over 16 (JPEG, JPEG-LS) or 37 (JPEG 2000) instead of raising; measured with
  python-gdcm 3.2 through pydicom 3.0.
* ``implausible_values`` (:func:`check_stored`): stored values outside what BitsStored and PixelRepresentation can
  hold. pydicom masks native (uncompressed) data to BitsStored, so this fires on what a codec produced: a damaged
  stream whose values wrapped around.
* ``constant_image``: every value equal, or more than ``max_mode_fraction`` of them equal (an MR whose pixels are
  all zero, a blank secondary capture).
* ``corrupt_stream`` after decoding: a compressed grayscale image (10 or more bits stored, 64 or more pixels a
  side) whose row bands are noise (:func:`jump_fraction` above ``max_jump_fraction``). JPEG Lossless and JPEG-LS
  decoders that lose synchronisation in a damaged stream do not raise: they return striped noise across the
  representable range. (:mod:`tasks.dicom.decode` adds one more: a JPEG-LS stream GDCM rejects.)

The thresholds and how they were chosen are in :class:`SanityLimits`. Plain numpy except :func:`check_codestream`
(pydicom's own codestream parsers, imported when called); nothing here changes the data set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tasks.dicom.errors import DicomError

# The noise statistic is computed on images of at least MIN_SIDE x MIN_SIDE pixels and MIN_BITS bits stored. Smaller
# or coarser, real images are rough at the pixel level and fill their range: 8-bit ultrasound (BUSI) reaches 0.40
# reduced to 128 px and 0.50 at 64 px, MedMNIST's 28 x 28 chest X-rays 0.68; 10- to 16-bit images reduced to 64 px
# stay under 0.16 (pydicom's 10-bit CR RG3 0.15), at 32 px they reach 0.34. The garbage it is for spans a range
# that 10 or more bits give and real content never fills (striped noise across the int16 range).
MIN_SIDE = 64
MIN_BITS = 10
BANDS = 8  # row bands of the noise statistic: damage that starts part way down a frame fills the bands below it
ROWS_PER_BAND = 16  # sampled row pairs per band (128 per frame, whatever its size); the band's value is their
# median, so that one row pair across a horizontal edge does not count (a mean of 8 reached 0.31 on a test pattern)
_MODE_SAMPLE = 1 << 16  # stored values sampled (evenly) for the most common value's share
_FRAME_CHUNK = 64  # frames per vectorised step of the noise statistic (bounds its memory on long cines)


@dataclass(frozen=True)
class SanityLimits:
    """Thresholds of the decode sanity checks (``ingest.sanity``).

    Measured for issue 10 (its closing note has the figures per group). Real images: every image pydicom-data and
    pydicom's test files decode to, 371 slices of the synthetic CT cohort, the 647 BUSI ultrasound images. Damaged:
    2,280 copies of 133 compressed files (the 53 of those test files, and 16 real images encoded with GDCM as JPEG
    Lossless, JPEG-LS, JPEG 2000 and RLE), one byte flipped or 16 overwritten in the entropy-coded data, or one
    byte of a JPEG Huffman table / scan header flipped; "severe": an RMS error of at least half the image's
    standard deviation.

    Attributes:
        max_mode_fraction: an image where a larger share of the stored values equals its most common value is
            ``constant_image``. Real images: at most 0.72 for grayscale (BUSI 0.45, CT 0.10), 0.98 for a colour
            test pattern (pydicom's SC_rgb_jpeg.dcm); a blank image is 1.0.
        max_jump_fraction: a compressed grayscale image (at least :data:`MIN_BITS` bits, :data:`MIN_SIDE` pixels)
            whose :func:`jump_fraction` exceeds this is ``corrupt_stream``. Real images: at most 0.186
            (pydicom-data's LUT test pattern mlut_18.dcm; every other test file 0.006 or less; CT 0.0); uniform
            noise 0.77. Severe damage: median 0.118, at most 0.97, 90 of 281 above 0.25; lesser damage: at most
            0.19, none above. What stays under it is damage that looks like an image (a band of rows shifted by a
            constant: JPEG Lossless resynchronises that way), which no cheap statistic tells from anatomy.
    """

    max_mode_fraction: float = 0.99
    max_jump_fraction: float = 0.25


def value_range(bits_stored: int, signed: bool) -> tuple[int, int]:
    """The stored values that ``bits_stored`` bits can hold: two's complement when ``signed``."""
    return (-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1) if signed else (0, (1 << bits_stored) - 1)


def jump_fraction(frames: np.ndarray, bits_stored: int) -> float:
    """How much of a grayscale image is noise: per row pair, the share of neighbouring stored values (within the
    row, or from the row to the next) more than 1/8 of the representable range (``2**bits_stored``) apart; per row
    band, the median over its row pairs; the worst band of the worst frame.

    Real images change by that much only along a few edges; a desynchronised decoder's rows jump across the range.
    Computed on :data:`ROWS_PER_BAND` evenly spaced row pairs in each of :data:`BANDS` bands (128 row pairs per
    frame: about 0.35 ms for a 512 x 512 frame).

    Args:
        frames: stored values, (H, W) or (F, H, W), integer; H >= 2.
        bits_stored: (0028,0101) BitsStored.

    Returns:
        A fraction in [0, 1]: 0.0 for a smooth image, about 0.77 for uniform noise.
    """
    stack = frames.reshape(-1, *frames.shape[-2:])
    h = stack.shape[1]
    tops = np.linspace(0, h - 2, BANDS * ROWS_PER_BAND).round().astype(np.intp)  # sampled row pairs (r, r + 1)
    step = 2.0 ** bits_stored / 8
    wide = np.int64 if stack.dtype.itemsize >= 4 else np.int32  # differences of 16-bit values overflow int16
    worst = 0.0
    for start in range(0, stack.shape[0], _FRAME_CHUNK):
        top = stack[start : start + _FRAME_CHUNK, tops].astype(wide)  # (f, 128, W)
        below = stack[start : start + _FRAME_CHUNK, tops + 1].astype(wide)
        across = (np.abs(np.diff(top, axis=2)) > step).mean(axis=2)  # (f, 128): within rows
        down = (np.abs(below - top) > step).mean(axis=2)  # (f, 128): row to row
        per_band = np.median(np.maximum(across, down).reshape(len(top), BANDS, ROWS_PER_BAND), axis=2)
        worst = max(worst, float(per_band.max()))
    return worst


def mode_fraction(stored: np.ndarray) -> float:
    """The share of the stored values (every sample, all frames) that equal the most common one, estimated on at
    most :data:`_MODE_SAMPLE` evenly spaced values."""
    flat = stored.reshape(-1)
    sample = flat[:: max(1, flat.size // _MODE_SAMPLE)]
    if sample.dtype.kind in "iu":
        shifted = sample.astype(np.int64) - int(sample.min())
        if int(shifted.max()) < (1 << 20):
            return float(np.bincount(shifted).max() / sample.size)
    return float(np.unique(sample, return_counts=True)[1].max() / sample.size)


def check_stored(
    stored: np.ndarray,
    *,
    bits_stored: int,
    signed: bool,
    grayscale: bool,
    compressed: bool,
    limits: SanityLimits,
) -> None:
    """Refuse decoded stored values that are not an image (before the Modality LUT).

    Args:
        stored: what pydicom's decoder returned: (H, W), (F, H, W), colour with a trailing axis of 3 (RGB, or the
            indices of PALETTE COLOR); integer, or float for Float Pixel Data.
        bits_stored: (0028,0101) BitsStored (ignored for float data).
        signed: (0028,0103) PixelRepresentation is 1.
        grayscale: MONOCHROME1/2 (the noise statistic is computed on grayscale only: a colour or palette-index
            image's samples are no intensities).
        compressed: the transfer syntax is encapsulated (the noise statistic is for a decoder's output only; it
            also needs :data:`MIN_BITS` bits stored and :data:`MIN_SIDE` pixels a side).
        limits: the thresholds.

    Raises:
        DicomError: implausible_values, constant_image or corrupt_stream.
    """
    lo, hi = stored.min(), stored.max()
    if stored.dtype.kind in "iu":
        low, high = value_range(bits_stored, signed)
        if lo < low or hi > high:
            raise DicomError(
                "implausible_values",
                f"decoded stored values span {int(lo)}..{int(hi)}, outside the {low}..{high} that BitsStored "
                f"{bits_stored} ({'signed' if signed else 'unsigned'}) can hold: the decoder returned garbage",
            )
    elif not (np.isfinite(lo) and np.isfinite(hi)):
        raise DicomError("implausible_values", "float pixel data holds NaN or infinite values")
    if lo == hi:
        raise DicomError("constant_image", f"every pixel holds the same stored value ({lo.item()}): no image")
    share = mode_fraction(stored)
    if share > limits.max_mode_fraction:
        raise DicomError("constant_image", f"{share:.1%} of the pixels hold one value (more than "
                                           f"ingest.sanity.max_mode_fraction {limits.max_mode_fraction}): no image")
    checked = grayscale and compressed and bits_stored >= MIN_BITS and min(stored.shape[-2:]) >= MIN_SIDE
    if checked and stored.dtype.kind in "iu":
        jumps = jump_fraction(stored, bits_stored)
        if jumps > limits.max_jump_fraction:
            raise DicomError(
                "corrupt_stream",
                f"the decoded image is striped noise: in its worst row band {jumps:.0%} of neighbouring pixels "
                f"differ by more than 1/8 of the {bits_stored}-bit range (ingest.sanity.max_jump_fraction "
                f"{limits.max_jump_fraction}; real images stay under 0.19): a damaged stream that decoded anyway",
            )


def check_codestream(ds: Any) -> None:
    """Refuse an encapsulated frame whose codestream header contradicts the data set, before any decoder sees it.

    Reads each frame's JPEG / JPEG-LS SOF segment or JPEG 2000 SIZ segment with pydicom's own parsers
    (``_get_jpg_parameters`` is private in pydicom 3.0, ``get_j2k_parameters`` public; the decoders use both to
    set up decoding). A frame those parsers cannot read is left to the decoders, which fail on it with a reason.

    Args:
        ds: a pydicom Dataset with an encapsulated transfer syntax and the Image Pixel module.

    Raises:
        DicomError: corrupt_stream, naming the frame, the header's value and the data set's.
    """
    from pydicom.encaps import generate_frames
    from pydicom.pixels.utils import _get_jpg_parameters, get_j2k_parameters
    from pydicom.uid import JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes

    syntax = ds.file_meta.TransferSyntaxUID
    j2k = syntax in JPEG2000TransferSyntaxes
    if not (j2k or syntax in JPEGLSTransferSyntaxes or syntax in JPEGTransferSyntaxes):
        return
    n_frames = int(ds.get("NumberOfFrames") or 1)
    expected = {"height": int(ds.Rows), "width": int(ds.Columns), "components": int(ds.SamplesPerPixel)}
    bits_allocated = int(ds.BitsAllocated)
    for index, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=n_frames)):
        info = get_j2k_parameters(frame) if j2k else _get_jpg_parameters(frame)
        precision = info.get("precision")
        if precision is not None and not 1 <= precision <= bits_allocated:
            raise DicomError("corrupt_stream", f"frame {index}: the codestream's sample precision is {precision} "
                                               f"bits, the data set's BitsAllocated {bits_allocated}")
        for key, value in expected.items():
            if key in info and info[key] != value:
                raise DicomError("corrupt_stream", f"frame {index}: the codestream's {key} is {info[key]}, the "
                                                   f"data set says {value}")
        if index + 1 >= n_frames:
            break
