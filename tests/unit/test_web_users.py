"""Accounts of the web pages: password hashing, sessions, CSRF tokens, roles and sites (``service.users``)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from core.errors import InputError
from service.users import (
    Role,
    User,
    UserExistsError,
    UserStore,
    csrf_matches,
    hash_password,
    login_csrf_token,
    verify_password,
)

PASSWORD = "correct-horse-battery"


@pytest.fixture
def users(tmp_path: Path) -> UserStore:
    return UserStore(f"sqlite:///{tmp_path / 'users.db'}")


def test_passwords_are_stored_as_salted_argon2id_hashes() -> None:
    first, second = hash_password(PASSWORD), hash_password(PASSWORD)
    assert first.startswith("$argon2id$") and PASSWORD not in first
    assert first != second  # a fresh salt each time
    assert verify_password(first, PASSWORD) and verify_password(second, PASSWORD)
    assert not verify_password(first, PASSWORD + "x")
    assert not verify_password("not-a-hash", PASSWORD)
    with pytest.raises(InputError, match="at least"):
        hash_password("short")


def test_authenticate_accepts_the_right_password_only(users: UserStore) -> None:
    users.add_user("alice", PASSWORD, role="radiologist", sites=["north"], display_name="Dr Alice")
    user = users.authenticate("alice", PASSWORD)
    assert user == User("alice", "Dr Alice", Role.RADIOLOGIST, ("north",))
    assert users.authenticate("alice", "wrong-password-1") is None
    assert users.authenticate("nobody", PASSWORD) is None
    with pytest.raises(UserExistsError):
        users.add_user("alice", PASSWORD, role="clinician", sites=["north"])
    with pytest.raises(InputError, match="role"):
        users.add_user("bob", PASSWORD, role="nurse", sites=["north"])
    with pytest.raises(InputError, match="site"):
        users.add_user("bob", PASSWORD, role="clinician", sites=[])


def test_sessions_expire_end_and_end_with_a_new_password(users: UserStore) -> None:
    alice = users.add_user("alice", PASSWORD, role="radiologist", sites=["north"])
    token, session = users.start_session(alice, dt.timedelta(hours=1))
    found = users.session(token)
    assert found is not None and found.user == alice and found.csrf_token == session.csrf_token
    assert users.session(token + "x") is None and users.session(None) is None
    expired, _ = users.start_session(alice, dt.timedelta(seconds=-1))
    assert users.session(expired) is None
    users.end_session(token)
    assert users.session(token) is None
    again, _ = users.start_session(alice, dt.timedelta(hours=1))
    users.set_password("alice", "another-long-password")
    assert users.session(again) is None
    assert users.authenticate("alice", "another-long-password") is not None


def test_csrf_tokens_compare_exactly() -> None:
    assert csrf_matches("abc", "abc")
    assert not csrf_matches("abc", "abd")
    assert not csrf_matches("abc", None) and not csrf_matches(None, "abc") and not csrf_matches("", "")
    key = b"k" * 32
    token = login_csrf_token(key, "nonce-1")
    assert token == login_csrf_token(key, "nonce-1")
    assert token != login_csrf_token(key, "nonce-2") and token != login_csrf_token(b"x" * 32, "nonce-1")


def test_only_radiologists_sign_and_users_read_their_sites_only() -> None:
    rad = User("r", "R", Role.RADIOLOGIST, ("north",))
    clin = User("c", "C", Role.CLINICIAN, ("north", "south"))
    admin = User("a", "A", Role.ADMIN, ("*",))
    assert rad.can_sign and not clin.can_sign and not admin.can_sign
    assert rad.can_read_site("north") and not rad.can_read_site("south") and not rad.can_read_site(None)
    assert clin.can_read_site("south")
    assert admin.can_read_site("anywhere") and admin.can_read_site(None)


def test_cli_adds_a_user_with_the_password_from_the_environment(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from workers.cli import app

    env = {"INTERVAL_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}", "INTERVAL_USER_PASSWORD": PASSWORD}
    runner = CliRunner()
    args = ["user", "add", "carol", "--role", "clinician", "--site", "north", "--site", "south"]
    result = runner.invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    assert "added carol (clinician, sites: north, south)" in result.output
    users = UserStore(env["INTERVAL_DATABASE_URL"])
    assert users.authenticate("carol", PASSWORD) == User("carol", "carol", Role.CLINICIAN, ("north", "south"))
    again = runner.invoke(app, args, env=env)
    assert again.exit_code == 2 and "already exists" in again.output
    bad = runner.invoke(app, ["user", "add", "dave", "--role", "nurse", "--site", "north"], env=env)
    assert bad.exit_code == 2 and "role must be one of" in bad.output
    users.close()
