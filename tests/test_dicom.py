"""tasks.dicom: reading with reasons for every failure (and none for a bug), the CT writer, the de-identified copy,
pydicom's global settings left alone, and pydicom confined to one package."""

from __future__ import annotations

import gzip
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
from tasks.schema import DeidParams
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


def _localizer(path: Path) -> None:
    _set(path, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])


def _all_zero(path: Path) -> None:
    ds = pydicom.dcmread(path)
    ds.PixelData = bytes(len(ds.PixelData))
    ds.save_as(path, enforce_file_format=True)


def _j2k_over_bits_stored(path: Path) -> None:
    """pydicom's MR_small.dcm (64 x 64: openjpeg's default resolutions need 32 pixels) as lossless JPEG 2000 of
    values 0..8190, then BitsStored 12 in the header: the codec returns values over 4095, the most 12 bits hold
    (pydicom masks native data to BitsStored, but not a JPEG 2000 decoder's output)."""
    from pydicom.data import get_testdata_file
    from pydicom.uid import JPEG2000Lossless

    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.PixelRepresentation = 0
    ds.compress(JPEG2000Lossless, (np.arange(4096, dtype=np.uint16) * 2).reshape(64, 64), bits_stored=16)
    ds.BitsStored, ds.HighBit = 12, 11
    ds.save_as(path, enforce_file_format=True)


def _jpeg_rows_mismatch(path: Path) -> None:
    """pydicom's JPEG-LL.dcm (JPEG Lossless, 1024 x 256) whose data set says 512 rows: its SOF header says 1024."""
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("JPEG-LL.dcm"))
    ds.Rows = 512
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
    ("malformed", _damage_vr(b"\x08\x00\x16\x00", b"UI", b"QQ")),  # SOPClassUID: read when the file is judged
    ("decode_failed", _damage_vr(b"\x28\x00\x11\x00", b"US", b"SH")),  # Columns as text: a TypeError in pydicom
    ("unreadable", lambda p: (p.unlink(), p.mkdir())),  # the operating system refuses to read it (a folder)
    ("not_an_image", lambda p: _set(p, SOPClassUID="1.2.840.10008.5.1.4.1.1.66.4")),  # a Segmentation object
    ("excluded_image_type", _localizer),  # read with exclude_image_types=("LOCALIZER",), as ingest's default
    ("constant_image", _all_zero),
    ("implausible_values", _j2k_over_bits_stored),
    ("corrupt_stream", _jpeg_rows_mismatch),
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
        read_dicom(ct_file, exclude_image_types=("LOCALIZER",))
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
        stored = (np.full((8, 8), n) + np.arange(64).reshape(8, 8)).astype(np.int16)  # not constant (sanity)
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


# --- the decode sanity layer (tasks.dicom.sanity) ---------------------------------------------------------------------


def _noise(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-32768, 32767, shape).astype(np.int16)


def test_jump_fraction_tells_noise_from_images() -> None:
    from tasks.dicom.sanity import SanityLimits, jump_fraction

    limit = SanityLimits().max_jump_fraction
    ramp = np.arange(256 * 256, dtype=np.int32).reshape(256, 256).astype(np.int16)  # 0..65535 wrapped: smooth
    assert jump_fraction(ramp // 4, 16) == 0.0
    assert 0.7 < jump_fraction(_noise((256, 256)), 16) < 0.85  # uniform noise: P(|a - b| > 2^16 / 8) = 0.77
    damaged = np.zeros((256, 256), np.int16)
    damaged[192:] = _noise((64, 256))  # the bottom quarter: a decoder that lost sync part way down
    assert jump_fraction(damaged, 16) > limit
    cine = np.stack([ramp // 4] * 5 + [_noise((256, 256))])  # one noisy frame of six
    assert jump_fraction(cine, 16) > limit and jump_fraction(cine[:5], 16) == 0.0
    from pydicom.data import get_testdata_file

    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm")).pixel_array  # a real image, 128 x 128
    assert jump_fraction(ct, 16) < limit / 2


def test_sanity_checks_and_their_thresholds() -> None:
    from tasks.dicom.sanity import SanityLimits, check_stored, mode_fraction

    def check(stored: np.ndarray, limits: SanityLimits | None = None, **kw) -> str:
        args = {"bits_stored": 16, "signed": True, "grayscale": True, "compressed": True, **kw}
        try:
            check_stored(stored, limits=limits or SanityLimits(), **args)
        except DicomError as exc:
            assert "ingest.sanity" in exc.detail or exc.reason != "corrupt_stream"
            return exc.reason
        return "ok"

    image = (np.arange(64 * 64).reshape(64, 64) % 997).astype(np.int16)
    assert check(image) == "ok"
    assert check(image, bits_stored=9) == "implausible_values"  # 996 > 255, the most 9 signed bits hold
    assert check(image.astype(np.uint16), bits_stored=10, signed=False) == "ok"
    assert check(np.full((64, 64), 7, np.int16)) == "constant_image"
    speck = np.zeros((64, 64), np.int16)
    speck[0, :10] = 5  # 10 of 4,096 pixels: 99.76 % hold one value
    assert mode_fraction(speck) == pytest.approx(1 - 10 / 4096)
    assert check(speck) == "constant_image"
    assert check(speck, SanityLimits(max_mode_fraction=0.999)) == "ok"
    noise = _noise((64, 64))
    assert check(noise) == "corrupt_stream"
    assert check(noise, compressed=False) == "ok"  # native data cannot lose sync
    assert check(noise, grayscale=False) == "ok"  # colour / palette samples are no intensities
    assert check(noise[:63]) == "ok"  # under 64 rows: real images are rough at that scale too
    assert check((noise // 256 + 128).astype(np.uint8), bits_stored=8, signed=False) == "ok"  # 8-bit: real content
    # fills the range (ultrasound, secondary capture): the statistic cannot tell
    assert check(noise, SanityLimits(max_jump_fraction=0.9)) == "ok"
    assert check(np.array([[0.0, np.nan]], np.float32)) == "implausible_values"


def test_sanity_is_per_params(ct_file: Path, make_params, tmp_path: Path) -> None:
    """ingest.sanity.enabled: false lets a blank image through (to time the checks); the default refuses it;
    ingest.exclude_image_types is what ingest's read excludes (any one ImageType value)."""
    _all_zero(ct_file)
    derived = tmp_path / "derived.dcm"
    write_ct_slice(derived, np.arange(320, dtype=np.int16).reshape(16, 20), _header(sop_uid=derive_uid("t", "d")))
    _set(derived, ImageType=["DERIVED", "SECONDARY", "AXIAL"])
    files = [ct_file, derived]
    got = {}
    for overrides in ({}, {"ingest.sanity.enabled": False, "ingest.exclude_image_types": ["derived"]}):
        ip = make_params(overrides).ingest
        res = dicom_folder.read_all(files, tmp_path, ip, Pseudonymizer.from_params(ip.deid), None, progress=False)
        got[bool(overrides)] = [getattr(r, "reason", "decoded") for r in res]
    assert got == {False: ["constant_image", "decoded"], True: ["decoded", "excluded_image_type"]}


@pytest.mark.parametrize(("value", "ok"), [("localizer", "LOCALIZER"), (" MPR ", "MPR"), ("PROJECTION IMAGE", None),
                                           ("LOCALIZER\\X", False), ("A" * 17, False), ("", False)])  # fmt: skip
def test_exclude_image_types_are_validated(value: str, ok: str | bool | None, make_params) -> None:
    from tasks.config import ParamsError

    if ok is False:
        with pytest.raises(ParamsError, match="not an ImageType value"):
            make_params({"ingest.exclude_image_types": [value]})
    else:
        got = make_params({"ingest.exclude_image_types": [value]}).ingest.exclude_image_types
        assert got == [ok or value]


# --- the reader's cases (tests/_dicom_cases.py): what a careful reader keeps is the same image ----------------------


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests._dicom_cases import make_all

    return make_all(tmp_path_factory.mktemp("made"))


@pytest.mark.parametrize(("name", "original", "note"), [
    ("empty_modality_lut.dcm", "CT_small.dcm", "NOTE_MODALITY_LUT"),
    ("ct_small.dcm.gz", "CT_small.dcm", "NOTE_GZIP"),
    ("acr_nema_no_photometric.dcm", "MR_small.dcm", "NOTE_PHOTOMETRIC"),
])  # fmt: skip
def test_kept_files_decode_to_the_original_pixels(name: str, original: str, note: str, made: Path) -> None:
    from pydicom.data import get_testdata_file

    from tasks.dicom import decode, load, read

    notes = {"NOTE_MODALITY_LUT": decode.NOTE_MODALITY_LUT, "NOTE_GZIP": load.NOTE_GZIP,
             "NOTE_PHOTOMETRIC": read.NOTE_PHOTOMETRIC}  # fmt: skip
    got, want = read_dicom(made / name), read_dicom(get_testdata_file(original))
    np.testing.assert_array_equal(got.pixels, want.pixels)
    assert got.notes == (notes[note],) and want.notes == ()


def test_twelve_bit_jpeg_extended_decodes_like_its_corrected_copy() -> None:
    """pydicom's JPEG-lossy.dcm (12-bit JPEG Extended, a scan header libjpeg rejects) decoded by GDCM directly
    equals, within the lossy codecs' rounding, JPGExtended.dcm (the same image with the header corrected) decoded
    by pylibjpeg."""
    from pydicom.data import get_testdata_file

    from tasks.dicom.decode import NOTE_JPEG12_GDCM

    lossy = read_dicom(get_testdata_file("JPEG-lossy.dcm"))
    fixed = read_dicom(get_testdata_file("JPGExtended.dcm"))
    assert lossy.notes == (NOTE_JPEG12_GDCM,) and fixed.notes == ()
    assert lossy.pixels.shape == fixed.pixels.shape == (1024, 256) and float(lossy.pixels.max()) > 200
    assert np.abs(lossy.pixels - fixed.pixels).max() <= 1


def test_an_empty_voi_lut_item_falls_back_to_the_window(tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from tasks.dicom.decode import NOTE_VOI_LUT

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.save_as(tmp_path / "window.dcm", enforce_file_format=True)
    ds.VOILUTSequence = Sequence([Dataset()])
    ds.save_as(tmp_path / "empty_voi.dcm", enforce_file_format=True)
    plain, empty = (read_dicom(tmp_path / n, voi=True) for n in ("window.dcm", "empty_voi.dcm"))
    np.testing.assert_array_equal(empty.pixels, plain.pixels)
    assert empty.notes == (NOTE_VOI_LUT,) and plain.notes == ()
    hu = read_dicom(tmp_path / "window.dcm")  # without voi: HU, no window
    assert not np.array_equal(plain.pixels, hu.pixels) and read_dicom(tmp_path / "empty_voi.dcm").notes == ()


@pytest.mark.parametrize(("content", "reason"), [
    (lambda raw: gzip.compress(raw)[:-40], "truncated"),  # the gzip stream ends early
    (lambda raw: gzip.compress(raw)[:20] + b"\x00" * 200, "malformed"),  # a damaged deflate stream
    (lambda raw: gzip.compress(b"PatientName,label\nDOE^JANE,1\n"), "not_dicom"),  # unwrapped: not DICOM
    (lambda raw: gzip.compress(b""), "empty_file"),
])  # fmt: skip
def test_gzip_wrapped_files_that_cannot_be_used(content, reason: str, ct_file: Path) -> None:
    ct_file.write_bytes(content(ct_file.read_bytes()))
    with pytest.raises(DicomError) as info:
        read_dicom(ct_file)
    assert info.value.reason == reason, info.value.detail
    assert "DOE" not in info.value.detail


def test_damaged_jpeg_ls_is_garbage_from_pylibjpeg(made: Path) -> None:
    """Why a JPEG-LS stream GDCM (CharLS) rejects is corrupt_stream: pylibjpeg decodes the damaged file without an
    error, into values across the whole int16 range where the original (MR_small.dcm) spans a few thousand."""
    from pydicom.data import get_testdata_file
    from pydicom.pixels import pixel_array

    ds = pydicom.dcmread(made / "jpegls_damaged.dcm")
    garbage = pixel_array(ds, decoding_plugin="pylibjpeg")
    with pytest.raises(RuntimeError, match="gdcm"):
        pixel_array(ds, decoding_plugin="gdcm")
    original = pydicom.dcmread(get_testdata_file("MR_small_jpeg_ls_lossless.dcm")).pixel_array
    assert int(original.max()) - int(original.min()) < 5000 < 60000 < int(garbage.max()) - int(garbage.min())


@pytest.mark.parametrize("depth", [150, 3000])
def test_deep_sequence_nesting_is_read_or_malformed_never_a_crash(depth: int, tmp_path: Path) -> None:
    from tests._dicom_cases import _deep_nesting

    _deep_nesting(tmp_path / "deep.dcm", depth)
    got = dicom_folder._read_one(tmp_path / "deep.dcm", root=tmp_path, label_key=None, color="reject", voi=False,
                                 deidentify=DEID, write_dir=tmp_path / "out")  # fmt: skip
    if depth == 150:  # within what pydicom's reader and writer follow: a usable image (and its copy)
        assert not isinstance(got, DicomError), got.detail
        assert len(list((tmp_path / "out").rglob("*.dcm"))) == 1
    else:
        assert isinstance(got, DicomError) and got.reason == "malformed" and "RecursionError" in got.detail
