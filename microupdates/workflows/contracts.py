"""Inputs and results of the workflows and activities, and the names that tie them together.

Payloads carry ids and small summaries only. Recipes, device lists and stage
output stay in the application database, so no payload grows with the fleet
and no secret of a recipe lands in a workflow history.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEPLOYMENT_WORKFLOW = "Deployment"
DEVICE_UPDATE_WORKFLOW = "DeviceUpdate"

START_DEPLOYMENT_ACTIVITY = "start_deployment"
LIST_DEPLOYMENT_DEVICES_ACTIVITY = "list_deployment_devices"
AWAIT_DEVICE_CHECK_IN_ACTIVITY = "await_device_check_in"
RUN_DEVICE_STAGE_ACTIVITY = "run_device_stage"
RECORD_DEVICE_OUTCOME_ACTIVITY = "record_device_outcome"
FINISH_DEPLOYMENT_ACTIVITY = "finish_deployment"
MARK_UNSTARTED_DEVICES_ABORTED_ACTIVITY = "mark_unstarted_devices_aborted"
REQUEST_DEPLOYMENT_ABORT_ACTIVITY = "request_deployment_abort"
RECORD_DEVICE_ROLLBACK_START_ACTIVITY = "record_device_rollback_start"
RECORD_ROLLOUT_STATE_ACTIVITY = "record_rollout_state"
STOP_DEPLOYMENT_ACTIVITY = "stop_deployment"

ABORT_SIGNAL = "abort"
# Workflow updates of the rollout plan; each returns a RolloutControlResult.
PAUSE_UPDATE = "pause"
RESUME_UPDATE = "resume"
PROMOTE_UPDATE = "promote"
# ApplicationError type of a stage or check-in that ended because the operator aborted.
ABORTED_ERROR_TYPE = "Aborted"

# Per-device statuses.
DEVICE_PENDING = "pending"
DEVICE_IN_PROGRESS = "in_progress"
DEVICE_SUCCEEDED = "succeeded"
DEVICE_FAILED = "failed"
DEVICE_ROLLED_BACK = "rolled_back"
DEVICE_ROLLBACK_FAILED = "rollback_failed"
DEVICE_ABORTED = "aborted"
DEVICE_TIMED_OUT = "timed_out"
# The device lacks what the recipe needs (a package manager, say); nothing ran on it.
DEVICE_SKIPPED = "skipped"
FINAL_DEVICE_STATUSES = (
    DEVICE_SUCCEEDED, DEVICE_FAILED, DEVICE_ROLLED_BACK, DEVICE_ROLLBACK_FAILED, DEVICE_ABORTED, DEVICE_TIMED_OUT,
    DEVICE_SKIPPED,
)

# Deployment statuses.
DEPLOYMENT_PENDING = "pending"
DEPLOYMENT_IN_PROGRESS = "in_progress"
DEPLOYMENT_SUCCEEDED = "succeeded"
DEPLOYMENT_FAILED = "failed"
DEPLOYMENT_ABORTED = "aborted"
DEPLOYMENT_FAILED_TO_START = "failed_to_start"
# Ended by its failure threshold, or by a pause or failed gate that lasted longer than the hold time.
DEPLOYMENT_STOPPED = "stopped"
FINAL_DEPLOYMENT_STATUSES = (
    DEPLOYMENT_SUCCEEDED, DEPLOYMENT_FAILED, DEPLOYMENT_ABORTED, DEPLOYMENT_FAILED_TO_START, DEPLOYMENT_STOPPED,
)
# Device statuses that count against a failure threshold and a phase's success rate.
FAILED_DEVICE_STATUSES = (DEVICE_FAILED, DEVICE_ROLLED_BACK, DEVICE_ROLLBACK_FAILED, DEVICE_TIMED_OUT)

# States of one phase of a rollout plan.
PHASE_PENDING = "pending"
PHASE_RUNNING = "running"
PHASE_SOAKING = "soaking"
PHASE_BLOCKED = "blocked"
PHASE_PASSED = "passed"
PHASE_PROMOTED = "promoted"
# The last phase ended below its success rate; it has no next phase to hold back.
PHASE_FAILED = "failed"
PHASE_STOPPED = "stopped"

# Time allowed for an online device to pick up a queued stage, on top of the
# stage's own timeout.
STAGE_PICKUP_ALLOWANCE_SECONDS = 120


def deployment_workflow_id(deployment_id: str) -> str:
    return f"deployment-{deployment_id}"


def device_workflow_id(deployment_id: str, device_id: str) -> str:
    return f"deployment-{deployment_id}-device-{device_id}"


@dataclass
class DeploymentPlan:
    """The update's settings that the deployment workflow needs, loaded once."""

    update_id: str
    update_version: str
    stages: list[str]
    stage_timeout_seconds: dict[str, int]
    check_in_deadline_seconds: int
    heartbeat_timeout_seconds: int
    device_count: int
    revert_files: bool = True
    revert_packages: bool = True
    rollback_command_timeout_seconds: int | None = None
    reboot: bool = False
    target_groups: list[str] = field(default_factory=list)
    # One line per stage saying what it runs, shown as the activity's summary in the Web UI.
    stage_descriptions: dict[str, str] = field(default_factory=dict)
    # The deployment's limits, stop rule and phases; children get the plan without it.
    rollout: RolloutSettings | None = None
    # DeviceFacts.package_managers names the recipe needs; a device known to lack one is skipped.
    required_package_managers: list[str] = field(default_factory=list)
    # Runs of a stage that fails transiently, the first included, and the wait before the
    # second run, doubled before each further one.
    stage_max_attempts: int = 1
    retry_initial_interval_seconds: int = 5
    # The deployment's absolute check-in deadline (Unix time), on top of the per-device one.
    check_in_deadline_epoch_seconds: float | None = None


@dataclass
class PhaseSettings:
    """The gate and soak time of one phase; each device's phase is stored with the device in the database."""

    name: str
    device_count: int
    # Percentage of the phase's finished devices (succeeded or failed) that must succeed before the next phase starts.
    min_success_rate: float = 100.0
    soak_seconds: int = 0


@dataclass
class RolloutSettings:
    """Limits and stop rule of a deployment, and its phases in order (one phase when it has no plan)."""

    phases: list[PhaseSettings]
    # Devices started per second at most; None for no limit.
    max_start_rate_per_second: float | None = None
    # Failed devices tolerated, as a count or as a percentage of finished devices; None for no threshold.
    max_failures: int | None = None
    max_failures_percent: float | None = None
    # Finished devices needed before the failure threshold is evaluated.
    min_finished: int = 1
    # How long a paused deployment, or a phase whose gate failed, waits for the operator before it stops.
    max_hold_seconds: int = 7 * 24 * 3600


@dataclass
class PhaseProgress:
    """Progress of one phase as the workflow tracks it; carried across continue-as-new and written to the database."""

    state: str = PHASE_PENDING
    started: int = 0
    succeeded: int = 0
    failed: int = 0
    finished: int = 0
    gate: str | None = None
    soak_until: str | None = None
    promoted: bool = False


@dataclass
class RolloutProgress:
    phase_index: int = 0
    phases: list[PhaseProgress] = field(default_factory=list)
    paused: bool = False
    # Why the rollout stopped, as shown in the deployment's error.
    stop_reason: str | None = None
    # Raised at every write, so the database keeps the newest state when two writes overlap.
    revision: int = 0
    # When the last device started (ISO 8601), so the start-rate limit applies across continue-as-new.
    last_start_at: str | None = None


@dataclass
class DeploymentInput:
    deployment_id: str
    max_concurrent_devices: int = 500
    # Carried across continue-as-new.
    plan: DeploymentPlan | None = None
    last_started_device_id: str | None = None
    outcome_counts: dict[str, int] = field(default_factory=dict)
    aborted: bool = False
    progress: RolloutProgress | None = None


@dataclass
class DeploymentResult:
    deployment_id: str
    status: str
    outcome_counts: dict[str, int]


@dataclass
class StartDeploymentInput:
    deployment_id: str


@dataclass
class ListDeploymentDevicesInput:
    deployment_id: str
    after_device_id: str | None
    limit: int
    # Only the devices of this phase (0-based); None for every device.
    phase: int | None = None


@dataclass
class DevicePage:
    device_ids: list[str]
    abort_requested: bool


@dataclass
class MarkUnstartedDevicesAbortedInput:
    deployment_id: str
    after_device_id: str | None
    error: str = "aborted before the device started"


@dataclass
class RequestDeploymentAbortInput:
    deployment_id: str


@dataclass
class DeviceUpdateInput:
    deployment_id: str
    device_id: str
    plan: DeploymentPlan


@dataclass
class DeviceUpdateResult:
    device_id: str
    status: str
    stage: str | None = None
    error: str | None = None
    rollback_error: str | None = None
    # Stages that ran more than once, with their number of attempts.
    stage_attempts: dict[str, int] = field(default_factory=dict)


@dataclass
class StageJobInput:
    deployment_id: str
    device_id: str
    stage: str
    # 1 for a stage's first run; each later attempt gets its own job row and activity id.
    attempt: int = 1
    # For the check-in only: what the device needs. Stored facts that lack one end the wait at once.
    required_package_managers: list[str] = field(default_factory=list)


@dataclass
class CheckInOutcome:
    """The device's package managers as it last reported them; None when it never reported facts."""

    package_managers: list[str] | None = None


@dataclass
class StageOutcome:
    """A device's report of one stage, reduced to what the workflow decides on."""

    status: str
    exit_code: int | None = None
    duration_seconds: float = 0.0
    error: str | None = None
    # The device classified the failure as one that may pass when the stage runs again.
    transient: bool = False


@dataclass
class RecordDeviceOutcomeInput:
    deployment_id: str
    device_id: str
    status: str
    stage: str | None
    error: str | None
    rollback_error: str | None = None
    stage_attempts: dict[str, int] = field(default_factory=dict)


@dataclass
class RecordDeviceRollbackStartInput:
    deployment_id: str
    device_id: str
    stage: str
    error: str


@dataclass
class FinishDeploymentInput:
    deployment_id: str


@dataclass
class FinishDeploymentResult:
    status: str
    outcome_counts: dict[str, int]


@dataclass
class RecordRolloutStateInput:
    deployment_id: str
    progress: RolloutProgress


@dataclass
class StopDeploymentInput:
    deployment_id: str
    reason: str


@dataclass
class RolloutControlInput:
    """An operator's pause, resume or promote; `phase` guards against acting on a phase that has moved on."""

    phase: int | None = None


@dataclass
class RolloutControlResult:
    accepted: bool
    message: str
    phase: int
    phase_state: str
    paused: bool
