"""Tables of the application database: device registry, updates, artifacts, deployments and stage jobs.

Temporal owns the orchestration. The deployment and per-device rows here are
read projections written by activities and by the device API, so listings do
not have to query Temporal.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, DateTime, ForeignKey, Index, Integer, LargeBinary, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def is_stored_id(value: int) -> bool:
    """Return whether an integer id fits the database's positive 64-bit keys.

    Larger ids exist nowhere, and looking them up would overflow the driver.
    """

    return 0 < value < 2**63


class Base(DeclarativeBase):
    pass


class Device(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(63), primary_key=True)
    # None while the token is revoked.
    token_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    # A token the device asked for by rotation; it replaces token_hash when first used.
    pending_token_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    token_revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    last_seen_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    agent_version: Mapped[str | None] = mapped_column(String(64))
    # The agent's DeviceFacts from its latest check-in; None until it sends some.
    # NOTE: create_all adds no columns to existing tables, so a database created before
    # facts, retries, check_in_deadline_at and stage_attempts existed needs them added by hand.
    facts: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    facts_reported_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class DeviceGroup(Base):
    __tablename__ = "device_groups"

    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    group_name: Mapped[str] = mapped_column(String(63), primary_key=True, index=True)


class DeviceTag(Base):
    __tablename__ = "device_tags"

    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    tag: Mapped[str] = mapped_column(String(63), primary_key=True, index=True)


class EnrolmentKey(Base):
    __tablename__ = "enrolment_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    group_name: Mapped[str] = mapped_column(String(63))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    # None means no limit.
    max_uses: Mapped[int | None] = mapped_column(Integer)
    use_count: Mapped[int] = mapped_column(Integer, default=0)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Secret(Base):
    """A value that recipes reference as ${secret:NAME}; the API sends it to devices and never returns it."""

    __tablename__ = "secrets"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    # NOTE: stored in plain text; the database's own access control is its only protection.
    value: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class ApiKey(Base):
    """An operator's API key: only the SHA-256 of the key is stored, and a revoked key stays listed."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(63))
    role: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Artifact(Base):
    __tablename__ = "artifacts"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size_bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class Update(Base):
    __tablename__ = "updates"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    version: Mapped[str] = mapped_column(String(64))
    comment: Mapped[str] = mapped_column(Text, default="")
    recipe: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now, index=True)


class Deployment(Base):
    __tablename__ = "deployments"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    update_id: Mapped[str] = mapped_column(ForeignKey("updates.id"))
    targets: Mapped[dict[str, Any]] = mapped_column(JSON)
    timeouts: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # StageRetries that override the recipe's; None keeps the recipe's.
    retries: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Devices that have not checked in by this time end timed_out, whatever their own deadline.
    check_in_deadline_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    device_count: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    abort_requested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now, index=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The deployment this one redeploys the update of, when it was created from another.
    source_deployment_id: Mapped[str | None] = mapped_column(String(32), index=True)
    # Limits, failure threshold and phases (microupdates.rollout.RolloutOptions as JSON).
    rollout: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # The workflow's phase state (RolloutProgress as JSON), written at every change.
    rollout_state: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Why the workflow stopped the rollout (failure threshold, unpromoted gate); None otherwise.
    stop_reason: Mapped[str | None] = mapped_column(Text)


class DeploymentDevice(Base):
    """One device's progress in one deployment (a read projection)."""

    __tablename__ = "deployment_devices"
    __table_args__ = (
        Index("ix_deployment_devices_status", "deployment_id", "status"),
        Index("ix_deployment_devices_phase", "deployment_id", "phase", "device_id"),
    )

    deployment_id: Mapped[str] = mapped_column(ForeignKey("deployments.id", ondelete="CASCADE"), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    stage: Mapped[str | None] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(Text)
    rollback_error: Mapped[str | None] = mapped_column(Text)
    # Attempts per stage that ran more than once after transient failures, e.g. {"files": 2}.
    stage_attempts: Mapped[dict[str, int] | None] = mapped_column(JSON)
    abort_requested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Index of the rollout phase that updates this device (0 when the deployment has no plan).
    phase: Mapped[int | None] = mapped_column(Integer)


class AbortRequest(Base):
    """An operator's abort of a whole deployment (device_id empty) or of one device in it.

    The API processes read new rows to wake the progress reports of the
    affected devices, so the abort reaches a running stage within a second.
    """

    __tablename__ = "abort_requests"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    deployment_id: Mapped[str] = mapped_column(String(32))
    device_id: Mapped[str | None] = mapped_column(String(63))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class StageJob(Base):
    """A stage waiting for, or handed to, a device.

    The worker's activity writes the row with its task token and completes
    asynchronously; the API hands the row to the device at check-in and
    completes the activity with the device's report. `state` moves from
    `queued` to `running` to `reported`, or to `expired` when the activity is
    gone (timed out or the device's update ended).
    """

    __tablename__ = "stage_jobs"
    __table_args__ = (
        UniqueConstraint("workflow_id", "activity_id", name="uq_stage_jobs_activity"),
        Index("ix_stage_jobs_device_state", "device_id", "state", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    deployment_id: Mapped[str] = mapped_column(String(32), index=True)
    device_id: Mapped[str] = mapped_column(String(63))
    stage: Mapped[str] = mapped_column(String(32))
    workflow_id: Mapped[str] = mapped_column(String(200))
    activity_id: Mapped[str] = mapped_column(String(64))
    task_token: Mapped[bytes] = mapped_column(LargeBinary)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    state: Mapped[str] = mapped_column(String(16), default="queued")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    picked_up_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    reported_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    report: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class DeviceJobSequence(Base):
    """The sequence number of the last job handed to a device; signed jobs carry the next one.

    The agent rejects a job whose sequence is not greater than the last it
    accepted, so a re-sent old job never runs twice.
    """

    __tablename__ = "device_job_sequences"

    device_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    last_sequence: Mapped[int] = mapped_column(Integer, default=0)
