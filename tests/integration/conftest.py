"""Real services for integration tests: the FHIR stand-in (tools/fhir-standin), a throwaway PostgreSQL, and (for
the PACS and queue tests) ``orthanc`` and ``redis``.

``fhir_server`` and ``postgres_db`` are shared by the whole session; a test that injects failures or counts requests
calls ``fhir_server.reset()`` first. ``smart_fhir_server`` is a separate stand-in per test that requires SMART
Backend Services tokens from the ``smart_client`` key pair.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from fixtures.services import (
    FhirStandin,
    OrthancServer,
    Postgres,
    RedisServer,
    fhir_standin,
    orthanc_server,
    postgres,
    redis_server,
)


@dataclass(frozen=True)
class SmartClient:
    """A registered SMART backend client: its id, its private key (PEM, for signing) and its public key file."""

    client_id: str
    private_key_pem: bytes
    public_key_path: Path


@pytest.fixture(scope="session")
def fhir_server() -> Iterator[FhirStandin]:
    with fhir_standin() as server:
        yield server


@pytest.fixture(scope="session")
def postgres_db() -> Iterator[Postgres]:
    with postgres() as db:
        yield db


@pytest.fixture(scope="session")
def smart_client(tmp_path_factory: pytest.TempPathFactory) -> SmartClient:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    folder = tmp_path_factory.mktemp("smart")
    public_key_path = folder / "client-public.pem"
    public_key_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    private_key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return SmartClient("interval-test-client", private_key_pem, public_key_path)


@pytest.fixture
def smart_fhir_server(smart_client: SmartClient) -> Iterator[FhirStandin]:
    with fhir_standin(
        smart_public_key=smart_client.public_key_path, smart_client_id=smart_client.client_id
    ) as server:
        yield server


@pytest.fixture(scope="session")
def orthanc() -> Iterator[OrthancServer]:
    """Orthanc + DICOMweb in its own loopback-only network namespace; a test that stops it starts it again."""
    with orthanc_server() as server:
        yield server


@pytest.fixture(scope="session")
def redis() -> Iterator[RedisServer]:
    """A throwaway redis-server with AOF; use ``redis.db_url(n)`` for a database of your own."""
    with redis_server() as server:
        yield server
