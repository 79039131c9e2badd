"""People who use the web pages: accounts, roles, sites, sessions, and what they did to a report.

Tables (SQLAlchemy, in the same database as ``adapters.resource_store``, created on start; ``adapters.sql_store``):

- ``web_user``: user name, display name, role (``radiologist``, ``clinician``, ``admin``), the sites whose
  studies the user may read (``*``: every site), the argon2id hash of the password, and optionally the
  user's FHIR Practitioner at the EHR (the signer of a report);
- ``web_session``: one row per login; the browser holds a random token in an HttpOnly cookie, the table holds
  only its SHA-256, with the session's CSRF token and its expiry;
- ``report_event``: every change a person made to a report (saved, finding rejected or accepted, signed,
  amended) with the version it produced; a signature keeps the draft and the signed text and their diff
  (what the radiologist changed: the model's quality in real use) and whether the EHR has it;
- ``finding_feedback``: a radiologist's verdict on one AI finding (accepted / rejected, with a reason), the
  feedback that measures and retrains the model.

Who may do what is decided here (``User.can_sign``, ``User.can_read_site``) so that it is tested without a
browser; ``service.web`` only asks.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Boolean, DateTime, Index, Integer, String, Text, delete, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from adapters.sql_store import SqlStore, utc_now
from core.errors import InputError

__all__ = [
    "ALL_SITES",
    "FeedbackRecord",
    "ReportEvent",
    "Role",
    "User",
    "UserExistsError",
    "UserStore",
    "WebSession",
    "csrf_matches",
    "hash_password",
    "login_csrf_token",
    "verify_password",
]

ALL_SITES = "*"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_SITE = re.compile(r"^(\*|[^\s,][^,]{0,63})$")
_HASHER = PasswordHasher()  # argon2id, RFC 9106 low-memory profile (t=3, 64 MiB, p=4)
# verified against when the user name is unknown, so that a wrong name costs the same time as a wrong password
_DUMMY_HASH = _HASHER.hash(secrets.token_hex(16))
MIN_PASSWORD_CHARS = 10


class Role(enum.StrEnum):
    RADIOLOGIST = "radiologist"
    CLINICIAN = "clinician"
    ADMIN = "admin"


class UserExistsError(InputError):
    reason = "user_exists"


@dataclass(frozen=True)
class User:
    username: str
    display_name: str
    role: Role
    sites: tuple[str, ...]  # ("*",) reads every site
    practitioner_ref: str | None = None  # "Practitioner/<id>" at the EHR, when known

    @property
    def can_sign(self) -> bool:
        """Only radiologists edit, accept or reject findings, sign and amend reports."""
        return self.role is Role.RADIOLOGIST

    def can_read_site(self, site: str | None) -> bool:
        """A report is readable by users of its site; a report without a site only by users of every site."""
        if ALL_SITES in self.sites:
            return True
        return site is not None and site in self.sites


@dataclass(frozen=True)
class WebSession:
    user: User
    csrf_token: str
    expires: dt.datetime


@dataclass(frozen=True)
class ReportEvent:
    report_id: str
    version_id: int  # the report's version this change produced
    username: str
    display_name: str
    action: str  # saved / rejected / accepted / signed / amended
    at: dt.datetime
    detail: str = ""
    draft_text: str = ""  # signatures only: the text as the analysis drafted it
    signed_text: str = ""  # signatures only: the text signed
    diff: str = ""  # signatures only: unified diff, one sentence per line
    ehr_status: str = ""  # signatures only: "sent", "not configured", or why it failed


@dataclass(frozen=True)
class FeedbackRecord:
    report_id: str
    track_id: str
    label: str
    decision: str  # accepted / rejected
    username: str
    reason: str
    at: dt.datetime


def hash_password(password: str) -> str:
    """The argon2id hash (PHC string: algorithm, parameters, salt and hash) of ``password``."""
    if len(password) < MIN_PASSWORD_CHARS:
        raise InputError(f"a password needs at least {MIN_PASSWORD_CHARS} characters")
    return _HASHER.hash(password)


def verify_password(stored_hash: str, password: str) -> bool:
    try:
        return _HASHER.verify(stored_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def csrf_matches(expected: str | None, given: str | None) -> bool:
    """Constant-time comparison of the CSRF token a form carried with the session's."""
    if not expected or not given:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


def login_csrf_token(key: bytes, nonce: str) -> str:
    """The login form's CSRF token: an HMAC of the pre-login cookie's nonce (signed double submit), so that
    another site can neither read it nor forge it."""
    return hmac.new(key, f"login:{nonce}".encode(), hashlib.sha256).hexdigest()


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class _Base(DeclarativeBase):
    pass


class _User(_Base):
    __tablename__ = "web_user"
    username: Mapped[str] = mapped_column(String(64), primary_key=True)
    display_name: Mapped[str] = mapped_column(Text)
    role: Mapped[str] = mapped_column(String(16))
    sites: Mapped[str] = mapped_column(Text)  # comma-separated
    password_hash: Mapped[str] = mapped_column(Text)
    practitioner_ref: Mapped[str | None] = mapped_column(Text, nullable=True)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created: Mapped[dt.datetime] = mapped_column(DateTime)


class _Session(_Base):
    __tablename__ = "web_session"
    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    username: Mapped[str] = mapped_column(String(64), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created: Mapped[dt.datetime] = mapped_column(DateTime)
    expires: Mapped[dt.datetime] = mapped_column(DateTime, index=True)


class _Event(_Base):
    __tablename__ = "report_event"
    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    report_id: Mapped[str] = mapped_column(String(64))
    version_id: Mapped[int] = mapped_column(Integer)
    username: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(16))
    at: Mapped[dt.datetime] = mapped_column(DateTime)
    detail: Mapped[str] = mapped_column(Text, default="")
    draft_text: Mapped[str] = mapped_column(Text, default="")
    signed_text: Mapped[str] = mapped_column(Text, default="")
    diff: Mapped[str] = mapped_column(Text, default="")
    ehr_status: Mapped[str] = mapped_column(Text, default="")
    __table_args__ = (Index("ix_report_event_report", "report_id", "version_id"),)


class _Feedback(_Base):
    __tablename__ = "finding_feedback"
    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    report_id: Mapped[str] = mapped_column(String(64), index=True)
    track_id: Mapped[str] = mapped_column(String(128))
    label: Mapped[str] = mapped_column(String(16))
    decision: Mapped[str] = mapped_column(String(16))
    username: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[dt.datetime] = mapped_column(DateTime)


def _user(row: _User) -> User:
    return User(
        row.username,
        row.display_name,
        Role(row.role),
        tuple(s for s in row.sites.split(",") if s),
        row.practitioner_ref,
    )


class UserStore(SqlStore):
    """Accounts, sessions, report events and finding feedback in SQL; safe to share between threads."""

    def __init__(self, database_url: str) -> None:
        super().__init__(database_url, _Base.metadata)

    # --- accounts -----------------------------------------------------------------------------

    def add_user(
        self,
        username: str,
        password: str,
        *,
        role: Role | str,
        sites: Sequence[str],
        display_name: str | None = None,
        practitioner_ref: str | None = None,
    ) -> User:
        """Create an account; ``UserExistsError`` when the name is taken, ``InputError`` for a bad field."""
        if not _NAME.match(username):
            raise InputError(
                "a user name is 1-64 letters, digits, '.', '_', '@' or '-', starting alphanumeric"
            )
        try:
            role = Role(role)
        except ValueError:
            raise InputError(f"role must be one of {', '.join(r.value for r in Role)}") from None
        clean = [s.strip() for s in sites if s.strip()]
        if not clean or any(not _SITE.match(s) for s in clean):
            raise InputError("give at least one site (no commas), or * for every site")
        if practitioner_ref is not None and not re.fullmatch(
            r"Practitioner/[A-Za-z0-9\-.]{1,64}", practitioner_ref
        ):
            raise InputError("the practitioner must be a reference such as Practitioner/123")
        hashed = hash_password(password)
        with self._tx() as s:
            if s.get(_User, username) is not None:
                raise UserExistsError(f"user {username} already exists")
            row = _User(
                username=username,
                display_name=display_name or username,
                role=role.value,
                sites=",".join(dict.fromkeys(clean)),
                password_hash=hashed,
                practitioner_ref=practitioner_ref,
                active=True,
                created=utc_now(),
            )
            s.add(row)
            return _user(row)

    def get(self, username: str) -> User | None:
        with self._tx() as s:
            row = s.get(_User, username)
            return _user(row) if row is not None and row.active else None

    def sites(self) -> set[str]:
        """Every site some active account reads (``*`` included when someone reads all)."""
        with self._tx() as s:
            return {
                site
                for row in s.scalars(select(_User).where(_User.active.is_(True)))
                for site in row.sites.split(",")
                if site
            }

    def set_password(self, username: str, password: str) -> None:
        hashed = hash_password(password)
        with self._tx() as s:
            row = s.get(_User, username)
            if row is None:
                raise InputError(f"there is no user {username}")
            row.password_hash = hashed
            s.execute(delete(_Session).where(_Session.username == username))

    def authenticate(self, username: str, password: str) -> User | None:
        """The user when the password is theirs; None otherwise (unknown name, wrong password, inactive)."""
        with self._tx() as s:
            row = s.get(_User, username)
            stored = row.password_hash if row is not None else _DUMMY_HASH
            ok = verify_password(stored, password)
            if row is None or not row.active or not ok:
                return None
            if _HASHER.check_needs_rehash(row.password_hash):
                row.password_hash = _HASHER.hash(password)
            return _user(row)

    # --- sessions -----------------------------------------------------------------------------

    def start_session(self, user: User, ttl: dt.timedelta) -> tuple[str, WebSession]:
        """A new login: (the cookie's token, the session). Expired sessions are swept at the same time."""
        token = secrets.token_urlsafe(32)
        now = utc_now()
        session = WebSession(user, secrets.token_urlsafe(32), now + ttl)
        with self._tx() as s:
            s.execute(delete(_Session).where(_Session.expires < now))
            s.add(
                _Session(
                    token_hash=_token_hash(token),
                    username=user.username,
                    csrf_token=session.csrf_token,
                    created=now,
                    expires=session.expires,
                )
            )
        return token, session

    def session(self, token: str | None) -> WebSession | None:
        if not token or len(token) > 128:
            return None
        with self._tx() as s:
            row = s.get(_Session, _token_hash(token))
            if row is None or row.expires <= utc_now():
                return None
            user = s.get(_User, row.username)
            if user is None or not user.active:
                return None
            return WebSession(_user(user), row.csrf_token, row.expires)

    def end_session(self, token: str | None) -> None:
        if token:
            with self._tx() as s:
                s.execute(delete(_Session).where(_Session.token_hash == _token_hash(token)))

    # --- what people did to reports -------------------------------------------------------------

    def record_event(self, event: ReportEvent) -> None:
        with self._tx() as s:
            s.add(
                _Event(
                    report_id=event.report_id,
                    version_id=event.version_id,
                    username=event.username,
                    action=event.action,
                    at=event.at,
                    detail=event.detail,
                    draft_text=event.draft_text,
                    signed_text=event.signed_text,
                    diff=event.diff,
                    ehr_status=event.ehr_status,
                )
            )

    def set_ehr_status(self, report_id: str, version_id: int, status: str) -> None:
        with self._tx() as s:
            for row in s.scalars(
                select(_Event).where(
                    _Event.report_id == report_id,
                    _Event.version_id == version_id,
                    _Event.action.in_(("signed", "amended")),
                )
            ):
                row.ehr_status = status

    def events(self, report_id: str) -> list[ReportEvent]:
        """Every recorded change of a report, oldest first."""
        with self._tx() as s:
            names = {u.username: u.display_name for u in s.scalars(select(_User))}
            rows = s.scalars(select(_Event).where(_Event.report_id == report_id).order_by(_Event.pk))
            return [
                ReportEvent(
                    r.report_id,
                    r.version_id,
                    r.username,
                    names.get(r.username, r.username),
                    r.action,
                    r.at,
                    r.detail,
                    r.draft_text,
                    r.signed_text,
                    r.diff,
                    r.ehr_status,
                )
                for r in rows
            ]

    def record_feedback(self, record: FeedbackRecord) -> None:
        with self._tx() as s:
            s.add(
                _Feedback(
                    report_id=record.report_id,
                    track_id=record.track_id,
                    label=record.label,
                    decision=record.decision,
                    username=record.username,
                    reason=record.reason,
                    at=record.at,
                )
            )

    def feedback(self, report_id: str) -> dict[str, FeedbackRecord]:
        """The latest verdict per finding (track id) of a report."""
        with self._tx() as s:
            rows = s.scalars(select(_Feedback).where(_Feedback.report_id == report_id).order_by(_Feedback.pk))
            return {
                r.track_id: FeedbackRecord(
                    r.report_id, r.track_id, r.label, r.decision, r.username, r.reason, r.at
                )
                for r in rows
            }

    def all_feedback(self) -> list[dict[str, Any]]:
        """Every verdict, for export (the model's real-use feedback)."""
        with self._tx() as s:
            return [
                {
                    "report_id": r.report_id,
                    "track_id": r.track_id,
                    "label": r.label,
                    "decision": r.decision,
                    "username": r.username,
                    "reason": r.reason,
                    "at": r.at.isoformat(),
                }
                for r in s.scalars(select(_Feedback).order_by(_Feedback.pk))
            ]
