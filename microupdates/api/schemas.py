"""Request and response bodies of the operator API."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field, field_validator

from microupdates.protocol.recipe import NAME_PATTERN, DeviceTimeouts, Recipe, TargetSelection


def assume_utc(value: datetime) -> datetime:
    """Mark a naive datetime as UTC: the database stores UTC, and SQLite returns it without a zone."""

    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


# A time in a response, always with its zone, so it is a valid RFC 3339 date-time.
UtcDatetime = Annotated[datetime, AfterValidator(assume_utc)]


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
    created_at: UtcDatetime
    last_seen_at: UtcDatetime | None
    agent_version: str | None


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
    created_at: UtcDatetime
    recipe: dict[str, Any]


class DeploymentCreate(BaseModel):
    update_id: str
    targets: TargetSelection | None = Field(
        default=None, description="Devices and groups; the recipe's targets when omitted."
    )
    timeouts: DeviceTimeouts | None = Field(
        default=None, description="Check-in deadline and heartbeat timeout; the recipe's when omitted."
    )


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
    created_at: UtcDatetime
    started_at: UtcDatetime | None
    finished_at: UtcDatetime | None
    error: str | None = None
    abort_requested: bool = False


class DeploymentDevicePublic(BaseModel):
    device_id: str
    status: str
    stage: str | None = Field(description="The current stage, or the stage that failed.")
    error: str | None
    rollback_error: str | None = Field(description="Which rollback step failed and why.")
    abort_requested: bool
    started_at: UtcDatetime | None
    finished_at: UtcDatetime | None


class DeploymentDetail(DeploymentSummary):
    workflow_id: str
    targets: TargetSelection
    devices: list[DeploymentDevicePublic]


class StageResultPublic(BaseModel):
    stage: str
    state: str
    status: str | None
    exit_code: int | None
    duration_seconds: float | None
    error: str | None
    queued_at: UtcDatetime
    picked_up_at: UtcDatetime | None
    reported_at: UtcDatetime | None
    steps: list[dict[str, Any]]


class DeviceResultPublic(DeploymentDevicePublic):
    deployment_id: str
    stages: list[StageResultPublic]
