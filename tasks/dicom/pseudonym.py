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

from tasks.config import DeidParams

DEVELOPMENT_SECRET = "medpipe-development-secret--not-for-real-data"
DEVELOPMENT_SOURCE = "development-default"


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
        """Pseudonymous patient id, ``P`` + 16 hex characters."""
        return "P" + self.pseudonym("patient", patient_id)

    def study_id(self, study_uid: str) -> str:
        """Pseudonymous study id, ``S`` + 16 hex characters (from the StudyInstanceUID)."""
        return "S" + self.pseudonym("study", study_uid)

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
