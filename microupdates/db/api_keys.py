"""Operator API keys: creation, lookup by key, listing and revocation.

A key is shown once, when it is created; the database stores its SHA-256,
as it does for device tokens. Keys are 256-bit random values, so a plain
SHA-256 is enough and a slow password hash would only cost time per request.
"""

from __future__ import annotations

import secrets
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from microupdates.db.deployments import new_id
from microupdates.db.devices import hash_secret
from microupdates.db.models import ApiKey, utc_now
from microupdates.errors import ConflictError, NotFoundError
from microupdates.roles import Role

API_KEY_PREFIX = "muk_"
API_KEY_ID_PREFIX = "key"
LAST_USED_WRITE_INTERVAL = timedelta(seconds=60)


def new_api_key() -> str:
    # The prefix distinguishes an API key from a device token ("mu_") in logs, configs and secret scanners.
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def create_api_key(session: Session, name: str, role: Role) -> tuple[ApiKey, str]:
    """Insert a key and return its row and the key itself, which is not stored."""

    key = new_api_key()
    row = ApiKey(id=new_id(API_KEY_ID_PREFIX), name=name, role=role.value, key_hash=hash_secret(key), created_at=utc_now())
    session.add(row)
    session.flush()
    return row, key


def list_api_keys(session: Session) -> list[ApiKey]:
    """Return every key, revoked ones included, oldest first."""

    return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)))


def find_api_key(session: Session, key: str) -> ApiKey | None:
    """Return the row of a presented key, revoked or not, or None for an unknown key."""

    return session.scalars(select(ApiKey).where(ApiKey.key_hash == hash_secret(key))).first()


def mark_api_key_used(row: ApiKey) -> None:
    """Record a use, writing at most once a minute per key so that polling clients cost few writes."""

    now = utc_now()
    last_used = row.last_used_at
    if last_used is not None and last_used.tzinfo is None:
        last_used = last_used.replace(tzinfo=now.tzinfo)
    if last_used is None or now - last_used > LAST_USED_WRITE_INTERVAL:
        row.last_used_at = now


def revoke_api_key(session: Session, key_id: str, keep_an_admin: bool) -> ApiKey:
    """Revoke a key; revoking a revoked key changes nothing.

    With `keep_an_admin`, the last active admin key cannot be revoked, so the
    API cannot lock every operator out.
    """

    row = session.get(ApiKey, key_id)
    if row is None:
        raise NotFoundError(f"API key {key_id!r} not found; listing the API keys shows their ids.")
    if row.revoked_at is not None:
        return row
    if keep_an_admin and row.role == Role.ADMIN.value and count_active_admin_keys(session) <= 1:
        raise ConflictError(
            f"API key {key_id!r} is the last active admin key; create another admin key first, "
            "or revoke it on the server with `microupdates-api api-keys revoke`."
        )
    row.revoked_at = utc_now()
    return row


def count_active_admin_keys(session: Session) -> int:
    query = select(ApiKey.id).where(ApiKey.role == Role.ADMIN.value, ApiKey.revoked_at.is_(None))
    return len(session.scalars(query).all())
