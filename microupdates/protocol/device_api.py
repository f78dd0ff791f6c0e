"""Messages between the device agent and the API's device endpoints.

Flow: the agent posts a check-in and the API holds it open (long polling)
until a stage job is queued for the device or the wait ends. While a job runs
the agent posts progress reports, which keep the stage alive on the server.
At the end it posts the result once; a retried post of the same result is
accepted and changes nothing.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Dict, List, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from microupdates.protocol.recipe import CommandStage, Dependencies, FileEntry

DEVICE_API_PREFIX = "/device/v1"

# Stages of an update, in the order they run.
UPDATE_STAGES = ("before", "files", "dependencies", "after")
# Compensations, run in this order after a failed or aborted update. Each undoes
# what the agent recorded for the deployment (under its state directory) and
# succeeds without doing anything when there is nothing left to undo.
REVERT_PACKAGES_STAGE = "revert_packages"
REVERT_FILES_STAGE = "revert_files"
ROLLBACK_COMMAND_STAGE = "rollback_command"
REBOOT_STAGE = "reboot"
COMPENSATION_STAGES = (REVERT_PACKAGES_STAGE, REVERT_FILES_STAGE, ROLLBACK_COMMAND_STAGE, REBOOT_STAGE)

# Values of StageReport.status.
STAGE_SUCCEEDED = "succeeded"
STAGE_FAILED = "failed"
STAGE_INTERRUPTED = "interrupted"
STAGE_ABORTED = "aborted"
# Names in DeviceFacts.package_managers: apt-get and dpkg, `python -m pip`,
# `python3 -m pip`, npm, and python3 itself (it creates virtualenvs).
PACKAGE_MANAGER_FACTS = ("apt", "pip", "pip3", "npm", "python3")
MAX_LONG_POLL_SECONDS = 60
DEFAULT_LONG_POLL_SECONDS = 25
MAX_REPORTED_OUTPUT_BYTES = 64 * 1024


class WireModel(BaseModel):
    """Base for protocol messages: unknown fields are ignored so either side can add fields first."""

    model_config = ConfigDict(extra="ignore")


class EnrolRequest(WireModel):
    enrolment_key: str
    device_name: str
    tags: List[str] = Field(default_factory=list)


class EnrolResponse(WireModel):
    device_id: str
    device_token: str
    groups: List[str]
    # The server's Ed25519 job-signing key, base64 of the 32 raw bytes; the agent pins it.
    server_public_key: Optional[str] = None


class DeviceIdentity(WireModel):
    """The device's id and the server's job-signing key, for agents configured with a token instead of enrolling."""

    device_id: str
    server_public_key: str


class TokenRotationResponse(WireModel):
    """A new device token. The old one stays valid until a request first uses the new one."""

    device_token: str


class DeviceFacts(WireModel):
    """What the agent found on the device: the package managers a recipe may need, and a few details.

    `package_managers` lists the names of PACKAGE_MANAGER_FACTS that work
    with the PATH that stages run with.
    """

    package_managers: List[Annotated[str, Field(max_length=32)]] = Field(default_factory=list, max_length=16)
    python_version: Optional[str] = Field(default=None, max_length=64)
    architecture: Optional[str] = Field(default=None, max_length=64)
    os_id: Optional[str] = Field(default=None, max_length=64)
    free_disk_bytes: Optional[int] = Field(default=None, ge=0)


class CheckInRequest(WireModel):
    """`facts` is sent by agents that collect them; a device that never sent any is treated as compatible."""

    agent_version: str
    wait_seconds: int = Field(default=DEFAULT_LONG_POLL_SECONDS, ge=0, le=MAX_LONG_POLL_SECONDS)
    facts: Optional[DeviceFacts] = None


class StageJob(WireModel):
    """One stage of one device's update, as the device runs it."""

    job_id: int
    deployment_id: str
    device_id: str
    update_version: str
    stage: str
    progress_interval_seconds: int
    command: Optional[CommandStage] = None
    files: List[FileEntry] = Field(default_factory=list)
    dependencies: Optional[Dependencies] = None
    # Per-device counter of handed-out jobs, starting at 1; the agent rejects a job whose
    # sequence is not greater than the last one it accepted (a replay).
    sequence: int = 0
    # When the API handed the job out, ISO 8601 in UTC.
    issued_at: Optional[str] = None
    # Values of the secrets the command references as ${secret:NAME}, by name.
    # The agent passes them to the command in its environment, masks them in
    # everything it reports, and never writes them to its disk.
    secrets: Dict[str, str] = Field(default_factory=dict)


class CheckInResponse(WireModel):
    """`job_signature` is the base64 Ed25519 signature of canonical_job_bytes(job), made by the server's key."""

    job: Optional[StageJob] = None
    job_signature: Optional[str] = None
    # The `job` object exactly as received, fields unknown to this version included,
    # because the signature covers every field the server sent. Set by the agent's client.
    _received_job: Optional[Dict[str, Any]] = PrivateAttr(default=None)

    @property
    def received_job(self) -> Optional[Dict[str, Any]]:
        return self._received_job

    def keep_received_job(self, job: Optional[Dict[str, Any]]) -> None:
        self._received_job = job


def canonical_job_bytes(job: Dict[str, Any]) -> bytes:
    """Serialise a job's JSON object for signing: sorted keys, no whitespace, UTF-8, non-ASCII unescaped."""

    return json.dumps(job, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


class ProgressReport(WireModel):
    """Sent while a stage runs. The API keeps it open up to `wait_seconds` and responds at once on abort."""

    output_tail: str = ""
    wait_seconds: int = Field(default=0, ge=0, le=MAX_LONG_POLL_SECONDS)


class ProgressResponse(WireModel):
    """`abort` is true when the agent must stop the running stage."""

    abort: bool = False


class StepResult(WireModel):
    """One command or file operation inside a stage."""

    name: str
    exit_code: Optional[int] = None
    duration_seconds: float = 0.0
    output: str = ""
    output_truncated: bool = False
    error: Optional[str] = None
    interpreter: Optional[str] = None
    # The step failed for a reason that may pass by itself (see StageReport.transient).
    transient: bool = False


class StageReport(WireModel):
    """The device's result of one stage.

    `status` is `succeeded`, `failed`, `interrupted` (the agent restarted in
    the middle of the stage) or `aborted` (the server asked the agent to stop
    it). `error` states in one sentence why it did not succeed. `transient`
    is true when the failure may pass by itself (a download that failed, a
    dpkg lock held too long, a restart of the agent), so the server may run
    the stage again.
    """

    status: Literal["succeeded", "failed", "interrupted", "aborted"]
    transient: bool = False
    exit_code: Optional[int] = Field(default=None, ge=-(2**31), le=2**31 - 1)
    duration_seconds: float = Field(default=0.0, ge=0)
    error: Optional[str] = None
    steps: List[StepResult] = Field(default_factory=list)


class StageReportResponse(WireModel):
    accepted: bool
    detail: str = ""
