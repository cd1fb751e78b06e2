"""tasks.dicom.pseudonym: keyed pseudonyms, UID remapping, per-patient date shifts, and where the secret comes from."""

from __future__ import annotations

import datetime as dt
import re

import pytest

from tasks.config import DeidParams
from tasks.dicom.pseudonym import DEVELOPMENT_SOURCE, Pseudonymizer


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
