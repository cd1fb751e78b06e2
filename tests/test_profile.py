"""tasks.dicom.profile: the PS3.15 Annex E basic profile and its options on real pydicom data sets."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.data import get_testdata_file

from tasks.dicom.profile import action_for, audit_counts, deidentify
from tasks.dicom.pseudonym import Pseudonymizer
from tasks.schema import DeidParams

PSEUDO = Pseudonymizer.from_params(DeidParams(), environ={"MEDPIPE_DEID_SECRET": "s3cret"})


def _ct() -> pydicom.Dataset:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientName = "DOE^JANE^Q"
    ds.PatientID = "MRN-0042"
    ds.StationName = "CT-ROOM-7"
    ds.StudyDescription = "CT CHEST W/O"
    ds.SeriesDescription = "follow-up for DOE"
    ds.InstitutionName = "St Example Hospital"
    return ds


@pytest.mark.parametrize(
    ("keyword", "action"),
    [("PatientName", "Z"), ("PatientID", "D"), ("StudyInstanceUID", "U"), ("PatientBirthDate", "Z"),
     ("StudyDescription", "X"), ("InstitutionName", "D"), ("AccessionNumber", "Z"), ("Modality", None),
     ("PixelSpacing", None), ("ReferencedImageSequence", "U")],
)  # fmt: skip
def test_table_actions(keyword: str, action: str | None) -> None:
    from pydicom.datadict import tag_for_keyword

    assert action_for(tag_for_keyword(keyword)) == action
    assert action_for(0x60003000) == "X" and action_for(0x60023000) == "X"  # Overlay Data, any repeating group


def test_basic_profile_removes_replaces_and_marks() -> None:
    ds = _ct()
    original_study, original_date = ds.StudyInstanceUID, ds.StudyDate
    counts = deidentify(ds, PSEUDO, DeidParams(shift_dates=False))
    assert str(ds.PatientName) == str(ds.PatientID) == PSEUDO.patient_id("MRN-0042")
    assert "StudyDescription" not in ds and "SeriesDescription" not in ds and ds.StationName == "ANONYMIZED"
    assert ds.StudyDate == "" and ds.InstitutionName == "ANONYMIZED"
    assert ds.StudyInstanceUID == PSEUDO.uid(original_study) != original_study
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert not any(e.tag.is_private for e in ds) and counts["P"] > 0
    assert ds.PatientIdentityRemoved == "YES" and ds.LongitudinalTemporalInformationModified == "REMOVED"
    assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == ["113100"]
    assert original_date not in str(ds)
    names = audit_counts([counts])
    assert names["removed"] == counts["X"] and names["uid_remapped"] == counts["U"] >= 4


def test_same_inputs_same_pseudonyms_across_runs_and_dates_keep_intervals() -> None:
    a, b = _ct(), _ct()
    b.StudyDate = "20040129"  # ten days after CT_small's 20040119, same patient
    deidentify(a, PSEUDO, DeidParams())
    deidentify(b, PSEUDO, DeidParams())
    again = _ct()
    deidentify(again, PSEUDO, DeidParams())
    assert again.StudyInstanceUID == a.StudyInstanceUID and again.PatientID == a.PatientID
    import datetime as dt

    days = (dt.date.fromisoformat(f"{b.StudyDate[:4]}-{b.StudyDate[4:6]}-{b.StudyDate[6:]}")
            - dt.date.fromisoformat(f"{a.StudyDate[:4]}-{a.StudyDate[4:6]}-{a.StudyDate[6:]}")).days  # fmt: skip
    assert days == 10 and a.StudyDate != "20040119"
    assert [c.CodeValue for c in a.DeidentificationMethodCodeSequence] == ["113100", "113107"]
    other = Pseudonymizer.from_params(DeidParams(), environ={"MEDPIPE_DEID_SECRET": "another"})
    c = _ct()
    deidentify(c, other, DeidParams())
    assert c.PatientID != a.PatientID and c.StudyInstanceUID != a.StudyInstanceUID  # the secret matters


def test_options_device_identity_clean_descriptors_private_safelist() -> None:
    ds = _ct()
    creator_block = next(e for e in ds if e.tag.is_private and e.tag.element >= 0x1000)
    g, el = creator_block.tag.group, creator_block.tag.element
    creator = str(ds[(g, el >> 8)].value).strip()
    opts = DeidParams(retain_device_identity=True, clean_descriptors=True,
                      keep_private=[f"{creator}/{g:04X}/{el & 0xFF:02X}"])  # fmt: skip
    counts = deidentify(ds, PSEUDO, opts)
    assert ds.StationName == "CT-ROOM-7" and counts["K"] >= 1
    assert ds.StudyDescription == "CT CHEST W/O" and counts["C"] >= 1  # nothing identifying in it: kept
    assert ds.SeriesDescription == "ANONYMIZED"  # names the patient: replaced
    assert (g, el) in ds and (g, el >> 8) in ds and counts["PK"] == 1
    assert sum(1 for e in ds if e.tag.is_private) == 2  # the kept element and its creator, nothing else
    assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == ["113100", "113107", "113109", "113105"]


def test_nested_sequences_are_cleaned() -> None:
    ds = _ct()
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    item.ReferencedSOPInstanceUID = "1.2.3.4.5.6.7"
    ds.ReferencedImageSequence = [item]
    other = pydicom.Dataset()
    other.PatientName = "ROE^RICHARD"
    ds.ProcedureCodeSequence = [other]  # not in the table: recursed into
    deidentify(ds, PSEUDO, DeidParams())
    assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID == PSEUDO.uid("1.2.3.4.5.6.7")
    assert ds.ReferencedImageSequence[0].ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert "ROE" not in str(ds.ProcedureCodeSequence[0].get("PatientName", ""))
