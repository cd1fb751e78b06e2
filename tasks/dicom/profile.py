"""DICOM PS3.15 Annex E: the Basic Application Level Confidentiality Profile, applied to a pydicom data set.

The attribute table (Table E.1-1, 655 attributes and repeating groups of the 2026c standard) is the one the
``dicom-anonymizer`` package extracts from the standard's own part15.xml; this module is the engine that applies
it with medpipe's pseudonymisation and options:

========  ====================================================================================================
action    what happens
========  ====================================================================================================
X         removed
Z         emptied (PatientName: replaced by the patient's pseudonym, a dummy the profile allows)
D         replaced by a dummy of the VR (PatientID: the keyed pseudonym ``P<16 hex>``)
U         UID remapped to ``2.25.<int>`` by keyed HMAC: the same UID always maps to the same one, so references
          between objects (study, series, frame of reference, referenced instances) survive
M         date shifted back by the patient's offset (option ``shift_dates``: Retain Longitudinal Temporal
          Information with Modified Dates); times of day are kept
K         kept by an option (``retain_device_identity``)
C         descriptor kept (``clean_descriptors``) because it holds none of the object's identifying values;
          otherwise replaced by a dummy and counted as D
========  ====================================================================================================

Compound actions resolve to the one that keeps the object valid: Z/D, X/D and X/Z/D to D, X/Z to Z, and X/Z/U*
(referenced image sequences) to U on the UIDs inside. Sequences not in the table are recursed into. Private
elements are removed unless ``keep_private`` lists them (their private creator is then kept too). Finally
PatientIdentityRemoved is YES, the De-identification Method (Code) Sequence names the profile and the options,
and Longitudinal Temporal Information Modified says MODIFIED or REMOVED.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from typing import Any

from tasks.dicom.pseudonym import Pseudonymizer
from tasks.schema import DeidParams

PROFILE_TABLE = "dicomfields_2026c"
_RESOLVE = {"D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "D", "X_Z_TAGS": "Z",
            "X_D_TAGS": "D", "X_Z_D_TAGS": "D", "X_Z_U_STAR_TAGS": "U"}  # fmt: skip

# Option columns of Table E.1-1 used here (keywords of the attributes the option retains or cleans).
DEVICE_IDENTITY = frozenset({
    "CassetteID", "DetectorID", "DeviceSerialNumber", "DeviceUID", "DeviceDescription", "DeviceLabel", "GantryID",
    "GeneratorID", "PerformedStationAETitle", "PerformedStationName", "PlateID", "ScheduledStationAETitle",
    "ScheduledStationName", "SourceSerialNumber", "StationName", "StationAETitle", "XRayDetectorID",
})  # fmt: skip
DESCRIPTORS = frozenset({
    "StudyDescription", "SeriesDescription", "ImageComments", "ProtocolName", "AcquisitionComments",
    "PerformedProcedureStepDescription", "RequestedProcedureDescription", "ScheduledProcedureStepDescription",
    "DerivationDescription", "AdditionalPatientHistory", "ReasonForStudy", "StudyComments", "VisitComments",
    "ContrastBolusAgent", "AdmittingDiagnosesDescription", "DischargeDiagnosisDescription", "PatientComments",
    "FrameComments", "InterpretationText", "ServiceEpisodeDescription", "LabelText",
})  # fmt: skip
# Attributes whose values are what a descriptor must not contain for "clean" to keep it.
_IDENTIFYING = ("PatientName", "PatientID", "OtherPatientIDs", "AccessionNumber", "PatientBirthDate", "StudyID",
                "InstitutionName", "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
                "PatientMotherBirthName", "MedicalRecordLocator", "PatientAddress", "PatientTelephoneNumbers")
_NOT_SHIFTED = frozenset({"PatientBirthDate"})  # not part of the temporal option: the basic action applies
_DUMMY = {"PN": "ANONYMOUS", "DA": "19000101", "DT": "19000101000000", "TM": "000000", "AS": "000D", "IS": "0",
          "DS": "0", "AE": "ANONYMOUS", "CS": "ANONYMIZED"}  # fmt: skip
_NUMERIC = frozenset({"US", "SS", "UL", "SL", "FL", "FD", "SV", "UV"})
_BYTES = frozenset({"OB", "OW", "OD", "OF", "OL", "OV", "UN"})
# CID 7050 De-identification Methods (scheme DCM)
_CODES = {
    "basic": ("113100", "Basic Application Confidentiality Profile"),
    "shift_dates": ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    "retain_device_identity": ("113109", "Retain Device Identity Option"),
    "clean_descriptors": ("113105", "Clean Descriptors Option"),
}
ACTION_NAMES = {"X": "removed", "Z": "emptied", "D": "dummy", "U": "uid_remapped", "M": "date_shifted",
                "K": "kept_by_option", "C": "cleaned_kept", "P": "private_removed", "PK": "private_kept"}  # fmt: skip


def _table() -> tuple[dict[int, str], list[tuple[int, int, int, int, str]]]:
    """(exact tag -> action, [(group, element, group mask, element mask, action)] for repeating groups)."""
    from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector

    db = dicom_anonymization_database_selector(PROFILE_TABLE)
    exact: dict[int, str] = {}
    masked: list[tuple[int, int, int, int, str]] = []
    for category, action in _RESOLVE.items():
        for entry in db[category]:
            if len(entry) == 2:
                exact[(entry[0] << 16) | entry[1]] = action
            else:
                masked.append((*entry, action))
    return exact, masked


_EXACT, _MASKED = _table()


def action_for(tag: int) -> str | None:
    """The resolved basic-profile action of a (public) tag, or None when the table does not list it (kept)."""
    if tag in _EXACT:
        return _EXACT[tag]
    group, element = tag >> 16, tag & 0xFFFF
    for g, e, gm, em, action in _MASKED:
        if group & gm == g and element & em == e:
            return action
    return None


def _identifying_tokens(ds: Any) -> set[str]:
    tokens: set[str] = set()
    for keyword in _IDENTIFYING:
        value = ds.get(keyword)
        if value in (None, ""):
            continue
        values = value if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
        for v in values:
            tokens.update(t.lower() for t in re.split(r"[\s^,./\\-]+", str(v)) if len(t) >= 3)
    return tokens


def _empty(elem: Any) -> Any:
    """The zero-length value of the element's VR."""
    if elem.VR == "SQ":
        return []
    return None if elem.VR in _NUMERIC else b"" if elem.VR in _BYTES else ""


def _dummy(elem: Any) -> Any:
    if elem.VR == "SQ":
        return []
    if elem.VR in _NUMERIC:
        return 0
    if elem.VR in _BYTES:
        return b""
    return _DUMMY.get(elem.VR, "ANONYMIZED")


class _Engine:
    def __init__(self, pseudo: Pseudonymizer, opts: DeidParams, patient_id: str, tokens: set[str]) -> None:
        self.pseudo, self.opts, self.patient_id, self.tokens = pseudo, opts, patient_id, tokens
        self.counts: Counter[str] = Counter()
        self.keep_private = {(c, g.upper(), e.upper()) for c, g, e in (s.rsplit("/", 2) for s in opts.keep_private)}

    def _uid(self, value: Any) -> Any:
        if isinstance(value, str) or not hasattr(value, "__iter__"):
            return self.pseudo.uid(str(value)) if str(value) else value
        return [self.pseudo.uid(str(v)) for v in value]

    def _private_kept(self, ds: Any, tag: int) -> bool:
        group, element = tag >> 16, tag & 0xFFFF
        if not self.keep_private or element < 0x1000:
            return False
        creator = ds.get((group, element >> 8))
        name = str(creator.value).strip() if creator is not None else ""
        return (name, f"{group:04X}", f"{element & 0xFF:02X}") in self.keep_private

    def apply(self, ds: Any) -> None:
        """Walk ``ds`` by tag; only elements with an action are converted from their raw bytes (speed)."""
        from pydicom.datadict import dictionary_VR

        kept_creators: set[tuple[int, int]] = set()
        creators = []
        for tag in list(ds.keys()):
            t = int(tag)
            group, element = t >> 16, t & 0xFFFF
            if group % 2:  # private
                if 0x0010 <= element <= 0x00FF:
                    creators.append(tag)  # decided after the block's elements
                elif self._private_kept(ds, t):
                    kept_creators.add((group, element >> 8))
                    self.counts["PK"] += 1
                else:
                    del ds[tag]
                    self.counts["P"] += 1
                continue
            action = action_for(t)
            if action is None:
                vr = ds.get_item(tag).VR
                if vr is None:
                    try:
                        vr = dictionary_VR(t)
                    except KeyError:
                        vr = None
                if vr == "SQ":
                    for item in ds[tag].value or ():
                        self.apply(item)
                continue
            self._public(ds, ds[tag], t, action)
        for tag in creators:  # private creators of blocks with nothing kept
            if (tag.group, tag.element) not in kept_creators:
                del ds[tag]
                self.counts["P"] += 1

    def _public(self, ds: Any, elem: Any, tag: int, action: str) -> None:
        keyword = elem.keyword
        if self.opts.retain_device_identity and keyword in DEVICE_IDENTITY:
            self.counts["K"] += 1
            return
        if action == "U":
            if elem.VR == "SQ":
                for item in elem.value or ():
                    self.apply(item)
            elif elem.value not in (None, ""):
                elem.value = self._uid(elem.value)
                self.counts["U"] += 1
            return
        if self.opts.shift_dates and keyword not in _NOT_SHIFTED and elem.VR in ("DA", "DT", "TM"):
            if self._shift_element(elem):
                return
        if self.opts.clean_descriptors and keyword in DESCRIPTORS and elem.VR != "SQ":
            text = str(elem.value or "").lower()
            if not any(t in text for t in self.tokens):
                self.counts["C"] += 1
                return
            action = "D"
        if action == "X":
            del ds[elem.tag]
        elif keyword == "PatientID" or keyword == "PatientName":
            elem.value = self.pseudo.patient_id(self.patient_id)
        elif action == "Z":
            elem.value = _empty(elem)
        else:
            elem.value = _dummy(elem)
        self.counts[action] += 1

    def _shift_element(self, elem: Any) -> bool:
        """Shift a DA/DT element (keep a TM) under the temporal option; False when it cannot be parsed."""
        if elem.VR == "TM" or elem.value in (None, ""):
            self.counts["M"] += 1
            return True
        values = [elem.value] if isinstance(elem.value, str) else list(elem.value)
        shifted = [None if elem.VR == "DA" and len(str(v).strip()) != 8
                   else self.pseudo.shift_dicom_date(str(v), self.patient_id) for v in values]  # fmt: skip
        if any(s is None for s in shifted):
            return False
        elem.value = shifted[0] if len(shifted) == 1 else shifted
        self.counts["M"] += 1
        return True


def deidentify(ds: Any, pseudo: Pseudonymizer, opts: DeidParams) -> Counter[str]:
    """Apply the basic profile and ``opts`` to ``ds`` in place (file meta included).

    Args:
        ds: a pydicom Dataset read from a Part 10 file.
        pseudo: the project's keyed pseudonymiser (same patient -> same pseudonym and date shift, every run).
        opts: ``ingest.deid``.

    Returns:
        Counts per action code (see the module table; "P" private elements removed, "PK" kept by the safelist).

    Raises:
        What pydicom raises converting an element the profile must change when it does not parse (an unknown VR,
        a length its VR does not allow: :func:`tasks.dicom.read.parse_errors`); ``ds`` is then half-cleaned, and
        :func:`tasks.dicom.read.read_dicom` quarantines the file as ``deid_failed``.
    """
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from tasks.dicom.pseudonym import patient_key

    # the same patient key as ingest's manifest: an instance without a PatientID is its study's (or its own) patient,
    # so its de-identified copy carries the manifest's pseudonym and date shift
    patient_id = patient_key(str(ds.get("PatientID", "") or ""), str(ds.get("StudyInstanceUID", "") or ""),
                             str(ds.get("SOPInstanceUID", "") or ""))[0]  # fmt: skip
    engine = _Engine(pseudo, opts, patient_id, _identifying_tokens(ds) if opts.clean_descriptors else set())
    engine.apply(ds)
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        if meta.get("MediaStorageSOPInstanceUID"):
            meta.MediaStorageSOPInstanceUID = pseudo.uid(str(meta.MediaStorageSOPInstanceUID))
        for keyword in ("SourceApplicationEntityTitle", "SendingApplicationEntityTitle",
                        "ReceivingApplicationEntityTitle", "PrivateInformation", "PrivateInformationCreatorUID"):
            if keyword in meta:
                del meta[keyword]
                engine.counts["X"] += 1
    ds.PatientIdentityRemoved = "YES"
    used = ["basic"] + [k for k in ("shift_dates", "retain_device_identity", "clean_descriptors") if getattr(opts, k)]
    # LO: at most 64 characters; the code sequence below carries the full names
    ds.DeidentificationMethod = "medpipe PS3.15 E.1 Basic Profile" + "".join(f" +{_CODES[k][0]}" for k in used[1:])
    items = []
    for k in used:
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = _CODES[k][0], "DCM", _CODES[k][1]
        items.append(code)
    ds.DeidentificationMethodCodeSequence = Sequence(items)
    ds.LongitudinalTemporalInformationModified = "MODIFIED" if opts.shift_dates else "REMOVED"
    return engine.counts


def audit_counts(counts: Iterable[Counter[str]]) -> dict[str, int]:
    """Sum per-file action counts into ``{action name: count}`` (names from :data:`ACTION_NAMES`)."""
    total: Counter[str] = Counter()
    for c in counts:
        total.update(c)
    return {ACTION_NAMES[k]: total[k] for k in ACTION_NAMES}
