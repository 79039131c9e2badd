"""The web pages' connection to the EHR: reading a patient's imaging history, sending a signature.

``EhrLink`` knows the EHR's address and credentials (``Settings.ehr_*``) and nothing about the pages: it takes
references, text and people, and raises ``core.errors.IntervalError`` when the EHR cannot be reached or
refuses; ``service.web_review`` maps that to the status a radiologist sees.

- Reading (a page being shown): two quick tries, so that a slow or dead EHR costs seconds, not minutes. A
  patient's history is kept a minute; a failure to read it is kept 15 s.
- Signing: the full retries. The findings' verdicts (Observation status) go first, then the report's status,
  text, interpreter and a Provenance (``adapters.fhir_publish.sign_report``).
- Sending again after a failure: the EHR may have taken the first signature while its reply was lost. The
  report at the EHR is read first; when it already holds this signature (signed with the same text; amended,
  for an amendment) nothing is written: signing it again would mark it ``amended`` by its own signature.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from adapters import fhir_codes as C
from adapters.ehr_priors import fetch_snapshot
from adapters.evidence import raw_report_text
from adapters.fhir_client import FhirClient, RetryPolicy, SmartBackendAuth
from adapters.fhir_codes import USER_SYSTEM
from adapters.fhir_publish import OBSERVATION_ID_SYSTEM, sign_report
from adapters.settings import Settings
from core.errors import IntervalError
from core.report import ReportText
from core.types import PriorTimePoint
from service.users import User

__all__ = ["USER_SYSTEM", "EhrLink", "EhrView", "holds_signature"]

# how an Interval user is named at the EHR (a Practitioner's identifier; also in Interval's own reports)
_SIGNED = ("final", "amended")
_VIEW_TTL_S = 60.0
_RETRY_AFTER_FAILURE_S = 15.0


@dataclass
class EhrView:
    """A patient's imaging history at the EHR, as read at ``at`` (``time.monotonic``)."""

    patient_identifier: str
    time_points: tuple[PriorTimePoint, ...]
    reports: list[dict[str, Any]]
    at: float = field(default_factory=time.monotonic)


def holds_signature(resource: dict[str, Any], status: str, text: ReportText) -> bool:
    """Whether a DiagnosticReport at the EHR already holds a signature (``status`` ``final``) or an amendment
    (``amended``) with ``text``: its text is exactly what ``sign_report`` writes, and it is signed (``final``
    or ``amended``; ``amended`` for an amendment, whose text may equal the signature's)."""
    accepted = _SIGNED if status == "final" else ("amended",)
    return resource.get("status") in accepted and raw_report_text(resource) == text.as_text()


class EhrLink:
    """Talks to the configured EHR for the pages (``configured`` says whether there is one)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._auth: SmartBackendAuth | None = None
        if settings.ehr_client_id and settings.ehr_private_key:
            self._auth = SmartBackendAuth.from_key_file(
                settings.ehr_client_id,
                settings.ehr_private_key,
                scope=settings.ehr_scope,
                token_url=settings.ehr_token_url,
            )
        self._lock = threading.Lock()
        self._views: dict[str, EhrView] = {}
        self._failures: dict[str, tuple[float, str]] = {}

    @property
    def configured(self) -> bool:
        return bool(self.settings.ehr_base_url)

    def client(self, *, reading: bool = False) -> FhirClient | None:
        """A client of the configured EHR (None without one). ``reading`` is for a page being shown: two
        quick tries, so that a slow or dead EHR costs seconds, not minutes; a signature gets the full retries."""
        s = self.settings
        if not s.ehr_base_url:
            return None
        retry = (
            RetryPolicy(
                attempts=2, backoff_s=0.2, connect_timeout_s=2.0, read_timeout_s=min(10.0, s.ehr_timeout_s)
            )
            if reading
            else RetryPolicy(
                attempts=s.ehr_retry_attempts, backoff_s=s.ehr_backoff_s, read_timeout_s=s.ehr_timeout_s
            )
        )
        return FhirClient(s.ehr_base_url, auth=self._auth, retry=retry)

    # --- reading --------------------------------------------------------------------------------------

    def view(self, patient_id: str, *, cached_only: bool = False) -> EhrView | str | None:
        """The patient's imaging history at the EHR (kept a minute; a failure is kept 15 s); a string saying
        why it could not be read; None when no EHR is configured (or, with ``cached_only``, nothing is kept)."""
        with self._lock:
            view = self._views.get(patient_id)
            if view is not None and time.monotonic() - view.at < _VIEW_TTL_S:
                return view
            failed = self._failures.get(patient_id)
            if failed is not None and time.monotonic() - failed[0] < _RETRY_AFTER_FAILURE_S:
                return None if cached_only else failed[1]
        client = self.client(reading=True)
        if client is None or cached_only:
            return None

        async def fetch() -> EhrView:
            async with client as ehr:
                patient, _ = await ehr.read("Patient", patient_id)
                pid = next(
                    (
                        str(i["value"])
                        for i in patient.get("identifier") or []
                        if i.get("system") == C.PATIENT_ID_SYSTEM and i.get("value")
                    ),
                    patient_id,
                )
                snapshot = await fetch_snapshot(ehr, pid, f"Patient/{patient_id}")
                rows = await ehr.search(
                    "DiagnosticReport", {"subject": f"Patient/{patient_id}", "_count": "200"}
                )
                return EhrView(pid, snapshot.time_points, [r["resource"] for r in rows])

        try:
            view = asyncio.run(fetch())
        except IntervalError as exc:
            message = f"the EHR could not be read: {exc}"
            with self._lock:
                self._failures[patient_id] = (time.monotonic(), message)
            return message
        with self._lock:
            self._views[patient_id] = view
            self._failures.pop(patient_id, None)
        return view

    def forget(self, patient_id: str) -> None:
        """Drop the kept history of a patient (after a write, so that the next page reads it again)."""
        with self._lock:
            self._views.pop(patient_id, None)

    # --- signing --------------------------------------------------------------------------------------

    def sign(
        self,
        report_ref: str,
        text: ReportText,
        user: User,
        observation_statuses: Mapping[str, str],
        *,
        unless_holds: str | None = None,
    ) -> bool:
        """Send a signature of ``report_ref`` ("DiagnosticReport/<id>" at the EHR) with ``text`` by ``user``,
        and the findings' statuses (Observation identifier -> status). With ``unless_holds`` (the signature's
        status here, ``final`` or ``amended``) the report at the EHR is read first, and when it already holds
        that signature (``holds_signature``) nothing is written and False is returned; True when it was sent.
        ``IntervalError`` when the EHR could not be reached or refused it."""
        client = self.client()
        if client is None:
            raise ValueError("no EHR is configured (INTERVAL_EHR_BASE_URL)")
        rtype, rid = report_ref.split("/", 1)

        async def push() -> bool:
            async with client as ehr:
                if unless_holds is not None:
                    current, _ = await ehr.read(rtype, rid)
                    if holds_signature(current, unless_holds, text):
                        return False
                practitioner = await self._practitioner(ehr, user)
                for ident, status in observation_statuses.items():
                    for row in await ehr.search(
                        "Observation", {"identifier": f"{OBSERVATION_ID_SYSTEM}|{ident}"}
                    ):
                        obs = row["resource"]
                        if obs.get("status") != status:
                            obs["status"] = status
                            version = (obs.get("meta") or {}).get("versionId")
                            await ehr.update(obs, f'W/"{version}"' if version else None)
                await sign_report(
                    ehr,
                    report_ref,
                    practitioner_ref=practitioner,
                    practitioner_display=user.display_name,
                    text=text,
                )
                return True

        return asyncio.run(push())

    async def _practitioner(self, ehr: FhirClient, user: User) -> str:
        """The user's Practitioner at the EHR: as recorded, else found by identifier, else created."""
        if user.practitioner_ref:
            return user.practitioner_ref
        ident = f"{USER_SYSTEM}|{user.username}"
        rows = await ehr.search("Practitioner", {"identifier": ident})
        if rows:
            return f"Practitioner/{rows[0]['resource']['id']}"
        created = await ehr.create(
            {
                "resourceType": "Practitioner",
                "identifier": [{"system": USER_SYSTEM, "value": user.username}],
                "name": [{"text": user.display_name}],
            }
        )
        return f"Practitioner/{created['id']}"
