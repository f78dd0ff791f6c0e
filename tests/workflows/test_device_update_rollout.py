"""DeviceUpdateWorkflow: skipped devices, retries of transient stage failures, the deployment's check-in deadline.

Same time-skipping server and fake activities as test_device_update_workflow.
"""

from __future__ import annotations

import time

from temporalio import activity
from temporalio.testing import WorkflowEnvironment

from microupdates.protocol.device_api import REVERT_FILES_STAGE
from microupdates.workflows.contracts import (
    AWAIT_DEVICE_CHECK_IN_ACTIVITY,
    RUN_DEVICE_STAGE_ACTIVITY,
    CheckInOutcome,
    StageJobInput,
    StageOutcome,
)
from tests.workflows.test_device_update_workflow import (
    DEVICE_ID,
    MAX_WALL_SECONDS,
    STAGES,
    FakeDevice,
    failed_outcome,
    make_plan,
    run_device_update,
)

DOWNLOAD_ERROR = "hello.txt: downloading artifact 5891b5b5 failed 3 times: HTTP 404"


def transient_outcome(error: str) -> StageOutcome:
    return StageOutcome("failed", duration_seconds=0.3, error=error, transient=True)


class RolloutDevice(FakeDevice):
    """A fake device that reports facts at check-in and plays a list of outcomes per stage, one per attempt."""

    def __init__(
        self,
        environment: WorkflowEnvironment,
        *,
        package_managers: list[str] | None = None,
        attempt_outcomes: dict[str, list[StageOutcome]] | None = None,
    ) -> None:
        super().__init__(environment)
        self.package_managers = package_managers
        self.attempt_outcomes = attempt_outcomes or {}
        self.stage_requests: list[StageJobInput] = []
        self.activity_ids: list[str] = []

    @activity.defn(name=AWAIT_DEVICE_CHECK_IN_ACTIVITY)
    async def await_device_check_in(self, request: StageJobInput) -> CheckInOutcome:
        self.check_ins.append(request)
        return CheckInOutcome(self.package_managers)

    @activity.defn(name=RUN_DEVICE_STAGE_ACTIVITY)
    async def run_device_stage(self, request: StageJobInput) -> StageOutcome:
        self.stages_run.append(request.stage)
        self.stage_requests.append(request)
        self.activity_ids.append(activity.info().activity_id)
        outcomes = self.attempt_outcomes.get(request.stage)
        if outcomes:
            return outcomes.pop(0)
        return StageOutcome("succeeded", exit_code=0, duration_seconds=0.5)

    def activities(self) -> list:
        return [
            self.await_device_check_in,
            self.run_device_stage,
            self.record_device_rollback_start,
            self.record_device_outcome,
        ]


async def test_device_update_skips_device_without_npm(
    workflow_environment: WorkflowEnvironment, task_queue: str
) -> None:
    device = RolloutDevice(workflow_environment, package_managers=["apt", "pip3", "python3"])
    plan = make_plan(required_package_managers=["npm", "pip3"])

    result = await run_device_update(workflow_environment, task_queue, device, plan)

    assert result.status == "skipped"
    assert result.error == "npm is not installed on this device"
    assert result.stage is None
    assert device.stages_run == []
    assert device.check_ins[0].required_package_managers == ["npm", "pip3"]
    assert device.recorded[0].status == "skipped"
    assert device.recorded[0].error == "npm is not installed on this device"


async def test_device_update_runs_on_device_without_facts(
    workflow_environment: WorkflowEnvironment, task_queue: str
) -> None:
    device = RolloutDevice(workflow_environment, package_managers=None)
    plan = make_plan(required_package_managers=["npm"])

    result = await run_device_update(workflow_environment, task_queue, device, plan)

    assert result.status == "succeeded"
    assert device.stages_run == STAGES


async def test_device_update_retries_transient_failure(
    workflow_environment: WorkflowEnvironment, task_queue: str
) -> None:
    device = RolloutDevice(workflow_environment, attempt_outcomes={"files": [transient_outcome(DOWNLOAD_ERROR)]})
    plan = make_plan(stage_max_attempts=3, retry_initial_interval_seconds=5)

    result = await run_device_update(workflow_environment, task_queue, device, plan)

    assert result.status == "succeeded"
    assert result.stage_attempts == {"files": 2}
    assert device.stages_run == ["before", "files", "files", "dependencies", "after"]
    assert [request.attempt for request in device.stage_requests if request.stage == "files"] == [1, 2]
    assert "files-attempt-2" in device.activity_ids
    assert device.recorded[0].stage_attempts == {"files": 2}


async def test_device_update_retries_interrupted_stage(
    workflow_environment: WorkflowEnvironment, task_queue: str
) -> None:
    interrupted = StageOutcome("interrupted", error="the agent restarted during the dependencies stage")
    device = RolloutDevice(workflow_environment, attempt_outcomes={"dependencies": [interrupted]})
    plan = make_plan(stage_max_attempts=2, retry_initial_interval_seconds=5)

    result = await run_device_update(workflow_environment, task_queue, device, plan)

    assert result.status == "succeeded"
    assert result.stage_attempts == {"dependencies": 2}


async def test_device_update_backs_off_exponentially(
    workflow_environment: WorkflowEnvironment, task_queue: str
) -> None:
    outcomes = [transient_outcome(DOWNLOAD_ERROR), transient_outcome(DOWNLOAD_ERROR), transient_outcome(DOWNLOAD_ERROR)]
    device = RolloutDevice(workflow_environment, attempt_outcomes={"files": outcomes})
    plan = make_plan(stage_max_attempts=3, retry_initial_interval_seconds=60)
    started = await workflow_environment.get_current_time()
    wall_started = time.monotonic()

    result = await run_device_update(workflow_environment, task_queue, device, plan)

    elapsed = (await workflow_environment.get_current_time()) - started
    # Waits of 60 s and 120 s between the three attempts, skipped by the test server.
    assert elapsed.total_seconds() >= 180
    assert time.monotonic() - wall_started < MAX_WALL_SECONDS
    assert result.status == "rolled_back"
    assert result.stage == "files"
    assert result.error == f"{DOWNLOAD_ERROR} (after 3 attempts)"
    assert result.stage_attempts == {"files": 3}
    assert device.stages_run == ["before", "files", "files", "files", REVERT_FILES_STAGE]


async def test_device_update_does_not_retry_permanent_failure(
    workflow_environment: WorkflowEnvironment, task_queue: str
) -> None:
    error = "after: exited with status 1"
    device = RolloutDevice(workflow_environment, attempt_outcomes={"after": [failed_outcome(error)]})
    plan = make_plan(stage_max_attempts=3)

    result = await run_device_update(workflow_environment, task_queue, device, plan)

    assert result.status == "rolled_back"
    assert result.error == error
    assert result.stage_attempts == {}
    assert device.stages_run.count("after") == 1


async def test_device_update_times_out_after_deployment_deadline(
    workflow_environment: WorkflowEnvironment, task_queue: str
) -> None:
    device = RolloutDevice(workflow_environment)
    now = (await workflow_environment.get_current_time()).timestamp()
    plan = make_plan(check_in_deadline_epoch_seconds=now - 60)

    result = await run_device_update(workflow_environment, task_queue, device, plan)

    assert result.status == "timed_out"
    assert result.stage == "check_in"
    assert result.error.startswith("the device did not check in before the deployment's deadline ")
    assert device.check_ins == []
    assert device.stages_run == []
