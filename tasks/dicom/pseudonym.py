"""Pseudonymisation: the keyed replacements for identifying values (no pydicom here: plain values in and out).

:mod:`tasks.dicom.profile` applies the DICOM PS3.15 basic profile to each instance with these replacements, and
ingest's manifest holds only what this module produces plus non-identifying geometry:

* identifiers (PatientID, StudyInstanceUID, ...) are replaced by keyed HMAC-SHA256 pseudonyms: consistent
  within a project (the same patient gets the same pseudonym on every run and in every study) and not
  reversible without the project secret;
* UIDs are remapped to ``2.25.<128-bit integer>`` (PS3.5 B.2 UUID-derived form) from the same HMAC, so
  references between objects survive;
* dates are shifted by a per-patient offset (the "Retain Longitudinal Temporal Information with Modified
  Dates" option) or dropped;
* an instance without a PatientID (empty or absent) is not the patient of every other such instance:
  :func:`patient_key` makes its study (or, without a StudyInstanceUID, the instance itself) a patient of its own;
* input files are named by a pseudonym of their path (:meth:`Pseudonymizer.path`): real exports name folders
  ``<PatientName>_<PatientID>`` and files ``<SOPInstanceUID>.dcm``;
* everything else (names, birth date, accession number, institution, physicians, descriptions) is removed,
  emptied or replaced by the profile, and never reaches the manifest.

The secret comes from the environment variable named by ``ingest.deid.secret_env``. Without it a fixed
development default is used and :attr:`Pseudonymizer.secret_source` says ``development-default``: fine for
the synthetic cohort, not for real data. The secret itself is never written anywhere.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from tasks.schema import DeidParams

DEVELOPMENT_SECRET = "medpipe-development-secret--not-for-real-data"
DEVELOPMENT_SOURCE = "development-default"

# What a patient pseudonym was made from (ingest's manifest column ``patient_id_from``): the PatientID, or, when
# the instance has none, the first of its StudyInstanceUID, its SOPInstanceUID and its file (path pseudonym).
PATIENT_ID_FROM = ("PatientID", "StudyInstanceUID", "SOPInstanceUID", "file")


def patient_key(patient_id: str, study_uid: str = "", sop_uid: str = "", file: str = "") -> tuple[str, str]:
    """The value that stands for an instance's patient in :meth:`Pseudonymizer.patient_id` and the date shift, and
    what it was made from (one of :data:`PATIENT_ID_FROM`).

    An empty or absent PatientID says nothing about who the patient is, so instances without one must not share a
    patient (the patient-level split would treat unrelated images as one patient): each study is a patient of its
    own, or each instance when it has no StudyInstanceUID either. Two studies of one unnamed patient are then two
    patients; nothing in such files can tell. The key of a missing id starts with a NUL character, which no
    PatientID (a DICOM LO value) may hold, so it does not equal the key of a real PatientID.

    Args:
        patient_id: (0010,0020) PatientID, "" when absent; blank (spaces, NULs) counts as missing.
        study_uid: (0020,000D) StudyInstanceUID, "" when absent.
        sop_uid: (0008,0018) SOPInstanceUID, "" when absent.
        file: something else that tells the instance apart (ingest gives its path pseudonym), for an instance
            with none of the three.

    Returns:
        (key, source): ``(patient_id, "PatientID")`` when the id is present; otherwise a key made from the first
        non-blank fallback and its name; ``("", "none")`` (one key shared by all) only when nothing was given.
    """
    if patient_id.strip(" \x00"):
        return patient_id, "PatientID"
    for source, value in zip(PATIENT_ID_FROM[1:], (study_uid, sop_uid, file), strict=True):
        if value.strip(" \x00"):
            return f"\x00{source}\x00{value}", source
    return "", "none"


@dataclass(frozen=True)
class Pseudonymizer:
    """Keyed, deterministic replacement of identifying values.

    Attributes:
        secret_source: where the key came from: ``env:<NAME>`` or ``development-default``.
        shift_dates: shift dates per patient (True) or drop them (False).
        max_date_shift_days: dates move back by 1..max_date_shift_days days, the same for all of a patient.
    """

    _key: bytes = field(repr=False)
    secret_source: str
    shift_dates: bool = True
    max_date_shift_days: int = 365

    @classmethod
    def from_params(cls, params: DeidParams, environ: Mapping[str, str] | None = None) -> Pseudonymizer:
        """Build from ``ingest.deid``, reading the secret from the environment variable it names.

        Args:
            params: the ``ingest.deid`` group.
            environ: the environment to read (default ``os.environ``); an empty value counts as unset.
        """
        env = os.environ if environ is None else environ
        secret = env.get(params.secret_env, "")
        source = f"env:{params.secret_env}" if secret else DEVELOPMENT_SOURCE
        return cls(
            _key=(secret or DEVELOPMENT_SECRET).encode(),
            secret_source=source,
            shift_dates=params.shift_dates,
            max_date_shift_days=params.max_date_shift_days,
        )

    @property
    def is_development(self) -> bool:
        """True when the fixed development secret is in use."""
        return self.secret_source == DEVELOPMENT_SOURCE

    def _digest(self, kind: str, value: str) -> bytes:
        # The kind namespaces the HMAC so that a patient id and a UID with the same text never collide.
        return hmac.new(self._key, f"{kind}\x00{value}".encode(), hashlib.sha256).digest()

    def pseudonym(self, kind: str, value: str, length: int = 16) -> str:
        """A hex pseudonym of ``value`` in namespace ``kind`` (e.g. "patient", "study").

        Args:
            kind: namespace; the same value under two kinds gives unrelated pseudonyms.
            value: the identifying value ("" is a value too: all objects without it share one pseudonym).
            length: hex characters kept (16 = 64 bits).
        """
        return self._digest(kind, value).hex()[:length]

    def patient_id(self, patient_id: str) -> str:
        """Pseudonymous patient id, ``P`` + 16 hex characters (of a PatientID, or of a :func:`patient_key`)."""
        return "P" + self.pseudonym("patient", patient_id)

    def study_id(self, study_uid: str) -> str:
        """Pseudonymous study id, ``S`` + 16 hex characters (from the StudyInstanceUID)."""
        return "S" + self.pseudonym("study", study_uid)

    def path(self, rel: str) -> str:
        """Pseudonym of an input file, ``F`` + 16 hex characters: the only name ingest's outputs give a file.

        Args:
            rel: the file's path relative to the input folder, POSIX separators (``<PatientName>_<PatientID>/
                <SOPInstanceUID>.dcm`` in a PACS export). Relative, so the pseudonym stays when the folder moves.
        """
        return "F" + self.pseudonym("path", rel)

    def uid(self, uid: str) -> str:
        """Remap a DICOM UID to ``2.25.<int>`` (at most 44 characters), consistently for the same input."""
        return "2.25." + str(int.from_bytes(self._digest("uid", uid)[:16], "big"))

    def date_shift_days(self, patient_id: str) -> int:
        """The patient's date offset in days, in [1, max_date_shift_days]; dates move back by it."""
        return 1 + int.from_bytes(self._digest("date", patient_id)[:8], "big") % self.max_date_shift_days

    def shift_dicom_date(self, value: str, patient_id: str) -> str | None:
        """A DICOM DA (``YYYYMMDD``) or DT (``YYYYMMDD...``) value moved back by the patient's offset, in the same
        format (a DT keeps its time part); None when it does not start with a valid date."""
        text = value.strip()
        try:
            day = dt.datetime.strptime(text[:8], "%Y%m%d").date()
        except ValueError:
            return None
        return (day - dt.timedelta(days=self.date_shift_days(patient_id))).strftime("%Y%m%d") + text[8:]

    def shift_date(self, date: str, patient_id: str) -> str:
        """De-identify a DICOM DA date for ``patient_id``.

        Args:
            date: ``YYYYMMDD`` (DICOM DA) or "".
            patient_id: the original PatientID (the shift is per patient, so intervals are kept).

        Returns:
            The shifted date as ISO ``YYYY-MM-DD``; "" when dates are not shifted (they are dropped), or the
            input is empty or not a valid date.
        """
        if not self.shift_dates or not date:
            return ""
        shifted = self.shift_dicom_date(date.strip()[:8], patient_id)
        return "" if shifted is None else f"{shifted[:4]}-{shifted[4:6]}-{shifted[6:]}"
