"""Plumbing shared by Interval's SQL stores (resources, accounts, the AI switch): one database, by URL.

SQLAlchemy 2; SQLite by default (file or memory), PostgreSQL in production. ``make_engine`` opens it as every
store does; ``SqlStore`` is the base of a store of its own tables in it: thread-safe (each call opens its own
session; SQLite writes serialised in-process, since SQLite has one writer anyway), tables created on start.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from sqlalchemy import MetaData, create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

__all__ = ["SqlStore", "make_engine", "utc_now"]


def utc_now() -> dt.datetime:
    """Naive UTC with microseconds: the clock of every store's timestamps."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def make_engine(url: str) -> Engine:
    """An engine for ``url`` as Interval's stores use it: PostgreSQL with pre-ping; SQLite shared between
    threads, WAL on files, waiting (not failing) on a busy database."""
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    memory = url in ("sqlite://", "sqlite:///:memory:") or "mode=memory" in url
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": 30},
        poolclass=StaticPool if memory else None,
    )

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        if not memory:
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    return engine


class SqlStore:
    """A store of ``tables`` in the database at ``database_url`` (created when missing)."""

    def __init__(self, database_url: str, tables: MetaData) -> None:
        self._engine = make_engine(database_url)
        self._lock: threading.RLock | None = (
            threading.RLock() if self._engine.dialect.name == "sqlite" else None
        )
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        tables.create_all(self._engine)

    def close(self) -> None:
        self._engine.dispose()

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        """One database transaction (committed when the block ends without an exception)."""
        with self._lock or nullcontext(), self._sessions() as session, session.begin():
            yield session
