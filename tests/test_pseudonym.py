"""tasks.dicom.pseudonym: keyed pseudonyms, UID remapping, per-patient date shifts, and where the secret comes from."""

from __future__ import annotations

import datetime as dt
import re

import pytest

from tasks.dicom.pseudonym import DEVELOPMENT_SOURCE, PATIENT_ID_FROM, Pseudonymizer, patient_key
from tasks.schema import DeidParams


def _pz(secret: str | None = "s3cret", **params) -> Pseudonymizer:
    env = {} if secret is None else {"MEDPIPE_DEID_SECRET": secret}
    return Pseudonymizer.from_params(DeidParams(**params), environ=env)


@pytest.mark.parametrize(
    ("env", "source"),
    [({}, DEVELOPMENT_SOURCE), ({"MEDPIPE_DEID_SECRET": ""}, DEVELOPMENT_SOURCE),
     ({"MEDPIPE_DEID_SECRET": "x"}, "env:MEDPIPE_DEID_SECRET")],
)  # fmt: skip
def test_secret_source(env: dict[str, str], source: str) -> None:
    pz = Pseudonymizer.from_params(DeidParams(), environ=env)
    assert pz.secret_source == source
    assert pz.is_development == (source == DEVELOPMENT_SOURCE)


def test_the_named_variable_is_read() -> None:
    params = DeidParams(secret_env="SITE_KEY")
    pz = Pseudonymizer.from_params(params, environ={"SITE_KEY": "x", "MEDPIPE_DEID_SECRET": "y"})
    assert pz.secret_source == "env:SITE_KEY"
    assert pz.patient_id("MRN1") == _pz("x").patient_id("MRN1") != _pz("y").patient_id("MRN1")


def test_secret_never_in_repr() -> None:
    assert "s3cret" not in repr(_pz("s3cret")) and "s3cret" not in str(_pz("s3cret"))


def test_pseudonyms_are_consistent_keyed_and_namespaced() -> None:
    a, b = _pz("one"), _pz("two")
    assert a.patient_id("MRN1") == a.patient_id("MRN1") == _pz("one").patient_id("MRN1")
    assert a.patient_id("MRN1") != a.patient_id("MRN2")
    assert a.patient_id("MRN1") != b.patient_id("MRN1")  # another secret, another pseudonym
    assert a.pseudonym("patient", "X") != a.pseudonym("study", "X")
    assert re.fullmatch(r"P[0-9a-f]{16}", a.patient_id("MRN1"))
    assert re.fullmatch(r"S[0-9a-f]{16}", a.study_id("1.2.3"))
    ids = [f"MRN{i:06d}" for i in range(5000)]
    assert len({a.patient_id(i) for i in ids}) == len(ids)  # no two patients merged


def test_uid_remap_is_a_valid_consistent_uid() -> None:
    pz = _pz()
    uid = pz.uid("1.2.840.113619.2.55.3.1")
    assert uid == pz.uid("1.2.840.113619.2.55.3.1") != pz.uid("1.2.840.113619.2.55.3.2")
    assert re.fullmatch(r"2\.25\.(0|[1-9]\d*)", uid) and len(uid) <= 64


def test_date_shift_is_per_patient_and_keeps_intervals() -> None:
    pz = _pz(max_date_shift_days=30)
    d1, d2 = pz.shift_date("20200110", "MRN1"), pz.shift_date("20200301", "MRN1")
    delta = (dt.date(2020, 1, 10) - dt.date.fromisoformat(d1)).days
    assert 1 <= delta <= 30 and delta == pz.date_shift_days("MRN1")
    assert (dt.date.fromisoformat(d2) - dt.date.fromisoformat(d1)).days == 51  # the interval survives
    shifts = {pz.date_shift_days(f"MRN{i}") for i in range(50)}
    assert len(shifts) > 10 and all(1 <= s <= 30 for s in shifts)


@pytest.mark.parametrize(
    ("date", "shift_dates"), [("", True), ("not-a-date", True), ("20201301", True), ("20200110", False)]
)
def test_dates_dropped_when_not_shiftable_or_not_shifted(date: str, shift_dates: bool) -> None:
    assert _pz(shift_dates=shift_dates).shift_date(date, "MRN1") == ""


def test_path_pseudonyms_are_keyed_namespaced_and_distinct() -> None:
    a, b = _pz("one"), _pz("two")
    rel = "DOE^JOHN_MRN1/1.2.840.1.2.dcm"
    assert re.fullmatch(r"F[0-9a-f]{16}", a.path(rel)) and a.path(rel) == _pz("one").path(rel)
    assert a.path(rel) != b.path(rel) and a.path(rel)[1:] != a.pseudonym("patient", rel)
    assert "MRN1" not in a.path(rel) and "DOE" not in a.path(rel)
    rels = [f"PATIENT^{i}_{i}/{j}.dcm" for i in range(100) for j in range(50)]
    assert len({a.path(r) for r in rels}) == len(rels)


@pytest.mark.parametrize(
    ("ids", "source"),
    [(("MRN1", "1.2", "1.3", "F1"), "PatientID"), (("", "1.2", "1.3", "F1"), "StudyInstanceUID"),
     ((" \x00", "1.2", "1.3", "F1"), "StudyInstanceUID"), (("", "", "1.3", "F1"), "SOPInstanceUID"),
     (("", " ", "", "F1"), "file"), (("", "", "", ""), "none")],
)  # fmt: skip
def test_patient_key_falls_back_from_a_missing_patient_id(ids: tuple[str, ...], source: str) -> None:
    key, got = patient_key(*ids)
    assert got == source and (got in PATIENT_ID_FROM or got == "none")
    if source == "PatientID":
        assert key == ids[0]
    else:  # a key no real PatientID has (LO values hold no NUL), except the shared one when nothing was given
        assert key.startswith("\x00") if source != "none" else key == ""


def test_missing_patient_ids_are_never_one_patient() -> None:
    """Without a PatientID each study (or instance) is a patient of its own, with its own date shift; the key of
    a missing id never equals that of a real PatientID with the same text as the UID."""
    pz = _pz()
    study_a, study_b = patient_key("", "1.2.3"), patient_key("", "1.2.4")
    assert patient_key("", "1.2.3", "9.9") == patient_key("  ", "1.2.3", "9.8")  # one study: one patient
    keys = [study_a[0], study_b[0], patient_key("", "", "1.2.3")[0], patient_key("1.2.3")[0], ""]
    assert len({pz.patient_id(k) for k in keys}) == len(keys)
    assert len({pz.date_shift_days(k) for k in keys[:3]}) == 3  # (fixed secret: the same three shifts every run)
