"""Device registry: registration, tokens, enrolment keys, groups and tags."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from microupdates.db.models import Device, DeviceGroup, DeviceTag, EnrolmentKey, is_stored_id, utc_now
from microupdates.errors import ConflictError, EnrolmentKeyRejectedError, NotFoundError

# A check-in writes last_seen_at only when the stored time is older than this. At the agent's
# longest poll (60 s) a shorter interval would turn every idle check-in into a write.
LAST_SEEN_WRITE_INTERVAL = timedelta(minutes=5)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def new_secret() -> str:
    # The prefix keeps a token from starting with "-", which command lines would read as an option,
    # and lets secret scanners recognise it.
    return "mu_" + secrets.token_urlsafe(32)


@dataclass
class DeviceView:
    id: str
    groups: list[str]
    tags: list[str]
    created_at: datetime
    last_seen_at: datetime | None
    agent_version: str | None
    token_revoked_at: datetime | None = None

    facts: dict[str, Any] | None = None
    facts_reported_at: datetime | None = None


@dataclass
class EnrolmentKeyView:
    id: int
    group: str
    tags: list[str]
    max_uses: int | None
    use_count: int
    expires_at: datetime | None
    revoked_at: datetime | None
    created_at: datetime


def register_device(session: Session, device_id: str, groups: list[str], tags: list[str]) -> str:
    """Insert a device and return its new token (only its hash is stored)."""

    if session.get(Device, device_id) is not None:
        raise ConflictError(f"A device named {device_id!r} already exists; choose another name or remove it first.")

    token = new_secret()
    session.add(Device(id=device_id, token_hash=hash_secret(token)))
    session.flush()
    set_device_labels(session, device_id, groups, tags)
    return token


def set_device_labels(session: Session, device_id: str, groups: list[str], tags: list[str]) -> None:
    session.execute(delete(DeviceGroup).where(DeviceGroup.device_id == device_id))
    session.execute(delete(DeviceTag).where(DeviceTag.device_id == device_id))
    session.add_all(DeviceGroup(device_id=device_id, group_name=group) for group in sorted(set(groups)))
    session.add_all(DeviceTag(device_id=device_id, tag=tag) for tag in sorted(set(tags)))


def remove_device(session: Session, device_id: str, active_deployments: list[str]) -> None:
    """Remove a device, unless it is still part of a running deployment (listed in `active_deployments`)."""

    device = session.get(Device, device_id)
    if device is None:
        raise NotFoundError(f"Device {device_id!r} not found.")
    if active_deployments:
        raise ConflictError(
            f"Device {device_id!r} is still updating in deployment(s) {', '.join(active_deployments)}; "
            "abort it there first (POST /api/v1/deployments/ID/devices/DEVICE/abort), then remove it."
        )
    session.execute(delete(DeviceGroup).where(DeviceGroup.device_id == device_id))
    session.execute(delete(DeviceTag).where(DeviceTag.device_id == device_id))
    session.delete(device)


def authenticate_device(session: Session, token: str) -> Device | None:
    """Return the device whose current or pending token this is; a pending token becomes current on first use.

    A revoked token, and the token a device rotated away from once its new
    one was used, match no row, just like an unknown token.
    """

    token_hash = hash_secret(token)
    device = session.scalars(
        select(Device).where(or_(Device.token_hash == token_hash, Device.pending_token_hash == token_hash))
    ).first()
    if device is not None and device.pending_token_hash == token_hash:
        device.token_hash = token_hash
        device.pending_token_hash = None
        # Callers may expunge the row, which would drop an unflushed change.
        session.flush()
    return device


def rotate_device_token(session: Session, device_id: str) -> str:
    """Give a device a pending new token; its current token stays valid until the new one is first used.

    Rotating again before the new token was used replaces the pending one, so
    an agent that lost the response can simply ask again.
    """

    device = _load_device(session, device_id)
    token = new_secret()
    device.pending_token_hash = hash_secret(token)
    return token


def issue_device_token(session: Session, device_id: str) -> str:
    """Replace a device's tokens, current and pending, with a new one; the old ones stop working at once."""

    device = _load_device(session, device_id)
    token = new_secret()
    device.token_hash = hash_secret(token)
    device.pending_token_hash = None
    device.token_revoked_at = None
    return token


def revoke_device_token(session: Session, device_id: str) -> None:
    """Invalidate a device's tokens until an operator issues a new one."""

    device = _load_device(session, device_id)
    device.token_hash = None
    device.pending_token_hash = None
    device.token_revoked_at = utc_now()


def _load_device(session: Session, device_id: str) -> Device:
    device = session.get(Device, device_id)
    if device is None:
        raise NotFoundError(f"Device {device_id!r} not found.")
    return device


def mark_device_seen(
    session: Session, device: Device, agent_version: str, facts: dict[str, Any] | None = None
) -> None:
    """Record a check-in, writing at most once a minute per device so an idle fleet costs few writes.

    Facts are written only when they differ from the stored ones.
    """

    now = utc_now()
    if facts is not None and facts != device.facts:
        device.facts = facts
        device.facts_reported_at = now
    if last_seen_write_due(device, agent_version):
        device.last_seen_at = now
        device.agent_version = agent_version


def device_seen_write_due(device: Device, agent_version: str, facts: dict[str, Any] | None = None) -> bool:
    """Return whether a check-in must update the device's last-seen time, agent version or facts."""

    return (facts is not None and facts != device.facts) or last_seen_write_due(device, agent_version)


def last_seen_write_due(device: Device, agent_version: str) -> bool:
    now = utc_now()
    last_seen = device.last_seen_at
    if last_seen is not None and last_seen.tzinfo is None:
        last_seen = last_seen.replace(tzinfo=now.tzinfo)
    return last_seen is None or now - last_seen > LAST_SEEN_WRITE_INTERVAL or device.agent_version != agent_version


def stored_package_managers(session: Session, device_id: str) -> list[str] | None:
    """Return the package managers the device last reported, or None when it never reported facts."""

    device = session.get(Device, device_id)
    if device is None or device.facts is None:
        return None
    return list(device.facts.get("package_managers") or [])


def load_device_view(session: Session, device_id: str) -> DeviceView:
    return _device_view(session, _load_device(session, device_id))


def list_device_views(session: Session, limit: int, after: str | None) -> list[DeviceView]:
    query = select(Device).order_by(Device.id).limit(limit)
    if after:
        query = query.where(Device.id > after)
    return [_device_view(session, device) for device in session.scalars(query)]


def _device_view(session: Session, device: Device) -> DeviceView:
    groups = session.scalars(select(DeviceGroup.group_name).where(DeviceGroup.device_id == device.id)).all()
    tags = session.scalars(select(DeviceTag.tag).where(DeviceTag.device_id == device.id)).all()
    return DeviceView(
        id=device.id,
        groups=list(groups),
        tags=list(tags),
        created_at=device.created_at,
        last_seen_at=device.last_seen_at,
        agent_version=device.agent_version,
        token_revoked_at=device.token_revoked_at,
        facts=device.facts,
        facts_reported_at=device.facts_reported_at,
    )


def create_enrolment_key(
    session: Session,
    group: str,
    tags: list[str] | None = None,
    max_uses: int | None = None,
    expires_at: datetime | None = None,
) -> tuple[str, EnrolmentKeyView]:
    """Insert a fleet enrolment key and return it (only its hash is stored) with its settings."""

    key = new_secret()
    row = EnrolmentKey(
        key_hash=hash_secret(key), group_name=group, tags=sorted(set(tags or [])), max_uses=max_uses,
        use_count=0, expires_at=expires_at,
    )
    session.add(row)
    session.flush()
    return key, _enrolment_key_view(row)


def list_enrolment_keys(session: Session) -> list[EnrolmentKeyView]:
    return [_enrolment_key_view(row) for row in session.scalars(select(EnrolmentKey).order_by(EnrolmentKey.id))]


def revoke_enrolment_key(session: Session, key_id: int) -> EnrolmentKeyView:
    """Stop a key from enrolling more devices; devices it enrolled keep their tokens."""

    row = session.get(EnrolmentKey, key_id) if is_stored_id(key_id) else None
    if row is None:
        raise NotFoundError(f"Enrolment key {key_id} not found.")
    if row.revoked_at is None:
        row.revoked_at = utc_now()
    return _enrolment_key_view(row)


def enrol_device(session: Session, enrolment_key: str, device_id: str, tags: list[str]) -> tuple[str, list[str]]:
    """Register a device that presents a fleet enrolment key; return its token and groups.

    The key's tags are added to the device's own. The use is counted with a
    conditional UPDATE, so two devices enrolling at once cannot both take
    the last use; a failed registration rolls the count back with the
    transaction.
    """

    key = session.scalars(select(EnrolmentKey).where(EnrolmentKey.key_hash == hash_secret(enrolment_key))).first()
    if key is None:
        raise EnrolmentKeyRejectedError("The enrolment key is not valid; ask the operator for a new key.", 401)
    _check_enrolment_key_usable(key)

    counted = session.execute(
        update(EnrolmentKey)
        .where(EnrolmentKey.id == key.id)
        .where(or_(EnrolmentKey.max_uses.is_(None), EnrolmentKey.use_count < EnrolmentKey.max_uses))
        .values(use_count=EnrolmentKey.use_count + 1)
        .execution_options(synchronize_session=False)
    )
    if counted.rowcount != 1:
        raise EnrolmentKeyRejectedError(_used_up_message(key.max_uses or 0), 403)

    token = register_device(session, device_id, [key.group_name], sorted(set(tags) | set(key.tags or [])))
    return token, [key.group_name]


def _check_enrolment_key_usable(key: EnrolmentKey) -> None:
    if key.revoked_at is not None:
        raise EnrolmentKeyRejectedError(
            f"The enrolment key was revoked at {_as_utc(key.revoked_at).isoformat()}; ask the operator for a new key.",
            403,
        )
    if key.expires_at is not None and _as_utc(key.expires_at) <= utc_now():
        raise EnrolmentKeyRejectedError(
            f"The enrolment key expired at {_as_utc(key.expires_at).isoformat()}; ask the operator for a new key.",
            403,
        )
    if key.max_uses is not None and key.use_count >= key.max_uses:
        raise EnrolmentKeyRejectedError(_used_up_message(key.max_uses), 403)


def _used_up_message(max_uses: int) -> str:
    return f"The enrolment key has been used {max_uses} of {max_uses} times; ask the operator for a new key."


def _as_utc(moment: datetime) -> datetime:
    # SQLite returns naive datetimes for values stored in UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def _enrolment_key_view(row: EnrolmentKey) -> EnrolmentKeyView:
    return EnrolmentKeyView(
        id=row.id,
        group=row.group_name,
        tags=list(row.tags or []),
        max_uses=row.max_uses,
        use_count=row.use_count or 0,
        expires_at=_as_utc(row.expires_at) if row.expires_at else None,
        revoked_at=_as_utc(row.revoked_at) if row.revoked_at else None,
        created_at=_as_utc(row.created_at),
    )
