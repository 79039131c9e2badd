"""The model card on the real stack: uvicorn serving Interval on PostgreSQL, the card of the configured (built-in)
model found as ``workers.serve`` finds it, a person reading ``/model-card`` over HTTP and an EHR finding the card's
DocumentReference through the FHIR API; the server restarted (nothing new is written), then started with another
model version's card (the previous one is superseded).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from adapters.fhir_model_card import DOCUMENT_TYPE_SYSTEM, MODEL_CARD, ModelCard
from adapters.fhir_publish import MODEL_ID_SYSTEM
from adapters.settings import Settings
from fixtures.services import Postgres, serve_app
from models.segmentation.model_card import card_for_settings
from service.app import create_app
from service.auth import mint_token
from service.users import UserStore

pytestmark = pytest.mark.integration

SECRET = "integration-test-secret-of-at-least-32-bytes"
PASSWORD = "correct-horse-battery"
ROOT = Path(__file__).resolve().parents[2]
CARD_TYPE = f"{DOCUMENT_TYPE_SYSTEM}|{MODEL_CARD}"


class _Tables(HTMLParser):
    """Every <table> of a page as rows of cell texts."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self.tables:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _own_database(db: Postgres, name: str) -> str:
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    return db.url.rsplit("/", 1)[0] + f"/{name}"


@contextmanager
def _serve(settings: Settings, card: Any) -> Iterator[str]:
    """Interval on uvicorn, started (its startup publishes the card) and stopped around the block."""
    with serve_app(create_app(settings, model_card=card)) as url:
        yield url


@pytest.fixture(scope="module")
def settings(postgres_db: Postgres) -> Iterator[Settings]:
    settings = Settings(
        database_url=_own_database(postgres_db, "interval_model_card"), api_token_secret=SECRET
    )
    users = UserStore(settings.database_url)
    users.add_user("clin", PASSWORD, role="clinician", sites=["north"], display_name="Dr Clin")
    users.close()
    yield settings


def _login(http: httpx.Client) -> None:
    page = http.get("/login")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert csrf
    r = http.post("/login", data={"username": "clin", "password": PASSWORD, "csrf_token": csrf.group(1)})
    assert 'data-testid="who"' in r.text


def _cards(url: str, **params: str) -> dict[str, Any]:
    token = mint_token(SECRET, "ehr-1", "system/DocumentReference.rs")
    r = httpx.get(
        f"{url}/fhir/DocumentReference", params=params, headers={"Authorization": f"Bearer {token}"}
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_the_card_of_the_configured_model_is_a_page_and_a_document_published_once_then_superseded(
    settings: Settings,
) -> None:
    card = card_for_settings(settings)
    assert isinstance(card, ModelCard)
    weights = (ROOT / "models" / "weights" / "segmenter.pt").read_bytes()
    version = f"interval-seg-unet-{hashlib.sha256(weights).hexdigest()[:12]}"
    assert card.model_version == version
    validation = json.loads((ROOT / "models" / "weights" / "validation" / "held_out.json").read_text())

    with _serve(settings, card) as url, httpx.Client(base_url=url, follow_redirects=True) as http:
        _login(http)
        page = http.get("/model-card")
        assert page.status_code == 200
        assert f"<code>{version}</code>" in page.text
        parser = _Tables()
        parser.feed(page.text)
        vendors = next(t for t in parser.tables if t and t[0][:2] == ["vendor", "studies"])
        rows = {row[0]: row for row in vendors[1:]}
        assert set(rows) == set(validation["per_vendor"])
        for vendor, measured in validation["per_vendor"].items():
            assert rows[vendor][1] == str(measured["studies"])
            assert rows[vendor][2] == (
                f"{100 * measured['sensitivity_ge10mm']:.1f}% ({measured['found_ge10mm']})"
            )
        assert any(t and t[0][:2] == ["attribute", "value"] for t in parser.tables)  # the subgroup audit
        assert "Known limits" in page.text and "Intended use" in page.text

        found = _cards(url, type=CARD_TYPE, status="current")
        assert found["total"] == 1
        doc = found["entry"][0]["resource"]
        assert f'data-testid="model-card-document">DocumentReference/{doc["id"]}<' in page.text
        attachment = doc["content"][0]["attachment"]
        raw = (ROOT / "models" / "MODEL_CARD.md").read_bytes()
        assert base64.b64decode(attachment["data"]) == raw and attachment["size"] == len(raw)
        assert base64.b64decode(attachment["hash"]) == hashlib.sha1(raw).digest()
        assert _cards(url, identifier=f"{MODEL_ID_SYSTEM}|{version}")["total"] == 1
        assert doc["subject"]["reference"].startswith("Device/")
        first = (doc["id"], doc["meta"]["versionId"])

    with _serve(settings, card_for_settings(settings)) as url:  # a restart publishes nothing new
        found = _cards(url, type=CARD_TYPE)
        assert found["total"] == 1
        assert (
            found["entry"][0]["resource"]["id"],
            found["entry"][0]["resource"]["meta"]["versionId"],
        ) == first

    other = ModelCard(
        "interval-seg-unet-0123456789ab",
        card.markdown.replace(version, "interval-seg-unet-0123456789ab"),
        "weights 'retrained.pt'",
    )
    with _serve(settings, other) as url:
        current = _cards(url, type=CARD_TYPE, status="current")
        assert current["total"] == 1
        new = current["entry"][0]["resource"]
        assert new["id"] != first[0]
        assert new["relatesTo"] == [
            {"code": "replaces", "target": {"reference": f"DocumentReference/{first[0]}"}}
        ]
        old = _cards(url, _id=first[0])["entry"][0]["resource"]
        assert old["status"] == "superseded"
        assert _cards(url, type=CARD_TYPE)["total"] == 2
