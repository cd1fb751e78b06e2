"""tasks.dicom: reading with reasons for every failure (and none for a bug), the CT writer, the de-identified copy,
pydicom's global settings left alone, and pydicom confined to one package."""

from __future__ import annotations

import logging
import pickle
import re
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from tasks.config import DeidParams
from tasks.dicom import (
    CT_IMAGE_STORAGE,
    REASONS,
    CtSliceHeader,
    DicomError,
    derive_uid,
    read_dicom,
    read_instance,
    write_ct_slice,
    write_deidentified,
)
from tasks.dicom.profile import deidentify
from tasks.dicom.pseudonym import Pseudonymizer
from tasks.sources import dicom_folder

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


def _damage_vr(keyword_tag: bytes, vr: bytes, new_vr: bytes):
    """Replace an explicit-VR element's VR by an unknown one, two capitals (pydicom then reads a 2-byte length, so
    the file still parses) that fails only when the element is converted."""

    def damage(path: Path) -> None:
        raw = path.read_bytes()
        at = raw.index(keyword_tag + vr)
        path.write_bytes(raw[: at + 4] + new_vr + raw[at + 6 :])

    return damage


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
    ("malformed", _damage_vr(b"\x08\x00\x16\x00", b"UI", b"QQ")),  # SOPClassUID: read when the file is judged
    ("decode_failed", _damage_vr(b"\x28\x00\x11\x00", b"US", b"SH")),  # Columns as text: a TypeError in pydicom
    ("unreadable", lambda p: (p.unlink(), p.mkdir())),  # the operating system refuses to read it (a folder)
    ("not_an_image", lambda p: _set(p, SOPClassUID="1.2.840.10008.5.1.4.1.1.66.4")),  # a Segmentation object
]


def _set(path: Path, **values: str) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)


def test_every_reason_has_a_case() -> None:
    """A reason added to REASONS gets a case here (deid_failed: the tests below, with a de-identification)."""
    assert {reason for reason, _ in CASES} | {"deid_failed"} == set(REASONS)


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


# --- reasons that mean what they say: the file's faults are reasons, our bugs stop the run ---------------------------

DEID = partial(deidentify, pseudo=Pseudonymizer.from_params(DeidParams()), opts=DeidParams())


def test_a_deidentification_failure_is_deid_failed(ct_file: Path, tmp_path: Path) -> None:
    """The real profile on a file whose AccessionNumber (the profile empties it) has an unknown VR: pydicom's parse
    error inside the profile is the file's, and its reason is deid_failed, not decode_failed."""
    _damage_vr(b"\x08\x00\x50\x00", b"SH", b"QQ")(ct_file)
    read_dicom(ct_file)  # without de-identification nothing touches the damaged element
    with pytest.raises(DicomError) as info:
        read_dicom(ct_file, deidentify=DEID)
    assert info.value.reason == "deid_failed" and "(0008,0050)" in info.value.detail, info.value.detail
    out = tmp_path / "copies"
    got = dicom_folder._read_one(ct_file, root=tmp_path, label_key=None, color="reject", voi=False, deidentify=DEID,
                                 write_dir=out)  # fmt: skip
    assert isinstance(got, DicomError) and got.reason == "deid_failed"
    assert not out.exists()  # no half-cleaned copy


def _raises_bytes_length(ds) -> Counter[str]:
    """A de-identification step that meets a value pydicom cannot convert (what ``ds[tag]`` raises then)."""
    from pydicom.errors import BytesLengthException

    raise BytesLengthException("Expected total bytes to be an even multiple of bytes per value")


def _converts_a_value(ds) -> Counter[str]:
    """A de-identification step that converts a value of the file as pydicom converts an IS (int() of its text)."""
    return Counter(U=int(str(ds.PatientID)))


@pytest.mark.parametrize(
    ("deid", "error"), [(_raises_bytes_length, "BytesLengthException"), (_converts_a_value, "ValueError")]
)
def test_a_pydicom_error_raised_by_deidentify_is_deid_failed(ct_file: Path, deid, error: str) -> None:
    """... and its detail names the error, never the value (Python's int() quotes it: "... base 10: 'MRN0001'")."""
    with pytest.raises(DicomError) as info:
        read_dicom(ct_file, deidentify=deid)
    assert info.value.reason == "deid_failed" and error in info.value.detail
    assert "MRN0001" not in info.value.detail and "MRN0001" not in str(info.value)


def _buggy_deidentify(ds, pseudo=None, opts=None) -> Counter[str]:
    """A programming error, not a DICOM problem, whose message quotes a value as a careless f-string would (module
    level: picklable for ingest's worker processes). Only instance number 3 meets it."""
    if int(ds.InstanceNumber) == 3:
        raise TypeError(f"expected a sequence of items, got {ds.PatientID!r}")
    return deidentify(ds, pseudo, opts)


def test_a_bug_in_deidentify_propagates_from_read_dicom(ct_file: Path) -> None:
    with pytest.raises(TypeError, match="expected a sequence of items"):
        read_dicom(ct_file, deidentify=_buggy_deidentify)


def test_a_bug_in_the_reader_propagates(ct_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One of our own functions raising: not the file's fault, so no DicomError (the run would otherwise quarantine
    every file for a bug)."""
    from tasks.dicom import read

    def broken(ds, n_frames):
        raise KeyError("pixel_spacing")

    monkeypatch.setattr(read, "_geometry", broken)
    with pytest.raises(KeyError, match="pixel_spacing"):
        read_dicom(ct_file)


@pytest.fixture
def dicom_folder_tree(tmp_path: Path) -> Path:
    """Four CT slices under ``in/a`` and ``in/b`` (instance numbers 1..4; number 3 is ``b/three.dcm``)."""
    root = tmp_path / "in"
    for n, rel in enumerate(["a/one.dcm", "a/two.dcm", "b/three.dcm", "b/four.dcm"], start=1):
        stored = np.full((8, 8), n, np.int16)
        write_ct_slice(root / rel, stored, _header(sop_uid=derive_uid("t", "sop", n), instance_number=n,
                                                    image_position=(0.0, 0.0, 2.5 * n)))  # fmt: skip
    return root


@pytest.mark.parametrize("workers", [1, 2], ids=["in-process", "worker-processes"])
def test_a_bug_stops_ingest_naming_the_file(
    workers: int, dicom_folder_tree: Path, make_params, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ingest's read: a TypeError from de-identification is not quarantined; the run fails naming the file (its
    path relative to the input folder), also across ProcessPoolExecutor."""
    import tasks.dicom.profile

    monkeypatch.setattr(tasks.dicom.profile, "deidentify", _buggy_deidentify)
    ip = make_params({"ingest.workers": workers}).ingest
    files = sorted(dicom_folder_tree.rglob("*.dcm"))
    with pytest.raises(dicom_folder.UnexpectedReadError, match=r"^b/three\.dcm: reading it raised TypeError") as info:
        dicom_folder.read_all(files, dicom_folder_tree, ip, Pseudonymizer.from_params(ip.deid), None, progress=False)
    assert "MRN0001" not in str(info.value)  # the message names the file, not the bug's values
    if workers == 1:
        assert isinstance(info.value.__cause__, TypeError) and "MRN0001" in str(info.value.__cause__)
    else:  # the worker's traceback, with the original TypeError in it, comes back as the cause (for a developer)
        assert "TypeError: expected a sequence of items" in str(info.value.__cause__)


def test_a_bad_file_is_still_quarantined_by_ingest(dicom_folder_tree: Path, make_params) -> None:
    """The other side: with the real profile, a truncated file among good ones is a reason, not a stopped run."""
    bad = dicom_folder_tree / "b/three.dcm"
    bad.write_bytes(bad.read_bytes()[:200])
    ip = make_params({"ingest.workers": 2}).ingest
    files = sorted(dicom_folder_tree.rglob("*.dcm"))
    got = dicom_folder.read_all(files, dicom_folder_tree, ip, Pseudonymizer.from_params(ip.deid), None, progress=False)
    reasons = {f.relative_to(dicom_folder_tree).as_posix(): getattr(g, "reason", "ok")
               for f, g in zip(files, got, strict=True)}  # fmt: skip
    assert reasons == {"a/one.dcm": "ok", "a/two.dcm": "ok", "b/four.dcm": "ok", "b/three.dcm": "truncated"}


# --- pydicom's global configuration is not ours to change ---------------------------------------------------------


def _pydicom_state() -> tuple[object, ...]:
    settings = pydicom.config.settings
    logger = logging.getLogger("pydicom")
    return settings.reading_validation_mode, settings.writing_validation_mode, logger.level, logger.disabled


def _bad_position(path: Path) -> None:
    """ImagePositionPatient "abc\\def\\g": an invalid DS, on which pydicom's strict reading raises."""
    raw = path.read_bytes()
    value = b"-100.0000\\-120.0000\\35.5000"
    assert value in raw
    path.write_bytes(raw.replace(value, b"abc\\def\\g".ljust(len(value))))


@pytest.mark.parametrize(
    ("damage", "deid", "raises"),
    [(None, None, None), (_bad_position, DEID, None), (lambda p: _truncate(p, 0.5), None, DicomError),
     (None, _buggy_deidentify, TypeError)],
    ids=["good", "invalid-value", "bad-file", "bug"],
)  # fmt: skip
def test_read_dicom_leaves_pydicom_settings_as_it_found_them(ct_file: Path, damage, deid, raises) -> None:
    """Inside a caller's own strict_reading() and with the pydicom logger at DEBUG: read_dicom reads an invalid
    value without raising (its validation is off inside), and afterwards the settings are the caller's again, also
    after a bad file and after a bug."""
    if damage:
        damage(ct_file)
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        with pydicom.config.strict_reading():
            before = _pydicom_state()
            assert before[0] == pydicom.config.RAISE and before[2] == logging.DEBUG
            if raises is None:
                im = read_dicom(ct_file, deidentify=deid)
                assert (im.image_position is None) == (damage is _bad_position)
            else:
                with pytest.raises(raises):
                    read_dicom(ct_file, deidentify=deid)
            assert _pydicom_state() == before
    finally:
        logger.setLevel(level)
    if damage is _bad_position:  # the caller's strict reading is back: the same value raises for them now
        ds = pydicom.dcmread(ct_file)
        with pydicom.config.strict_reading(), pytest.raises(ValueError):
            _ = ds.ImagePositionPatient


def test_read_dicom_leaves_default_settings_as_they_were(ct_file: Path) -> None:
    before = (pydicom.config.settings._reading_validation_mode, pydicom.config.settings._writing_validation_mode,
              logging.getLogger("pydicom").level)  # fmt: skip
    read_dicom(ct_file, deidentify=DEID)
    after = (pydicom.config.settings._reading_validation_mode, pydicom.config.settings._writing_validation_mode,
             logging.getLogger("pydicom").level)  # fmt: skip
    assert after == before


# --- the de-identified copy (tasks.dicom.write) ----------------------------------------------------------------------


def test_write_deidentified_names_the_copy_by_its_remapped_uids(ct_file: Path, tmp_path: Path) -> None:
    im, ds = read_instance(ct_file, deidentify=DEID)
    out = write_deidentified(ds, tmp_path / "copies")
    pseudo = Pseudonymizer.from_params(DeidParams())
    assert out == tmp_path / "copies" / pseudo.uid(im.ids.series_uid) / f"{pseudo.uid(im.ids.sop_uid)}.dcm"
    copy = pydicom.dcmread(out, force=False)
    assert copy.PatientIdentityRemoved == "YES" and copy.SOPInstanceUID == pseudo.uid(im.ids.sop_uid)
    assert "DOE" not in str(copy.PatientName) and b"MRN0001" not in out.read_bytes()
    np.testing.assert_array_equal(copy.pixel_array, pydicom.dcmread(ct_file).pixel_array)


def test_write_deidentified_refuses_an_identified_data_set(ct_file: Path, tmp_path: Path) -> None:
    _, ds = read_instance(ct_file)  # not de-identified
    with pytest.raises(ValueError, match="not de-identified"):
        write_deidentified(ds, tmp_path / "copies")
    assert not (tmp_path / "copies").exists()


def test_a_copy_pydicom_cannot_encode_is_deid_failed(ct_file: Path, tmp_path: Path) -> None:
    """A UTF-8 file whose KVP (DS) holds an invalid byte: it reads (decoded with a replacement character), but
    pydicom cannot encode the value again (its own re-raise of the UnicodeEncodeError fails with a TypeError)."""
    raw = ct_file.read_bytes()
    assert b"ISO_IR 100" in raw and b"DS\x04\x00120 " in raw
    ct_file.write_bytes(raw.replace(b"ISO_IR 100", b"ISO_IR 192").replace(b"DS\x04\x00120 ", b"DS\x04\x001\xff0 "))
    _, ds = read_instance(ct_file, deidentify=DEID)
    with pytest.raises(DicomError) as info:
        write_deidentified(ds, tmp_path / "copies")
    assert info.value.reason == "deid_failed" and "UnicodeEncodeError" in info.value.detail
    assert not list(tmp_path.glob("copies/**/*.dcm"))
