"""The per-site AI switch in SQL (the same database as ``adapters.resource_store``; SQLite or PostgreSQL).

One table, ``ai_switch_change``: every setting an admin made (site, on/off, who, when, why), never updated or
deleted. A site's current setting is its latest row; a site without a row uses AI (``core.oversight``). The API
and the web pages write it (``service.oversight``); the analysis reads it per study (``workers.analysis``), so a
change applies to every analysis that starts after it, in every worker process.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Boolean, DateTime, Index, Integer, String, Text, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from adapters.sql_store import SqlStore, utc_now
from core.oversight import AiSwitch

__all__ = ["AiSwitchStore"]


class _Base(DeclarativeBase):
    pass


class _Change(_Base):
    __tablename__ = "ai_switch_change"
    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    site: Mapped[str] = mapped_column(String(64))
    ai_enabled: Mapped[bool] = mapped_column(Boolean)
    changed_by: Mapped[str] = mapped_column(String(64))
    changed_at: Mapped[dt.datetime] = mapped_column(DateTime)
    reason: Mapped[str] = mapped_column(Text)
    __table_args__ = (Index("ix_ai_switch_change_site", "site", "pk"),)


def _switch(row: _Change) -> AiSwitch:
    return AiSwitch(row.site, row.ai_enabled, row.changed_by, row.changed_at, row.reason, row.pk)


class AiSwitchStore(SqlStore):
    """Each site's AI switch and its history; safe to share between threads (``core.ports.AiSwitchReader``)."""

    def __init__(self, database_url: str) -> None:
        super().__init__(database_url, _Base.metadata)

    def set(self, site: str, ai_enabled: bool, changed_by: str, reason: str) -> AiSwitch:
        """Record a new setting (now); ``ValueError`` for a bad site or a missing reason. Returns it stored."""
        now = utc_now()
        checked = AiSwitch(site.strip(), ai_enabled, changed_by, now, " ".join(reason.split()))
        with self._tx() as s:
            row = _Change(
                site=checked.site,
                ai_enabled=checked.ai_enabled,
                changed_by=checked.changed_by,
                changed_at=checked.changed_at,
                reason=checked.reason,
            )
            s.add(row)
            s.flush()
            return _switch(row)

    def current(self, site: str) -> AiSwitch | None:
        with self._tx() as s:
            row = s.scalars(
                select(_Change).where(_Change.site == site).order_by(_Change.pk.desc()).limit(1)
            ).first()
            return _switch(row) if row is not None else None

    def states(self) -> dict[str, AiSwitch]:
        """The current setting of every site that has one, by site name."""
        with self._tx() as s:
            latest = select(func.max(_Change.pk)).group_by(_Change.site).scalar_subquery()
            rows = s.scalars(select(_Change).where(_Change.pk.in_(latest)).order_by(_Change.site))
            return {row.site: _switch(row) for row in rows}

    def history(self, site: str | None = None, limit: int = 100) -> list[AiSwitch]:
        """The latest ``limit`` settings (of ``site``, or of every site), newest first."""
        with self._tx() as s:
            query = select(_Change).order_by(_Change.pk.desc()).limit(limit)
            if site is not None:
                query = query.where(_Change.site == site)
            return [_switch(row) for row in s.scalars(query)]
