"""DeploymentWorkflow with its DeviceUpdateWorkflow children on the time-skipping test server.

All activities are fakes registered under the real activity names, because
the real ones need the application database and devices that check in
through the API. The end-to-end tests run the real activities. The fakes keep
a fleet in memory: they page through sorted device ids, record every outcome,
and compute the final status with the database's rule (aborted when an abort
was requested, else succeeded only when every device succeeded).
"""

from __future__ import annotations

import asyncio
import bisect
import uuid
from collections import Counter, defaultdict

import pytest
from temporalio import activity
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ApplicationError, CancelledError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from microupdates.protocol.device_api import REVERT_FILES_STAGE
from microupdates.workflows import deployment as deployment_module
from microupdates.workflows.contracts import (
    ABORT_SIGNAL,
    AWAIT_DEVICE_CHECK_IN_ACTIVITY,
    FINISH_DEPLOYMENT_ACTIVITY,
    LIST_DEPLOYMENT_DEVICES_ACTIVITY,
    MARK_UNSTARTED_DEVICES_ABORTED_ACTIVITY,
    RECORD_DEVICE_OUTCOME_ACTIVITY,
    RECORD_DEVICE_ROLLBACK_START_ACTIVITY,
    REQUEST_DEPLOYMENT_ABORT_ACTIVITY,
    RUN_DEVICE_STAGE_ACTIVITY,
    START_DEPLOYMENT_ACTIVITY,
    DeploymentInput,
    DeploymentPlan,
    DeploymentResult,
    DevicePage,
    FinishDeploymentInput,
    FinishDeploymentResult,
    ListDeploymentDevicesInput,
    MarkUnstartedDevicesAbortedInput,
    RecordDeviceOutcomeInput,
    RecordDeviceRollbackStartInput,
    RequestDeploymentAbortInput,
    StageJobInput,
    StageOutcome,
    StartDeploymentInput,
    deployment_workflow_id,
)
from microupdates.workflows.deployment import DeploymentWorkflow
from microupdates.workflows.device_update import DeviceUpdateWorkflow

STAGES = ["before", "files", "after"]
# Real time a fake device takes to check in. It keeps several children
# running at once, so the concurrency limit is actually reached.
CHECK_IN_SECONDS = 0.05
# Wall-time bound for one deployment, so a broken workflow fails its test instead of hanging the session.
RESULT_TIMEOUT_SECONDS = 60.0


class FakeFleet:
    """In-memory fakes of the deployment and device activities for one deployment, recording every call.

    `failing_stages` maps a device id to the stage that fails on it.
    `silent_devices` never check in, so their check-in activity times out.
    `broken_devices` raise from the check-in activity, which fails their device workflow.
    `blocked_devices` check in only after `release_check_ins` is set.
    `abort_requested` is the database flag that the API sets on abort.
    """

    def __init__(
        self,
        device_count: int,
        *,
        check_in_deadline_seconds: int = 600,
        failing_stages: dict[str, str] | None = None,
        silent_devices: set[str] | None = None,
        broken_devices: set[str] | None = None,
        blocked_devices: set[str] | None = None,
    ) -> None:
        self.device_ids = [fleet_device_id(number) for number in range(1, device_count + 1)]
        self.plan = DeploymentPlan(
            update_id="update-1",
            update_version="2.0.0",
            stages=list(STAGES),
            stage_timeout_seconds={"before": 60, "files": 1800, "after": 60},
            check_in_deadline_seconds=check_in_deadline_seconds,
            heartbeat_timeout_seconds=120,
            device_count=device_count,
        )
        self.failing_stages = failing_stages or {}
        self.silent_devices = silent_devices or set()
        self.broken_devices = broken_devices or set()
        self.blocked_devices = blocked_devices or set()
        self.release_check_ins = asyncio.Event()
        self.abort_requested = False

        self.start_calls = 0
        self.list_requests: list[ListDeploymentDevicesInput] = []
        self.check_ins: Counter[str] = Counter()
        self.stages_run: dict[str, list[str]] = defaultdict(list)
        self.recorded: dict[str, list[RecordDeviceOutcomeInput]] = defaultdict(list)
        self.rollback_starts: list[RecordDeviceRollbackStartInput] = []
        self.mark_aborted_requests: list[MarkUnstartedDevicesAbortedInput] = []
        self.abort_requests: list[RequestDeploymentAbortInput] = []
        self.finish_calls = 0
        # A device counts as active from its check-in until its outcome is recorded.
        self.active_devices: set[str] = set()
        self.max_active_devices = 0

    @activity.defn(name=START_DEPLOYMENT_ACTIVITY)
    async def start_deployment(self, request: StartDeploymentInput) -> DeploymentPlan:
        self.start_calls += 1
        return self.plan

    @activity.defn(name=LIST_DEPLOYMENT_DEVICES_ACTIVITY)
    async def list_deployment_devices(self, request: ListDeploymentDevicesInput) -> DevicePage:
        self.list_requests.append(request)
        start = 0
        if request.after_device_id is not None:
            start = bisect.bisect_right(self.device_ids, request.after_device_id)
        return DevicePage(self.device_ids[start:start + request.limit], self.abort_requested)

    @activity.defn(name=AWAIT_DEVICE_CHECK_IN_ACTIVITY)
    async def await_device_check_in(self, request: StageJobInput) -> None:
        device_id = request.device_id
        self.check_ins[device_id] += 1
        self.active_devices.add(device_id)
        self.max_active_devices = max(self.max_active_devices, len(self.active_devices))

        if device_id in self.broken_devices:
            self.active_devices.discard(device_id)
            raise ApplicationError("stage job could not be queued: database is locked")
        if device_id in self.silent_devices:
            activity.raise_complete_async()
        if device_id in self.blocked_devices:
            await self.release_check_ins.wait()
        await asyncio.sleep(CHECK_IN_SECONDS)

    @activity.defn(name=RUN_DEVICE_STAGE_ACTIVITY)
    async def run_device_stage(self, request: StageJobInput) -> StageOutcome:
        self.stages_run[request.device_id].append(request.stage)
        if self.failing_stages.get(request.device_id) == request.stage:
            return StageOutcome("failed", exit_code=1, error=f"{request.stage} script exited with status 1")
        return StageOutcome("succeeded", exit_code=0)

    @activity.defn(name=RECORD_DEVICE_ROLLBACK_START_ACTIVITY)
    async def record_device_rollback_start(self, request: RecordDeviceRollbackStartInput) -> None:
        self.rollback_starts.append(request)

    @activity.defn(name=RECORD_DEVICE_OUTCOME_ACTIVITY)
    async def record_device_outcome(self, request: RecordDeviceOutcomeInput) -> None:
        self.recorded[request.device_id].append(request)
        self.active_devices.discard(request.device_id)

    @activity.defn(name=MARK_UNSTARTED_DEVICES_ABORTED_ACTIVITY)
    async def mark_unstarted_devices_aborted(self, request: MarkUnstartedDevicesAbortedInput) -> int:
        self.mark_aborted_requests.append(request)
        marked = 0
        for device_id in self.device_ids:
            after_last_started = request.after_device_id is None or device_id > request.after_device_id
            if after_last_started and device_id not in self.recorded:
                self.recorded[device_id].append(
                    RecordDeviceOutcomeInput(
                        request.deployment_id, device_id, "aborted", None, "aborted before the device started"
                    )
                )
                marked += 1
        return marked

    @activity.defn(name=REQUEST_DEPLOYMENT_ABORT_ACTIVITY)
    async def request_deployment_abort(self, request: RequestDeploymentAbortInput) -> int:
        # The real activity sets the database flag and ends the queued jobs, so blocked check-ins end too.
        self.abort_requests.append(request)
        self.abort_requested = True
        self.release_check_ins.set()
        return 0

    @activity.defn(name=FINISH_DEPLOYMENT_ACTIVITY)
    async def finish_deployment(self, request: FinishDeploymentInput) -> FinishDeploymentResult:
        self.finish_calls += 1
        counts = dict(Counter(self.device_status(device_id) for device_id in self.device_ids))
        if self.abort_requested:
            status = "aborted"
        elif counts.get("succeeded", 0) == len(self.device_ids):
            status = "succeeded"
        else:
            status = "failed"
        return FinishDeploymentResult(status, counts)

    def device_status(self, device_id: str) -> str:
        """Return the last recorded status; a device with no record keeps the database's initial status."""

        outcomes = self.recorded.get(device_id)
        return outcomes[-1].status if outcomes else "pending"

    def activities(self) -> list:
        return [
            self.start_deployment,
            self.list_deployment_devices,
            self.await_device_check_in,
            self.run_device_stage,
            self.record_device_outcome,
            self.record_device_rollback_start,
            self.mark_unstarted_devices_aborted,
            self.request_deployment_abort,
            self.finish_deployment,
        ]


def fleet_device_id(number: int) -> str:
    return f"device-{number:03d}"


def make_worker(client: Client, task_queue: str, fleet: FakeFleet, **options: object) -> Worker:
    # Any exception in workflow code fails the workflow, so a bug ends the test
    # instead of retrying the workflow task until the result timeout.
    return Worker(
        client,
        task_queue=task_queue,
        workflows=[DeploymentWorkflow, DeviceUpdateWorkflow],
        activities=fleet.activities(),
        workflow_failure_exception_types=[Exception],
        **options,
    )


async def start_deployment(
    client: Client, task_queue: str, deployment_id: str, max_concurrent_devices: int
) -> WorkflowHandle[DeploymentWorkflow, DeploymentResult]:
    return await client.start_workflow(
        DeploymentWorkflow.run,
        DeploymentInput(deployment_id, max_concurrent_devices=max_concurrent_devices),
        id=deployment_workflow_id(deployment_id),
        task_queue=task_queue,
    )


async def run_deployment(
    environment: WorkflowEnvironment, task_queue: str, fleet: FakeFleet, max_concurrent_devices: int
) -> DeploymentResult:
    deployment_id = uuid.uuid4().hex
    async with make_worker(environment.client, task_queue, fleet):
        handle = await start_deployment(environment.client, task_queue, deployment_id, max_concurrent_devices)
        result = await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_SECONDS)
    assert result.deployment_id == deployment_id
    return result


async def list_run_ids(client: Client, workflow_id: str, first_run_id: str) -> list[str]:
    """Follow the continue-as-new chain of a workflow from its first run."""

    run_ids = [first_run_id]
    while True:
        history = await client.get_workflow_handle(workflow_id, run_id=run_ids[-1]).fetch_history()
        last_event = history.events[-1]
        if not last_event.HasField("workflow_execution_continued_as_new_event_attributes"):
            return run_ids
        run_ids.append(last_event.workflow_execution_continued_as_new_event_attributes.new_execution_run_id)


async def wait_for_check_ins(fleet: FakeFleet, count: int) -> None:
    async def poll() -> None:
        while sum(fleet.check_ins.values()) < count:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), RESULT_TIMEOUT_SECONDS)


async def test_deployment_updates_every_device_within_concurrency_limit(
    workflow_environment: WorkflowEnvironment, task_queue: str
) -> None:
    fleet = FakeFleet(25)

    result = await run_deployment(workflow_environment, task_queue, fleet, max_concurrent_devices=4)

    assert result.status == "succeeded"
    assert result.outcome_counts == {"succeeded": 25}
    assert fleet.start_calls == 1
    assert fleet.finish_calls == 1
    assert fleet.mark_aborted_requests == []
    assert fleet.check_ins == Counter({device_id: 1 for device_id in fleet.device_ids})
    assert sorted(fleet.recorded) == fleet.device_ids
    for device_id in fleet.device_ids:
        assert fleet.stages_run[device_id] == STAGES, device_id
        assert [outcome.status for outcome in fleet.recorded[device_id]] == ["succeeded"], device_id
    assert fleet.max_active_devices <= 4
    # The window fills up, so the bound above is not met trivially.
    assert fleet.max_active_devices == 4
    # All 25 ids fit into one page of DEVICE_PAGE_SIZE, and a short page ends the listing.
    assert [(request.after_device_id, request.limit) for request in fleet.list_requests] == [
        (None, deployment_module.DEVICE_PAGE_SIZE)
    ]


async def test_deployment_starts_window_in_one_task(
    workflow_environment: WorkflowEnvironment, task_queue: str
) -> None:
    fleet = FakeFleet(12)
    deployment_id = uuid.uuid4().hex

    async with make_worker(workflow_environment.client, task_queue, fleet):
        handle = await start_deployment(workflow_environment.client, task_queue, deployment_id, 8)
        result = await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_SECONDS)
    history = await handle.fetch_history()

    assert result.outcome_counts == {"succeeded": 12}
    # Each workflow task's commands follow its WorkflowTaskCompleted event, so
    # count the child starts that each completed task issued.
    starts_per_task: list[int] = []
    for event in history.events:
        if event.HasField("workflow_task_completed_event_attributes"):
            starts_per_task.append(0)
        elif event.HasField("start_child_workflow_execution_initiated_event_attributes"):
            starts_per_task[-1] += 1
    assert sum(starts_per_task) == 12
    # The first page fills the window of 8 at once; one start per task would give [1, 1, 1, ...].
    assert max(starts_per_task) == 8


async def test_deployment_fails_when_some_devices_fail(
    workflow_environment: WorkflowEnvironment, task_queue: str
) -> None:
    failing_stages = {fleet_device_id(3): "before", fleet_device_id(10): "files", fleet_device_id(17): "after"}
    silent_devices = {fleet_device_id(5), fleet_device_id(20)}
    # The test server does not skip time while an activity is pending, so the
    # silent devices time out in wall time. A short deadline keeps the test fast.
    fleet = FakeFleet(
        25, check_in_deadline_seconds=3, failing_stages=failing_stages, silent_devices=silent_devices
    )

    result = await run_deployment(workflow_environment, task_queue, fleet, max_concurrent_devices=4)

    assert result.status == "failed"
    assert result.outcome_counts == {"succeeded": 20, "failed": 1, "rolled_back": 2, "timed_out": 2}
    assert fleet.check_ins == Counter({device_id: 1 for device_id in fleet.device_ids})
    # The before stage registers no revert. The files and after stages are undone by revert_files.
    expected = {
        fleet_device_id(3): ("failed", "before", ["before"]),
        fleet_device_id(10): ("rolled_back", "files", ["before", "files", REVERT_FILES_STAGE]),
        fleet_device_id(17): ("rolled_back", "after", ["before", "files", "after", REVERT_FILES_STAGE]),
        fleet_device_id(5): ("timed_out", "check_in", []),
        fleet_device_id(20): ("timed_out", "check_in", []),
    }
    for device_id, (status, stage, stages_run) in expected.items():
        outcomes = fleet.recorded[device_id]
        assert [(outcome.status, outcome.stage) for outcome in outcomes] == [(status, stage)], device_id
        assert fleet.stages_run[device_id] == stages_run, device_id
    assert fleet.max_active_devices <= 4


async def test_deployment_counts_device_with_failed_check_in_as_failed(
    workflow_environment: WorkflowEnvironment, task_queue: str
) -> None:
    deployment_id = uuid.uuid4().hex
    broken_device = fleet_device_id(2)
    fleet = FakeFleet(6, broken_devices={broken_device})

    async with make_worker(workflow_environment.client, task_queue, fleet):
        handle = await start_deployment(workflow_environment.client, task_queue, deployment_id, 4)
        result = await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_SECONDS)
        workflow_counts = await handle.query(DeploymentWorkflow.outcome_counts)

    assert result.status == "failed"
    assert workflow_counts == {"succeeded": 5, "failed": 1, "running": 0}
    assert [(outcome.status, outcome.stage) for outcome in fleet.recorded[broken_device]] == [("failed", "check_in")]
    assert result.outcome_counts == {"succeeded": 5, "failed": 1}


async def test_deployment_abort_signal_stops_starting_devices(
    workflow_environment: WorkflowEnvironment, task_queue: str
) -> None:
    deployment_id = uuid.uuid4().hex
    started = [fleet_device_id(1), fleet_device_id(2)]
    fleet = FakeFleet(12, blocked_devices=set(started))

    async with make_worker(workflow_environment.client, task_queue, fleet):
        handle = await start_deployment(workflow_environment.client, task_queue, deployment_id, 2)
        # Both window slots are taken by devices that stay blocked until the abort signal is sent.
        await wait_for_check_ins(fleet, 2)
        # The API sets the database flag, then signals the workflow.
        fleet.abort_requested = True
        await handle.signal(ABORT_SIGNAL)
        fleet.release_check_ins.set()
        result = await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_SECONDS)

    assert result.status == "aborted"
    assert result.outcome_counts == {"succeeded": 2, "aborted": 10}
    assert fleet.check_ins == Counter({device_id: 1 for device_id in started})
    for device_id in started:
        assert [outcome.status for outcome in fleet.recorded[device_id]] == ["succeeded"], device_id
    assert [request.after_device_id for request in fleet.mark_aborted_requests] == [None]
    assert fleet.finish_calls == 1


async def test_deployment_cancel_is_handled_as_abort(
    workflow_environment: WorkflowEnvironment, task_queue: str
) -> None:
    deployment_id = uuid.uuid4().hex
    started = [fleet_device_id(1), fleet_device_id(2)]
    fleet = FakeFleet(12, blocked_devices=set(started))

    async with make_worker(workflow_environment.client, task_queue, fleet):
        handle = await start_deployment(workflow_environment.client, task_queue, deployment_id, 2)
        await wait_for_check_ins(fleet, 2)
        await handle.cancel()
        with pytest.raises(WorkflowFailureError) as failure:
            await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_SECONDS)

    assert isinstance(failure.value.cause, CancelledError)
    assert [request.deployment_id for request in fleet.abort_requests] == [deployment_id]
    assert [request.after_device_id for request in fleet.mark_aborted_requests] == [None]
    assert fleet.check_ins == Counter({device_id: 1 for device_id in started})
    assert all(fleet.recorded[device_id] for device_id in fleet.device_ids), "every device has an outcome"
    assert fleet.finish_calls == 1


async def test_deployment_aborted_before_start_starts_no_device(
    workflow_environment: WorkflowEnvironment, task_queue: str
) -> None:
    # The flag in the database stops the deployment even when the abort signal was lost.
    fleet = FakeFleet(6)
    fleet.abort_requested = True

    result = await run_deployment(workflow_environment, task_queue, fleet, max_concurrent_devices=4)

    assert result.status == "aborted"
    assert result.outcome_counts == {"aborted": 6}
    assert fleet.check_ins == Counter()
    assert [request.after_device_id for request in fleet.mark_aborted_requests] == [None]


@pytest.mark.parametrize(
    ("device_count", "expected_runs"),
    [
        # One full page of 3 and a short page of 2: no continue-as-new.
        (5, 1),
        # Runs of 6, 6 and 0 children. The third run only reads an empty page.
        (12, 3),
        # Runs of 6, 6 and 1 children.
        (13, 3),
    ],
)
async def test_deployment_continues_as_new_and_carries_progress(
    workflow_environment: WorkflowEnvironment,
    task_queue: str,
    monkeypatch: pytest.MonkeyPatch,
    device_count: int,
    expected_runs: int,
) -> None:
    monkeypatch.setattr(deployment_module, "MAX_CHILDREN_PER_RUN", 5)
    monkeypatch.setattr(deployment_module, "DEVICE_PAGE_SIZE", 3)
    # The sandbox imports each workflow module afresh from source, so it would
    # not see the patched constants. Passing the project's modules through
    # makes the sandbox use the module objects that this test patched. The
    # whole package is passed, because the contracts module must be in the
    # sandbox's sys.modules for the payload converter to resolve its type hints.
    runner = SandboxedWorkflowRunner(
        restrictions=SandboxRestrictions.default.with_passthrough_modules("microupdates")
    )
    deployment_id = uuid.uuid4().hex
    fleet = FakeFleet(device_count)

    async with make_worker(workflow_environment.client, task_queue, fleet, workflow_runner=runner):
        handle = await start_deployment(workflow_environment.client, task_queue, deployment_id, 2)
        result = await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_SECONDS)
        # The query runs on the last run, which started with the counts carried over.
        last_run_counts = await handle.query(DeploymentWorkflow.outcome_counts)
        run_ids = await list_run_ids(workflow_environment.client, handle.id, handle.first_execution_run_id)

    assert len(run_ids) == expected_runs
    assert result == DeploymentResult(deployment_id, "succeeded", {"succeeded": device_count})
    assert last_run_counts == {"succeeded": device_count, "running": 0}
    assert fleet.start_calls == 1
    assert fleet.finish_calls == 1
    assert fleet.check_ins == Counter({device_id: 1 for device_id in fleet.device_ids})
    for device_id in fleet.device_ids:
        assert [outcome.status for outcome in fleet.recorded[device_id]] == ["succeeded"], device_id
    # Each page starts after the last device of the page before, across runs too.
    # The listing ends with the first page shorter than 3, which may be empty.
    expected_cursors = [None] + fleet.device_ids[2::3]
    assert [request.after_device_id for request in fleet.list_requests] == expected_cursors
    assert {request.limit for request in fleet.list_requests} == {3}
