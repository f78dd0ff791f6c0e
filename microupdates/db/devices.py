"""Device registry: registration, tokens, enrolment keys, groups and tags."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from microupdates.db.models import Device, DeviceGroup, DeviceTag, EnrolmentKey, utc_now
from microupdates.errors import ConflictError, NotFoundError

LAST_SEEN_WRITE_INTERVAL = timedelta(seconds=60)


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
    facts: dict[str, Any] | None = None
    facts_reported_at: datetime | None = None


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
    return session.scalars(select(Device).where(Device.token_hash == hash_secret(token))).first()


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
    last_seen = device.last_seen_at
    if last_seen is not None and last_seen.tzinfo is None:
        last_seen = last_seen.replace(tzinfo=now.tzinfo)
    if last_seen is None or now - last_seen > LAST_SEEN_WRITE_INTERVAL or device.agent_version != agent_version:
        device.last_seen_at = now
        device.agent_version = agent_version


def stored_package_managers(session: Session, device_id: str) -> list[str] | None:
    """Return the package managers the device last reported, or None when it never reported facts."""

    device = session.get(Device, device_id)
    if device is None or device.facts is None:
        return None
    return list(device.facts.get("package_managers") or [])


def load_device_view(session: Session, device_id: str) -> DeviceView:
    device = session.get(Device, device_id)
    if device is None:
        raise NotFoundError(f"Device {device_id!r} not found.")
    return _device_view(session, device)


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
        facts=device.facts,
        facts_reported_at=device.facts_reported_at,
    )


def create_enrolment_key(session: Session, group: str) -> str:
    key = new_secret()
    session.add(EnrolmentKey(key_hash=hash_secret(key), group_name=group))
    return key


def enrol_device(session: Session, enrolment_key: str, device_id: str, tags: list[str]) -> tuple[str, list[str]]:
    """Register a device that presents a fleet enrolment key; return its token and groups."""

    key = session.scalars(select(EnrolmentKey).where(EnrolmentKey.key_hash == hash_secret(enrolment_key))).first()
    if key is None:
        raise NotFoundError("The enrolment key is not valid.")
    token = register_device(session, device_id, [key.group_name], tags)
    return token, [key.group_name]
