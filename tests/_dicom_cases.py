"""DICOM files made for the reader's cases (issue 10): each from one of pydicom's test files, changed with pydicom
(or byte by byte where pydicom cannot write the damage), written into a folder by :func:`make_all`.

Every case names the test file it starts from, what it changes and why that change exercises the reader. The
expected outcome of each file is in the per-file expectation table of tests/test_corpus.py (corpus ``made``).
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.sequence import Sequence
from pydicom.uid import JPEG2000Lossless, RLELossless


def testdata(name: str) -> Path:
    path = get_testdata_file(name)
    if path is None:
        raise FileNotFoundError(f"{name} is not among pydicom's test files")
    return Path(path)


def _edit(name: str, change: Callable[[Dataset], None]) -> Callable[[Path], None]:
    def build(out: Path) -> None:
        ds = pydicom.dcmread(testdata(name))
        change(ds)
        ds.save_as(out, enforce_file_format=True)

    return build


def _set(**values: object) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        for keyword, value in values.items():
            setattr(ds, keyword, value)

    return change


def _frame_bytes(name: str) -> tuple[Dataset, bytearray]:
    ds = pydicom.dcmread(testdata(name))
    return ds, bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))


def _damaged_stream(name: str, damage: Callable[[bytearray], None]) -> Callable[[Path], None]:
    """A single-frame compressed test file with its codestream changed by ``damage``."""

    def build(out: Path) -> None:
        ds, frame = _frame_bytes(name)
        damage(frame)
        ds.PixelData = encapsulate([bytes(frame)])
        ds.save_as(out, enforce_file_format=True)

    return build


def _flip(at: Callable[[bytearray], int], mask: int) -> Callable[[bytearray], None]:
    def damage(frame: bytearray) -> None:
        frame[at(frame)] ^= mask

    return damage


def _jpeg_precision(frame: bytearray) -> None:
    """The SOF segment's sample precision (the byte after the marker and its 2-byte length) set to 53 bits."""
    sof = frame.index(b"\xff\xc3")  # JPEG Lossless, process 14
    frame[sof + 4] = 53


def _gzip(name: str) -> Callable[[Path], None]:
    def build(out: Path) -> None:
        out.write_bytes(gzip.compress(testdata(name).read_bytes(), mtime=0))

    return build


def _acr_nema(out: Path) -> None:
    """MR_small.dcm as an ACR-NEMA 2.0 file is: no preamble, no file meta, implicit VR little endian, no
    PhotometricInterpretation and no SamplesPerPixel (ACR-NEMA had neither). The SOP Class UID stays: without it
    the de-identified Part 10 copy cannot be written (tasks/dicom/write.py needs MediaStorageSOPClassUID)."""
    ds = pydicom.dcmread(testdata("MR_small.dcm"))
    for keyword in ("PhotometricInterpretation", "SamplesPerPixel"):
        delattr(ds, keyword)
    del ds.file_meta
    ds.preamble = None
    ds.save_as(out, implicit_vr=True, little_endian=True)


def _cut_in_header(out: Path) -> None:
    """MR_small.dcm cut 3 bytes into the header of the element before Pixel Data (explicit VR, a short VR: an
    8-byte header): pydicom stops quietly there, and the data set it returns has no Pixel Data."""
    ds = pydicom.dcmread(testdata("MR_small.dcm"))
    tags = list(ds.keys())
    before = ds.get_item(tags[tags.index(0x7FE00010) - 1])
    assert before.VR not in ("OB", "OW", "OF", "SQ", "UT", "UN")  # an 8-byte header
    out.write_bytes(testdata("MR_small.dcm").read_bytes()[: before.value_tell - 8 + 3])


def _deep_nesting(out: Path, depth: int = 3000) -> None:
    """MR_small.dcm with a Referenced Image Sequence nested ``depth`` items deep (undefined lengths), written byte by
    byte: pydicom cannot write such a file (its writer recurses too), but it reads one until its recursion fails."""
    raw = testdata("MR_small.dcm").read_bytes()
    pixel_data = raw.index(b"\xe0\x7f\x10\x00")
    sequence = struct.pack("<HH2sHI", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF)
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    ends = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    out.write_bytes(raw[:pixel_data] + (sequence + item) * depth + ends * depth + raw[pixel_data:])


def _pixels(values: np.ndarray, name: str = "MR_small.dcm", syntax: str | None = None,
            bits_stored: int = 16, header_bits: int | None = None) -> Callable[[Path], None]:  # fmt: skip
    """A test file's pixels replaced by ``values`` (native, or compressed with ``syntax``); ``header_bits``: the
    BitsStored the data set then claims (to make the stored values out of range)."""

    def build(out: Path) -> None:
        ds = pydicom.dcmread(testdata(name))
        ds.PixelRepresentation = int(values.dtype.kind == "i")
        if syntax is None:
            ds.set_pixel_data(values, photometric_interpretation="MONOCHROME2", bits_stored=bits_stored)
        else:
            ds.compress(syntax, values, bits_stored=bits_stored)
        if header_bits is not None:
            ds.BitsStored, ds.HighBit = header_bits, header_bits - 1
        ds.save_as(out, enforce_file_format=True)

    return build


def _striped_noise(shape: tuple[int, int] = (64, 64), seed: int = 0) -> np.ndarray:
    """What a desynchronised decoder returns: columns of values across the whole int16 range, plus noise (the
    shape of pylibjpeg's decode of a damaged JPEG-LS stream)."""
    rng = np.random.default_rng(seed)
    columns = rng.integers(-32768, 32767, shape[1])
    noise = rng.integers(-4000, 4000, shape)
    return np.clip(columns[None, :] + noise, -32768, 32767).astype(np.int16)


def _ramp(shape: tuple[int, int] = (64, 64), step: int = 14) -> np.ndarray:
    """A smooth image: 0, step, 2 * step, ... row by row (uint16: 0..57330 for the default)."""
    return (np.arange(shape[0] * shape[1]).reshape(shape) * step).astype(np.uint16)


def _near_constant() -> np.ndarray:
    out = np.zeros((64, 64), np.int16)
    out[10, 10:13] = (5, 6, 7)  # 3 of 4,096 pixels: 99.93 % hold one value
    return out


# name -> builder; the expected outcome of each is in tests/test_corpus.py (corpus "made")
MADE: dict[str, Callable[[Path], None]] = {
    "empty_modality_lut.dcm": _edit("CT_small.dcm", _set(ModalityLUTSequence=Sequence([Dataset()]))),
    "empty_voi_lut.dcm": _edit("CT_small.dcm", _set(VOILUTSequence=Sequence([Dataset()]))),
    "ct_small.dcm.gz": _gzip("CT_small.dcm"),
    "acr_nema_no_photometric.dcm": _acr_nema,
    "cut_in_header.dcm": _cut_in_header,
    "deep_nesting.dcm": _deep_nesting,
    "localizer.dcm": _edit("CT_small.dcm", _set(ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])),
    "all_zero.dcm": _pixels(np.zeros((64, 64), np.int16)),
    "near_constant.dcm": _pixels(_near_constant()),
    "j2k_values_over_bits_stored.dcm": _pixels(_ramp(), syntax=JPEG2000Lossless, header_bits=12),
    "rle_striped_noise.dcm": _pixels(_striped_noise(), syntax=RLELossless),
    "rle_ramp.dcm": _pixels(_ramp(step=1).astype(np.int16), syntax=RLELossless),  # the same codec, a smooth image
    "jpegls_damaged.dcm": _damaged_stream("MR_small_jpeg_ls_lossless.dcm", _flip(lambda f: len(f) // 3, 0x5A)),
    "jpeg_precision_53.dcm": _damaged_stream("JPEG-LL.dcm", _jpeg_precision),
    "jpeg_rows_mismatch.dcm": _edit("JPEG-LL.dcm", _set(Rows=512)),
    "rle_panic.dcm": _damaged_stream("MR_small_RLE.dcm", _flip(lambda f: 162, 0x80)),
}


def make_all(folder: Path) -> Path:
    """Write every file of :data:`MADE` into ``folder`` (created); returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, build in MADE.items():
        build(folder / name)
    return folder
