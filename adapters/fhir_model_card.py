"""The segmentation model's card (instructions for use) as a FHIR R4 ``DocumentReference``, kept in Interval's store.

The card itself is Markdown generated from measured results (``models.segmentation.model_card``). Published, it is:

- ``status`` ``current`` (``superseded`` once a card of another model version replaces it), ``docStatus`` ``final``;
- ``type`` ``MODEL_CARD`` and ``category`` ``MODEL_DOCUMENTATION`` (Interval's ``DOCUMENT_TYPE_SYSTEM``: no LOINC
  document code names a model card);
- version-stamped with the model: ``identifier`` ``MODEL_ID_SYSTEM|<model version>`` (the same identifier as the
  model's ``Device``), ``subject`` that ``Device``, and ``masterIdentifier`` / ``identifier``
  ``MODEL_CARD_SYSTEM|<model version>/<SHA-1 of the card>``: the idempotency key;
- ``content[0].attachment``: ``text/markdown``, the card base64-encoded, its ``size`` in bytes and ``hash`` (SHA-1,
  base64, as FHIR defines it), its title;
- ``relatesTo`` ``replaces`` each card it superseded.

``publish_model_card`` runs when the API starts (``service.app.create_app``): the same model version and card
(same hash) write nothing; a new one is created with its Device in one transaction that also marks the cards it
replaces ``superseded``. Concurrent starts are safe: the create is conditional on the key, and a replaced card
is updated with ``If-Match``, so a second publisher's transaction fails and its retry finds the first's card.
The FHIR API serves them: ``GET /fhir/DocumentReference?type=<DOCUMENT_TYPE_SYSTEM>|model-card&status=current``,
or ``?identifier=<MODEL_ID_SYSTEM>|<model version>``.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from adapters.fhir_publish import MODEL_ID_SYSTEM, model_device_entry
from adapters.resource_store import ResourceStore, VersionConflict, format_instant
from adapters.sql_store import utc_now
from core.errors import IntervalError

__all__ = [
    "DOCUMENT_TYPE_SYSTEM",
    "MODEL_CARD",
    "MODEL_CARD_SYSTEM",
    "MODEL_DOCUMENTATION",
    "MissingModelCard",
    "ModelCard",
    "PublishedCard",
    "card_markdown",
    "model_card_bundle",
    "model_card_document",
    "publish_model_card",
    "published_card",
]

log = logging.getLogger(__name__)

DOCUMENT_TYPE_SYSTEM = "http://interval.local/fhir/CodeSystem/document-type"
MODEL_CARD = "model-card"
MODEL_DOCUMENTATION = "model-documentation"
MODEL_CARD_SYSTEM = "http://interval.local/fhir/model-card"  # <model version>/<SHA-1 hex of the card>
CONTENT_TYPE = "text/markdown"


@dataclass(frozen=True)
class ModelCard:
    """The card of one model version: Markdown as ``models.segmentation.model_card`` generates it.
    ``model`` says which model file it is, in words (``weights 'segmenter.pt'``)."""

    model_version: str
    markdown: str
    model: str

    def __post_init__(self) -> None:
        if not self.model_version or not self.markdown.strip():
            raise ValueError("a model card needs a model version and some text")

    @property
    def data(self) -> bytes:
        return self.markdown.encode("utf-8")

    @property
    def sha1_hex(self) -> str:
        return hashlib.sha1(self.data).hexdigest()

    @property
    def key(self) -> str:
        """The idempotency key: model version and card content."""
        return f"{self.model_version}/{self.sha1_hex}"

    @property
    def title(self) -> str:
        first = self.markdown.lstrip().splitlines()[0].lstrip("# ").replace("`", "")
        return first or f"Model card: {self.model_version}"


@dataclass(frozen=True)
class MissingModelCard:
    """The configured model has no card; ``reason`` says why and what to do, for the page."""

    model_version: str | None
    model: str
    reason: str


@dataclass(frozen=True)
class PublishedCard:
    document: dict[str, Any]  # as stored (id, meta.versionId)
    created: bool  # False: this model version's card with the same content was already there
    superseded: tuple[str, ...] = ()  # "DocumentReference/<id>" of the cards it replaced


def _cc(code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": DOCUMENT_TYPE_SYSTEM, "code": code, "display": display}], "text": display}


def model_card_document(
    card: ModelCard, *, device_ref: str, date: dt.datetime, replaces: Sequence[str] = ()
) -> dict[str, Any]:
    """The card's ``DocumentReference`` (status ``current``); ``device_ref`` is the model's ``Device``
    (``Device/<id>`` or a Bundle fullUrl), ``replaces`` the ``DocumentReference/<id>`` of the cards it supersedes;
    ``date`` is naive UTC."""
    when = format_instant(date)
    doc: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "masterIdentifier": {"system": MODEL_CARD_SYSTEM, "value": card.key},
        "identifier": [
            {"system": MODEL_ID_SYSTEM, "value": card.model_version},
            {"system": MODEL_CARD_SYSTEM, "value": card.key},
        ],
        "status": "current",
        "docStatus": "final",
        "type": _cc(MODEL_CARD, "AI model card and instructions for use"),
        "category": [_cc(MODEL_DOCUMENTATION, "AI model documentation")],
        "subject": {"reference": device_ref, "display": f"segmentation model {card.model_version}"},
        "date": when,
        "description": (
            f"Model card and instructions for use of the Interval lesion segmenter {card.model_version} "
            f"({card.model}): intended use, input specification, performance per scanner vendor and patient "
            "subgroup, known limits and human oversight, generated from the measured validation and audit results."
        ),
        "content": [
            {
                "attachment": {
                    "contentType": CONTENT_TYPE,
                    "language": "en",
                    "data": base64.b64encode(card.data).decode("ascii"),
                    "size": len(card.data),
                    "hash": base64.b64encode(bytes.fromhex(card.sha1_hex)).decode("ascii"),
                    "title": card.title,
                    "creation": when,
                }
            }
        ],
    }
    if replaces:
        doc["relatesTo"] = [{"code": "replaces", "target": {"reference": ref}} for ref in replaces]
    return doc


def model_card_bundle(
    card: ModelCard, *, date: dt.datetime, supersede: Sequence[dict[str, Any]] = ()
) -> dict[str, Any]:
    """The transaction that publishes ``card``: the model's Device (conditional on its version), the card
    (conditional on ``card.key``), and each of ``supersede`` (stored cards) set to ``superseded`` with If-Match."""
    device_url = f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'{MODEL_ID_SYSTEM}/{card.model_version}')}"
    old_refs = [f"DocumentReference/{d['id']}" for d in supersede]
    document = model_card_document(card, device_ref=device_url, date=date, replaces=old_refs)
    entries: list[dict[str, Any]] = [
        model_device_entry(device_url, card.model_version),
        {
            "fullUrl": f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'{MODEL_CARD_SYSTEM}/{card.key}')}",
            "resource": document,
            "request": {
                "method": "POST",
                "url": "DocumentReference",
                "ifNoneExist": f"identifier={MODEL_CARD_SYSTEM}|{card.key}",
            },
        },
    ]
    for old in supersede:
        entries.append(
            {
                "resource": {**old, "status": "superseded"},
                "request": {
                    "method": "PUT",
                    "url": f"DocumentReference/{old['id']}",
                    "ifMatch": f'W/"{old["meta"]["versionId"]}"',
                },
            }
        )
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def _cards(store: ResourceStore, params: dict[str, str]) -> list[dict[str, Any]]:
    found, _ = store.search(
        "DocumentReference",
        {"type": f"{DOCUMENT_TYPE_SYSTEM}|{MODEL_CARD}", "_sort": "-_lastUpdated", "_count": "500", **params},
    )
    return found


def published_card(store: ResourceStore, model_version: str) -> dict[str, Any] | None:
    """The newest current card ``DocumentReference`` of ``model_version`` in ``store``, or None."""
    found = _cards(store, {"identifier": f"{MODEL_ID_SYSTEM}|{model_version}", "status": "current"})
    return found[0] if found else None


def publish_model_card(
    store: ResourceStore, card: ModelCard, *, now: dt.datetime | None = None
) -> PublishedCard:
    """Store ``card`` as the current card unless it is already there (same model version and content).

    Every other current card (another model version, or the same version's older text) becomes
    ``superseded`` and is named by the new one's ``relatesTo``. A card that was superseded and is
    published again (a model rolled back) becomes ``current`` again. Safe against concurrent publishers."""
    for _ in range(3):
        same = _cards(store, {"identifier": f"{MODEL_CARD_SYSTEM}|{card.key}"})
        others = [d for d in _cards(store, {"status": "current"}) if all(d["id"] != s["id"] for s in same)]
        if same and same[0].get("status") == "current" and not others:
            return PublishedCard(same[0], created=False)
        bundle = model_card_bundle(card, date=now or utc_now(), supersede=others)
        if same:  # rolled back to a model whose card was superseded: make that card current again
            bundle["entry"][1] = {
                "resource": {**same[0], "status": "current"},
                "request": {
                    "method": "PUT",
                    "url": f"DocumentReference/{same[0]['id']}",
                    "ifMatch": f'W/"{same[0]["meta"]["versionId"]}"',
                },
            }
        try:
            targets = store.apply_transaction(bundle)
        except VersionConflict:
            continue  # another process published at the same time: look again
        doc_id = same[0]["id"] if same else targets[bundle["entry"][1]["fullUrl"]].split("/")[1]
        stored = store.read("DocumentReference", doc_id)
        assert stored is not None  # written by the transaction above
        superseded = tuple(f"DocumentReference/{d['id']}" for d in others)
        log.info(
            "model card of %s is DocumentReference/%s (superseded: %s)",
            card.model_version,
            doc_id,
            superseded,
        )
        return PublishedCard(stored, created=not same, superseded=superseded)
    raise IntervalError(
        f"the model card of {card.model_version} could not be published (concurrent writers); retry"
    )


def card_markdown(document: dict[str, Any]) -> str:
    """The Markdown text of a card ``DocumentReference`` (its first attachment)."""
    attachment = (document.get("content") or [{}])[0].get("attachment") or {}
    return base64.b64decode(attachment.get("data", "")).decode("utf-8")
