"""Request and response bodies of the operator API."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field, field_validator, model_validator

from microupdates.protocol.recipe import (
    MAX_CHECK_IN_DEADLINE_SECONDS,
    NAME_PATTERN,
    DeviceTimeouts,
    Recipe,
    StageRetries,
    TargetSelection,
)
from microupdates.roles import Role
from microupdates.rollout import RolloutOptions

DURATION_PATTERN = re.compile(r"^([1-9][0-9]{0,7})([smhd])\Z")
DURATION_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


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
    token_revoked_at: UtcDatetime | None = Field(
        default=None, description="When the device's token was revoked; null while it has a valid token."
    )
    facts: dict[str, Any] | None = Field(
        default=None,
        description="What the agent reported at its latest check-in: package_managers, python_version, "
        "architecture, os_id, free_disk_bytes. Null until the agent sends facts.",
    )
    facts_reported_at: UtcDatetime | None = None


class EnrolmentKeyCreate(BaseModel):
    group: str
    tags: list[str] = Field(default_factory=list, description="Tags every device enrolled with the key gets.")
    max_uses: int | None = Field(default=None, ge=1, description="How many devices may enrol; null for no limit.")
    expires_in_seconds: int | None = Field(
        default=None, ge=1, le=10 * 365 * 86400, description="Seconds from now until the key expires; null for never."
    )

    @field_validator("group")
    @classmethod
    def check_group(cls, value: str) -> str:
        return check_label(value)

    @field_validator("tags")
    @classmethod
    def check_tags(cls, values: list[str]) -> list[str]:
        return [check_label(value) for value in values]


class EnrolmentKeyPublic(BaseModel):
    id: int
    group: str
    tags: list[str]
    max_uses: int | None
    use_count: int
    expires_at: UtcDatetime | None
    revoked_at: UtcDatetime | None
    created_at: UtcDatetime


class EnrolmentKeyCreated(EnrolmentKeyPublic):
    key: str = Field(description="The fleet enrolment key; shown once, only its hash is stored.")


MAX_SECRET_VALUE_BYTES = 64 * 1024


class SecretSet(BaseModel):
    # The length is checked by the route: pydantic's 422 would echo the value back.
    value: str = Field(description=f"The secret's value, 1 to {MAX_SECRET_VALUE_BYTES} bytes as UTF-8; never returned.")


class SecretPublic(BaseModel):
    name: str
    created_at: UtcDatetime
    updated_at: UtcDatetime


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


class DeploymentCreate(RolloutOptions):
    update_id: str | None = Field(default=None, description="The update to deploy; give this or source_deployment_id.")
    source_deployment_id: str | None = Field(
        default=None, description="Deploy the update of this deployment, unchanged; its timeouts apply when omitted."
    )
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

    @model_validator(mode="after")
    def check_one_source(self) -> DeploymentCreate:
        if (self.update_id is None) == (self.source_deployment_id is None):
            raise ValueError("give either update_id or source_deployment_id, not both and not neither")
        return self

    def rollout_options(self) -> RolloutOptions:
        return RolloutOptions.model_validate(self.model_dump(include=set(RolloutOptions.model_fields)))


class DeploymentRedeploy(RolloutOptions):
    """A new deployment of the same update to other targets."""

    targets: TargetSelection = Field(description="The devices, groups and tags to deploy to.")
    timeouts: DeviceTimeouts | None = Field(
        default=None, description="Check-in deadline and heartbeat timeout; the source deployment's when omitted."
    )

    def rollout_options(self) -> RolloutOptions:
        return RolloutOptions.model_validate(self.model_dump(include=set(RolloutOptions.model_fields)))


class RolloutControl(BaseModel):
    phase: int | None = Field(
        default=None, ge=1, description="Act only when this (1-based) phase is the current one."
    )


class RolloutControlPublic(BaseModel):
    deployment_id: str
    accepted: bool = Field(description="False when the request changed nothing, such as pausing a paused deployment.")
    message: str
    phase: int = Field(description="The current phase, 1-based; for a promote, the promoted phase.")
    phase_state: str
    paused: bool


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
    source_deployment_id: str | None = None
    paused: bool = False
    current_phase: int | None = Field(default=None, description="The 1-based phase being rolled out.")

    check_in_deadline_at: UtcDatetime | None = Field(
        default=None, description="Devices that have not checked in by then end timed_out."
    )


class PhasePublic(BaseModel):
    number: int = Field(description="1-based position in the plan.")
    name: str
    selects: str = Field(description="How the phase chose its devices from the frozen targets.")
    min_success_rate: float
    soak_seconds: int
    state: str
    device_count: int
    device_status_counts: dict[str, int]
    gate: str | None = Field(description="The success rate seen when the phase's devices finished, and the verdict.")
    soak_until: str | None
    promoted: bool


class DeploymentDevicePublic(BaseModel):
    device_id: str
    phase: int | None = Field(default=None, description="The 1-based rollout phase of the device.")
    status: str
    stage: str | None = Field(description="The current stage, or the stage that failed.")
    error: str | None
    rollback_error: str | None = Field(description="Which rollback step failed and why.")
    stage_attempts: dict[str, int] = Field(
        default_factory=dict, description="Stages that ran more than once after transient failures, with their attempts."
    )
    abort_requested: bool
    started_at: UtcDatetime | None
    finished_at: UtcDatetime | None


class DeploymentDetail(DeploymentSummary):
    workflow_id: str
    targets: TargetSelection
    rollout: RolloutOptions
    phases: list[PhasePublic]
    follow_up_ids: list[str] = Field(description="Deployments that redeployed this one's update, oldest first.")
    devices: list[DeploymentDevicePublic]


class StageResultPublic(BaseModel):
    stage: str
    attempt: int = Field(default=1, description="1 for the stage's first run, 2 for its first retry, ...")
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


class ApiKeyCreate(BaseModel):
    name: str = Field(description="A label for the key's holder, such as `ci` or `alice`; names need not be unique.")
    role: Role

    @field_validator("name")
    @classmethod
    def check_name(cls, value: str) -> str:
        return check_label(value)


class ApiKeyPublic(BaseModel):
    id: str
    name: str
    role: Role
    created_at: UtcDatetime
    last_used_at: UtcDatetime | None = Field(description="Written at most once a minute, so up to a minute old.")
    revoked_at: UtcDatetime | None


class ApiKeyCreated(ApiKeyPublic):
    key: str = Field(description="The API key; shown once, only its hash is stored.")
