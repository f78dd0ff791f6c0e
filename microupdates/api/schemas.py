"""Request and response bodies of the operator API."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import Any

from pydantic import BaseModel, Field, field_validator

from microupdates.protocol.recipe import (
    MAX_CHECK_IN_DEADLINE_SECONDS,
    NAME_PATTERN,
    DeviceTimeouts,
    Recipe,
    StageRetries,
    TargetSelection,
)

DURATION_PATTERN = re.compile(r"^([1-9][0-9]{0,7})([smhd])\Z")
DURATION_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def check_label(value: str) -> str:
    if not NAME_PATTERN.match(value):
        raise ValueError(
            f"{value!r} is not a valid name: use 1-63 lower-case letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


class DeviceCreate(BaseModel):
    name: str
    groups: list[str] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def check_name(cls, value: str) -> str:
        return check_label(value)

    @field_validator("groups", "tags")
    @classmethod
    def check_labels(cls, values: list[str]) -> list[str]:
        return [check_label(value) for value in values]


class DeviceLabelsUpdate(BaseModel):
    """New groups or tags of a device; a list left out stays as it is."""

    groups: list[str] | None = None
    tags: list[str] | None = None

    @field_validator("groups", "tags")
    @classmethod
    def check_labels(cls, values: list[str] | None) -> list[str] | None:
        return None if values is None else [check_label(value) for value in values]


class DeviceCreated(BaseModel):
    id: str
    token: str = Field(description="The device's token; shown once, only its hash is stored.")


class DevicePublic(BaseModel):
    id: str
    groups: list[str]
    tags: list[str]
    created_at: datetime
    last_seen_at: datetime | None
    agent_version: str | None
    facts: dict[str, Any] | None = Field(
        default=None,
        description="What the agent reported at its latest check-in: package_managers, python_version, "
        "architecture, os_id, free_disk_bytes. Null until the agent sends facts.",
    )
    facts_reported_at: datetime | None = None


class EnrolmentKeyCreate(BaseModel):
    group: str

    @field_validator("group")
    @classmethod
    def check_group(cls, value: str) -> str:
        return check_label(value)


class EnrolmentKeyCreated(BaseModel):
    key: str = Field(description="The fleet enrolment key; shown once.")
    group: str


class ArtifactPublic(BaseModel):
    sha256: str
    size_bytes: int


class UpdateCreate(BaseModel):
    recipe: Recipe


class UpdatePublic(BaseModel):
    id: str
    version: str
    comment: str
    created_at: datetime
    recipe: dict[str, Any]


class DeploymentCreate(BaseModel):
    update_id: str
    targets: TargetSelection | None = Field(
        default=None, description="Devices and groups; the recipe's targets when omitted."
    )
    timeouts: DeviceTimeouts | None = Field(
        default=None, description="Check-in deadline and heartbeat timeout; the recipe's when omitted."
    )
    retries: StageRetries | None = Field(
        default=None, description="Attempts of a stage that fails transiently, and the backoff; the recipe's when omitted."
    )
    check_in_deadline: datetime | None = Field(
        default=None,
        description="Devices that have not checked in by then end timed_out. A date-time with a time zone "
        "(2026-05-01T18:00:00Z), or a duration from now: a number with s, m, h or d (90m, 2h).",
    )

    @field_validator("check_in_deadline", mode="before")
    @classmethod
    def parse_check_in_deadline(cls, value: Any) -> Any:
        if isinstance(value, str):
            match = DURATION_PATTERN.match(value.strip())
            if match is not None:
                seconds = int(match.group(1)) * DURATION_UNIT_SECONDS[match.group(2)]
                return datetime.now(timezone.utc) + timedelta(seconds=seconds)
        return value

    @field_validator("check_in_deadline")
    @classmethod
    def check_check_in_deadline(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(
                f"{value.isoformat()} has no time zone; add one (Z or +02:00) or give a duration such as 2h"
            )
        now = datetime.now(timezone.utc)
        if value <= now:
            raise ValueError(f"{value.isoformat()} is in the past; give a later time or a duration such as 2h")
        if value - now > timedelta(seconds=MAX_CHECK_IN_DEADLINE_SECONDS):
            raise ValueError(f"{value.isoformat()} is more than {MAX_CHECK_IN_DEADLINE_SECONDS // 86400} days away")
        return value.astimezone(timezone.utc)


class DeploymentCreated(BaseModel):
    id: str
    workflow_id: str
    status: str


class AbortResult(BaseModel):
    deployment_id: str
    device_id: str | None
    accepted: bool = Field(description="False when the deployment or device had already ended or been aborted.")
    jobs_ended: int = Field(description="Queued jobs ended at once, without contacting their devices.")


class DeploymentSummary(BaseModel):
    id: str
    update_id: str
    update_version: str
    status: str
    device_count: int
    device_status_counts: dict[str, int]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None = None
    abort_requested: bool = False
    check_in_deadline_at: datetime | None = Field(
        default=None, description="Devices that have not checked in by then end timed_out."
    )


class DeploymentDevicePublic(BaseModel):
    device_id: str
    status: str
    stage: str | None = Field(description="The current stage, or the stage that failed.")
    error: str | None
    rollback_error: str | None = Field(description="Which rollback step failed and why.")
    stage_attempts: dict[str, int] = Field(
        default_factory=dict, description="Stages that ran more than once after transient failures, with their attempts."
    )
    abort_requested: bool
    started_at: datetime | None
    finished_at: datetime | None


class DeploymentDetail(DeploymentSummary):
    workflow_id: str
    targets: TargetSelection
    devices: list[DeploymentDevicePublic]


class StageResultPublic(BaseModel):
    stage: str
    attempt: int = Field(default=1, description="1 for the stage's first run, 2 for its first retry, ...")
    state: str
    status: str | None
    exit_code: int | None
    duration_seconds: float | None
    error: str | None
    queued_at: datetime
    picked_up_at: datetime | None
    reported_at: datetime | None
    steps: list[dict[str, Any]]


class DeviceResultPublic(DeploymentDevicePublic):
    deployment_id: str
    stages: list[StageResultPublic]
