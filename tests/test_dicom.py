"""tasks.dicom: reading with reasons for every failure, the CT writer, and pydicom confined to one module."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from tasks.dicom import CT_IMAGE_STORAGE, REASONS, CtSliceHeader, DicomError, derive_uid, read_dicom, write_ct_slice

REPO = Path(__file__).resolve().parents[1]


def _header(**changes) -> CtSliceHeader:
    base = dict(
        patient_name="DOE^JANE", patient_id="MRN0001", patient_birth_date="19600229", patient_sex="F",
        accession_number="ACC1", institution_name="TEST HOSPITAL", referring_physician_name="WHO^DR",
        study_date="20200102", study_time="101500", study_id="1", study_description="CT CHEST",
        study_uid=derive_uid("t", "study"), series_uid=derive_uid("t", "series"), sop_uid=derive_uid("t", "sop"),
        frame_of_reference_uid=derive_uid("t", "for"), series_number=1, instance_number=3,
        pixel_spacing=(0.7, 0.8), slice_thickness=2.5, image_position=(-100.0, -120.0, 35.5),
    )  # fmt: skip
    return CtSliceHeader(**{**base, **changes})


@pytest.fixture
def ct_file(tmp_path: Path) -> Path:
    """A 16 x 20 CT slice whose HU values are -1024 + 10 * index."""
    stored = (np.arange(16 * 20, dtype=np.int16) * 10).reshape(16, 20)
    path = tmp_path / "ct.dcm"
    write_ct_slice(path, stored, _header())
    return path


def test_written_slice_is_valid_part10_ct(ct_file: Path) -> None:
    raw = ct_file.read_bytes()
    assert raw[128:132] == b"DICM"
    ds = pydicom.dcmread(ct_file, force=False)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.file_meta.MediaStorageSOPClassUID == CT_IMAGE_STORAGE == ds.SOPClassUID
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert (ds.Rows, ds.Columns, ds.BitsAllocated, ds.PixelRepresentation) == (16, 20, 16, 1)
    assert ds.pixel_array.dtype == np.int16
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, -1024.0)
    assert str(ds.PatientName) == "DOE^JANE" and ds.AccessionNumber == "ACC1"


def test_read_round_trip(ct_file: Path) -> None:
    im = read_dicom(ct_file, label_key="AccessionNumber")
    assert im.pixels.dtype == np.float32 and im.pixels.shape == (16, 20)
    np.testing.assert_array_equal(im.pixels.ravel(), -1024 + 10 * np.arange(320, dtype=np.float32))
    assert (im.modality, im.unit, im.rows, im.columns, im.n_frames) == ("CT", "HU", 16, 20, 1)
    assert im.pixel_spacing == pytest.approx((0.7, 0.8))
    assert im.slice_thickness == 2.5 and im.instance_number == 3
    assert im.image_position == pytest.approx((-100.0, -120.0, 35.5))
    assert im.image_orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert (im.window_center, im.window_width) == (40.0, 400.0)
    assert im.ids.patient_id == "MRN0001" and im.ids.label_value == "ACC1" and im.ids.study_date == "20200102"
    assert im.ids.sop_uid == derive_uid("t", "sop")


def test_derive_uid_is_deterministic_and_valid() -> None:
    uid = derive_uid("a", 1)
    assert uid == derive_uid("a", 1) != derive_uid("a", 2)
    assert re.fullmatch(r"1\.2\.826\.0\.1\.3680043\.8\.498\.[1-9]\d*", uid) and len(uid) <= 64


def _truncate(path: Path, keep: float) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])


def _without_pixels(path: Path) -> None:
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path, enforce_file_format=True)


def _rgb(path: Path) -> None:
    ds = pydicom.dcmread(path)
    ds.set_pixel_data(np.zeros((8, 8, 3), np.uint8), photometric_interpretation="RGB", bits_stored=8)
    ds.save_as(path, enforce_file_format=True)


def _jpeg_syntax_on_garbage(path: Path) -> None:
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.50"  # JPEG Baseline, but the fragment is not JPEG
    ds.PixelData = encapsulate([b"\x00not a jpeg stream\x00" * 8])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)


def _set_photometric(value: str):
    def damage(path: Path) -> None:
        ds = pydicom.dcmread(path)
        ds.PhotometricInterpretation = value
        ds.save_as(path, enforce_file_format=True)

    return damage


CASES = [
    ("empty_file", lambda p: p.write_bytes(b"")),
    ("not_dicom", lambda p: p.write_text("PatientName,Accession\nDOE^JANE,ACC1\n")),
    ("not_dicom", lambda p: p.write_bytes(b"\0" * 4096)),
    ("truncated", lambda p: _truncate(p, 0.5)),
    ("truncated", lambda p: _truncate(p, 0.99)),
    ("no_pixel_data", _without_pixels),
    ("color_rejected", _rgb),
    ("unsupported_photometric", _set_photometric("CMYK")),
    ("decode_failed", _jpeg_syntax_on_garbage),
    ("decode_failed", lambda p: _unsupported_syntax(p)),
]


def _unsupported_syntax(path: Path) -> None:
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no installed decoder
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" * 16])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)


def test_a_malformed_geometry_value_is_dropped_not_fatal(ct_file: Path) -> None:
    raw = ct_file.read_bytes()
    ds = pydicom.dcmread(ct_file)
    value = "\\".join(str(v) for v in ds.ImagePositionPatient).encode()
    at = raw.index(value)
    bad = b"abc\\def\\g".ljust(len(value))  # DS that is not a number, same length
    ct_file.write_bytes(raw[:at] + bad + raw[at + len(value):])
    im = read_dicom(ct_file)
    assert im.image_position is None and im.pixels.shape == (im.rows, im.columns)


@pytest.mark.parametrize(("reason", "damage"), CASES, ids=[f"{r}-{i}" for i, (r, _) in enumerate(CASES)])
def test_bad_files_raise_dicom_error_with_reason(ct_file: Path, reason: str, damage) -> None:
    damage(ct_file)
    with pytest.raises(DicomError) as info:
        read_dicom(ct_file)
    assert info.value.reason == reason, info.value.detail
    assert info.value.detail and "DOE" not in info.value.detail


def test_monochrome1_is_inverted(ct_file: Path) -> None:
    ds = pydicom.dcmread(ct_file)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(ct_file, enforce_file_format=True)
    plain = -1024 + 10 * np.arange(320, dtype=np.float32)
    # int16 stored range [-32768, 32767] through the rescale is [-33792, 31743]; MONOCHROME1 maps v to lo+hi-v
    np.testing.assert_array_equal(read_dicom(ct_file).pixels.ravel(), (-33792 + 31743) - plain)


def test_dicom_error_is_picklable_and_reasons_are_closed() -> None:
    err = pickle.loads(pickle.dumps(DicomError("truncated", "cut")))
    assert (err.reason, err.detail) == ("truncated", "cut")
    with pytest.raises(ValueError, match="unknown DicomError reason"):
        DicomError("something_new", "x")
    assert len(set(REASONS)) == len(REASONS)


@pytest.mark.parametrize(
    ("name", "reason"),
    [("CT_small.dcm", None), ("MR_small.dcm", None), ("rtplan.dcm", "no_pixel_data"),
     ("SC_rgb.dcm", "color_rejected"), ("liver.dcm", "not_an_image")],
)  # fmt: skip
def test_pydicom_test_files(name: str, reason: str | None) -> None:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} not available in this pydicom installation")
    if reason is None:
        im = read_dicom(path)
        assert im.pixels.dtype == np.float32 and im.pixels.shape == (im.rows, im.columns)
        if im.modality == "CT":
            assert -1100 < im.pixels.min() < im.pixels.max() < 3100  # HU after the modality LUT
    else:
        with pytest.raises(DicomError) as info:
            read_dicom(path)
        assert info.value.reason == reason


def test_only_tasks_dicom_imports_pydicom() -> None:
    offenders = []
    for path in [*REPO.glob("tasks/**/*.py"), *REPO.glob("flows/**/*.py")]:
        if path.parent.name == "dicom" and path.parent.parent.name == "tasks":
            continue
        if re.search(r"^\s*(import pydicom|from pydicom)", path.read_text(), flags=re.M):
            offenders.append(str(path.relative_to(REPO)))
    assert not offenders, f"pydicom imported outside tasks/dicom/: {offenders}"
