"""The model card as a FHIR DocumentReference and as a page (SQLite store, TestClient): what is built, what is
published once per model version and card text, what supersedes what, and which card the settings choose.

The real stack (PostgreSQL, uvicorn) is ``tests/integration/test_model_card.py``.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from fhir.resources.R4B.documentreference import DocumentReference

from adapters.fhir_model_card import (
    DOCUMENT_TYPE_SYSTEM,
    MODEL_CARD,
    MODEL_CARD_SYSTEM,
    MissingModelCard,
    ModelCard,
    card_markdown,
    model_card_document,
    publish_model_card,
    published_card,
)
from adapters.fhir_publish import MODEL_ID_SYSTEM
from adapters.resource_store import ResourceStore
from adapters.settings import Settings
from models.segmentation.model_card import CARD, card_for_settings, card_version
from service.app import create_app
from service.auth import mint_token
from service.users import UserStore

PASSWORD = "correct-horse-battery"
WEIGHTS = Path(__file__).resolve().parents[2] / "models" / "weights"
CARD_TYPE = f"{DOCUMENT_TYPE_SYSTEM}|{MODEL_CARD}"
XSS = "<script>window.__xss=1</script>"


def _card(version: str = "interval-seg-unet-aaaaaaaaaaaa", extra: str = "") -> ModelCard:
    text = (
        f"# Model card: Interval lesion segmenter `{version}`\n\n"
        "| vendor | studies |\n|---|---|\n| ge | 6 |\n\n## Known limits\n\n- lesions < 10 mm"
        f"{extra}\n"
    )
    return ModelCard(version, text, "weights 'segmenter.pt'")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ResourceStore]:
    s = ResourceStore(f"sqlite:///{tmp_path / 'interval.db'}")
    yield s
    s.close()


def _cards(store: ResourceStore, **params: str) -> list[dict]:
    return store.search("DocumentReference", {"type": CARD_TYPE, **params})[0]


# --- the DocumentReference ---------------------------------------------------------------------------


def test_the_document_is_a_valid_r4_document_reference_carrying_the_card_its_size_hash_and_model_version() -> (
    None
):
    card = card_for_settings(Settings())
    assert isinstance(card, ModelCard)
    doc = model_card_document(
        card, device_ref="Device/d1", date=dt.datetime(2026, 11, 27, 12), replaces=["DocumentReference/old"]
    )
    parsed = DocumentReference.model_validate(doc)
    assert (parsed.status, parsed.docStatus) == ("current", "final")
    attachment = doc["content"][0]["attachment"]
    raw = CARD.read_bytes()
    assert attachment["contentType"] == "text/markdown"
    assert base64.b64decode(attachment["data"]) == raw
    assert attachment["size"] == len(raw)
    assert base64.b64decode(attachment["hash"]) == hashlib.sha1(raw).digest()  # FHIR: SHA-1, base64
    version = card_version(raw.decode())
    assert version is not None and version.startswith("interval-seg-unet-")
    assert {"system": MODEL_ID_SYSTEM, "value": version} in doc["identifier"]
    assert {"system": MODEL_CARD_SYSTEM, "value": f"{version}/{hashlib.sha1(raw).hexdigest()}"} in doc[
        "identifier"
    ]
    assert version in attachment["title"] and version in doc["description"]
    assert doc["subject"]["reference"] == "Device/d1"
    assert doc["type"]["coding"][0]["code"] == MODEL_CARD
    assert doc["date"].startswith("2026-11-27T12:00:00") and doc["date"].endswith("Z")
    assert doc["relatesTo"] == [{"code": "replaces", "target": {"reference": "DocumentReference/old"}}]
    assert card_markdown(doc) == raw.decode()


def test_a_hash_that_does_not_match_the_text_would_be_caught() -> None:
    a, b = _card(), _card(extra=" and more")
    doc_a = model_card_document(a, device_ref="Device/d", date=dt.datetime(2026, 1, 1))
    doc_b = model_card_document(b, device_ref="Device/d", date=dt.datetime(2026, 1, 1))
    assert doc_a["content"][0]["attachment"]["hash"] != doc_b["content"][0]["attachment"]["hash"]
    assert doc_b["content"][0]["attachment"]["size"] == len(b.markdown.encode()) > len(a.markdown.encode())


# --- publishing --------------------------------------------------------------------------------------


def test_publishing_twice_stores_one_card_and_one_device(store: ResourceStore) -> None:
    card = _card()
    first = publish_model_card(store, card)
    again = publish_model_card(store, card)
    assert first.created and not again.created
    assert again.document["id"] == first.document["id"]
    assert again.document["meta"]["versionId"] == "1"
    assert len(_cards(store)) == 1
    devices, n = store.search("Device", {})
    assert n == 1 and devices[0]["identifier"] == [{"system": MODEL_ID_SYSTEM, "value": card.model_version}]
    assert first.document["subject"]["reference"] == f"Device/{devices[0]['id']}"
    found = _cards(store, identifier=f"{MODEL_ID_SYSTEM}|{card.model_version}", status="current")
    assert [d["id"] for d in found] == [first.document["id"]]
    assert published_card(store, card.model_version) == first.document


def test_a_new_model_version_supersedes_the_previous_card_and_a_rollback_makes_it_current_again(
    store: ResourceStore,
) -> None:
    old = publish_model_card(store, _card("interval-seg-unet-aaaaaaaaaaaa"))
    new = publish_model_card(store, _card("interval-seg-unet-bbbbbbbbbbbb"))
    assert new.created and new.superseded == (f"DocumentReference/{old.document['id']}",)
    assert new.document["relatesTo"] == [
        {"code": "replaces", "target": {"reference": f"DocumentReference/{old.document['id']}"}}
    ]
    stored_old = store.read("DocumentReference", old.document["id"])
    assert stored_old is not None and stored_old["status"] == "superseded"
    assert [d["id"] for d in _cards(store, status="current")] == [new.document["id"]]
    assert published_card(store, "interval-seg-unet-aaaaaaaaaaaa") is None
    assert len(store.search("Device", {})[0]) == 2

    back = publish_model_card(store, _card("interval-seg-unet-aaaaaaaaaaaa"))
    assert not back.created and back.document["id"] == old.document["id"]
    assert [d["id"] for d in _cards(store, status="current")] == [old.document["id"]]
    assert len(_cards(store)) == 2


def test_a_regenerated_card_of_the_same_model_replaces_the_old_text(store: ResourceStore) -> None:
    first = publish_model_card(store, _card())
    second = publish_model_card(store, _card(extra=" (re-measured)"))
    assert second.created and second.document["id"] != first.document["id"]
    assert "re-measured" in card_markdown(second.document)
    assert {d["id"]: d["status"] for d in _cards(store)} == {
        first.document["id"]: "superseded",
        second.document["id"]: "current",
    }


# --- which card the settings choose ------------------------------------------------------------------


def test_the_built_in_model_gets_the_committed_card() -> None:
    card = card_for_settings(Settings())
    assert isinstance(card, ModelCard)
    assert card.markdown == CARD.read_text()
    assert "| philips |" in card.markdown


def test_weights_the_card_does_not_describe_get_no_card(tmp_path: Path) -> None:
    weights = tmp_path / "retrained.pt"
    weights.write_bytes((WEIGHTS / "segmenter.pt").read_bytes() + b"retrained")
    card = card_for_settings(Settings(segmenter_weights=weights))
    assert isinstance(card, MissingModelCard)
    assert card.model_version is not None and card.model_version != card_version(CARD.read_text())
    assert f"describes the model {card_version(CARD.read_text())}" in card.reason


def test_a_users_own_model_gets_no_card(tmp_path: Path) -> None:
    bundle = tmp_path / "my_bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    (bundle / "models" / "model.pt").write_bytes(b"not read here")
    contract = {
        "input_windows_hu": [[-160, 240]],
        "output_classes": ["background", "liver", "lung", "lesion"],
        "spacing_kji_mm": [2.5, 2.0, 2.0],
        "roi_kji": [48, 96, 96],
    }
    (bundle / "configs" / "metadata.json").write_text(json.dumps({"name": "mine", "interval": contract}))
    card = card_for_settings(Settings(segmenter_kind="bundle", segmenter_model=bundle))
    assert isinstance(card, MissingModelCard)
    assert card.model_version is not None and card.model_version.startswith("bundle-mine-")
    assert "your own model" in card.reason


def test_a_card_file_without_the_title_is_not_trusted(tmp_path: Path) -> None:
    copy = tmp_path / "MODEL_CARD.md"
    shutil.copy(CARD, copy)
    copy.write_text(re.sub(r"^# .*\n", "# A card\n", copy.read_text(), count=1))
    assert isinstance(card_for_settings(Settings(), card=copy), MissingModelCard)


# --- the page and the FHIR API -----------------------------------------------------------------------


def _app(tmp_path: Path, card: ModelCard | MissingModelCard | None) -> tuple[TestClient, Settings]:
    settings = Settings(environment="test", database_url=f"sqlite:///{tmp_path / 'interval.db'}")
    users = UserStore(settings.database_url)
    if users.get("clin") is None:
        users.add_user("clin", PASSWORD, role="clinician", sites=["north"], display_name="Dr Clin")
    users.close()
    return TestClient(create_app(settings, model_card=card)), settings


def _login(client: TestClient) -> None:
    page = client.get("/login")
    match = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert match
    r = client.post("/login", data={"username": "clin", "password": PASSWORD, "csrf_token": match.group(1)})
    assert r.status_code == 200 and 'data-testid="who"' in r.text


def test_everyone_signed_in_reads_the_card_of_the_model_in_use(tmp_path: Path) -> None:
    card = card_for_settings(Settings())
    assert isinstance(card, ModelCard)
    client, settings = _app(tmp_path, card)
    with client:
        assert client.get("/model-card", follow_redirects=False).status_code == 303  # signed in only
        _login(client)
        page = client.get("/model-card")
        assert page.status_code == 200
        assert 'href="/model-card"' in page.text  # in the navigation
        assert f"<code>{card.model_version}</code>" in page.text
        rows = re.findall(r"<tr>\s*<td>(ge|siemens|philips|canon|uih)</td>", page.text)
        assert set(rows) == {"ge", "siemens", "philips", "canon", "uih"}
        assert "<h2>Known limits</h2>" in page.text and "size:&lt;10mm" in page.text
        doc_id = re.search(r'data-testid="model-card-document">DocumentReference/([0-9a-f]+)<', page.text)
        assert doc_id is not None
        token = mint_token(settings.api_token_secret, "ehr-1", "system/DocumentReference.rs")
        headers = {"Authorization": f"Bearer {token}"}
        found = client.get("/fhir/DocumentReference", params={"type": CARD_TYPE}, headers=headers).json()
        assert found["total"] == 1 and found["entry"][0]["resource"]["id"] == doc_id.group(1)
        read = client.get(f"/fhir/DocumentReference/{doc_id.group(1)}", headers=headers)
        assert read.status_code == 200 and card_markdown(read.json()) == card.markdown
        person = mint_token(
            settings.api_token_secret, "clin", "user/DocumentReference.rs"
        )  # one site's clinician
        as_person = client.get(
            f"/fhir/DocumentReference/{doc_id.group(1)}", headers={"Authorization": f"Bearer {person}"}
        )
        assert as_person.status_code == 200  # the card has no site: everyone may read it
        denied = client.get(
            "/fhir/DocumentReference",
            params={"type": CARD_TYPE},
            headers={
                "Authorization": f"Bearer {mint_token(settings.api_token_secret, 'x', 'system/Task.rs')}"
            },
        )
        assert denied.status_code == 403


def test_the_card_text_cannot_carry_markup(tmp_path: Path) -> None:
    client, _ = _app(tmp_path, _card(extra=f" {XSS} [x](javascript:alert(1))"))
    with client:
        _login(client)
        page = client.get("/model-card").text
        assert XSS not in page and "&lt;script&gt;" in page
        assert 'href="javascript:' not in page
        assert "<table>" in page  # the card's Markdown is rendered, not shown raw


def test_a_model_without_a_card_is_said_so_and_no_other_card_is_shown(tmp_path: Path) -> None:
    missing = MissingModelCard("bundle-mine-123456789abc", "MONAI bundle 'mine'", "this is your own model")
    client, settings = _app(tmp_path, missing)
    with client:
        _login(client)
        page = client.get("/model-card").text
        assert 'data-testid="model-card-missing"' in page and "bundle-mine-123456789abc" in page
        assert "this is your own model" in page
        assert "| ge |" not in page and "<table>" not in page
        token = mint_token(settings.api_token_secret, "ehr-1", "system/DocumentReference.rs")
        found = client.get(
            "/fhir/DocumentReference",
            params={"type": CARD_TYPE},
            headers={"Authorization": f"Bearer {token}"},
        ).json()
        assert found["total"] == 0
