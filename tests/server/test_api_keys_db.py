"""API keys in the database layer, on a SQLite file: lookup, revocation and the last admin key."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from microupdates.db import api_keys as api_key_store
from microupdates.db.session import Database
from microupdates.errors import ConflictError
from microupdates.roles import Role


@pytest.fixture
def database(tmp_path: Path) -> Iterator[Database]:
    opened = Database(f"sqlite:///{tmp_path / 'keys.db'}")
    opened.create_schema()
    yield opened
    opened.dispose()


def test_find_api_key_by_key(database):
    with database.session() as session:
        row, key = api_key_store.create_api_key(session, "ops", Role.DEPLOYER)

    with database.session() as session:
        found = api_key_store.find_api_key(session, key)
        missing = api_key_store.find_api_key(session, key + "x")

    assert found is not None
    assert found.id == row.id
    assert missing is None


def test_revoke_last_admin_key_rejected(database):
    with database.session() as session:
        row, _ = api_key_store.create_api_key(session, "only-admin", Role.ADMIN)
        api_key_store.create_api_key(session, "reader", Role.READ_ONLY)

    with pytest.raises(ConflictError, match="is the last active admin key; create another admin key first"):
        with database.session() as session:
            api_key_store.revoke_api_key(session, row.id, keep_an_admin=True)

    with database.session() as session:
        revoked = api_key_store.revoke_api_key(session, row.id, keep_an_admin=False)
    assert revoked.revoked_at is not None


def test_revoke_admin_key_allowed_with_another_admin(database):
    with database.session() as session:
        first, _ = api_key_store.create_api_key(session, "admin-a", Role.ADMIN)
        api_key_store.create_api_key(session, "admin-b", Role.ADMIN)

    with database.session() as session:
        revoked = api_key_store.revoke_api_key(session, first.id, keep_an_admin=True)

    assert revoked.revoked_at is not None


def test_mark_api_key_used_writes_once_a_minute(database):
    with database.session() as session:
        row, _ = api_key_store.create_api_key(session, "poller", Role.READ_ONLY)
        api_key_store.mark_api_key_used(row)
        first = row.last_used_at
        api_key_store.mark_api_key_used(row)

    assert first is not None
    assert row.last_used_at == first
