"""DeploymentWorkflow with its DeviceUpdateWorkflow children on the time-skipping test server.

All six activities are fakes registered under the real activity names,
because the real ones need the application database and devices that check
in through the API. The end-to-end tests run the real activities. The fakes
keep a fleet in memory: they page through sorted device ids, record every
outcome, and compute the final status with the database's rule (succeeded
only when every device succeeded).
"""

from __future__ import annotations

import asyncio
import bisect
import uuid
from collections import Counter, defaultdict

import pytest
from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from microupdates.workflows import deployment as deployment_module
from microupdates.workflows.contracts import (
    AWAIT_DEVICE_CHECK_IN_ACTIVITY,
    FINISH_DEPLOYMENT_ACTIVITY,
    LIST_DEPLOYMENT_DEVICES_ACTIVITY,
    RECORD_DEVICE_OUTCOME_ACTIVITY,
    RUN_DEVICE_STAGE_ACTIVITY,
    START_DEPLOYMENT_ACTIVITY,
    DeploymentInput,
    DeploymentPlan,
    DeploymentResult,
    FinishDeploymentInput,
    FinishDeploymentResult,
    ListDeploymentDevicesInput,
    RecordDeviceOutcomeInput,
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


class FakeFleet:
    """In-memory fakes of the six activities for one deployment, recording every call.

    `failing_stages` maps a device id to the stage that fails on it.
    `silent_devices` never check in, so their check-in activity times out.
    `broken_devices` raise from the check-in activity, which fails their device workflow.
    """

    def __init__(
        self,
        device_count: int,
        *,
        check_in_deadline_seconds: int = 600,
        failing_stages: dict[str, str] | None = None,
        silent_devices: set[str] | None = None,
        broken_devices: set[str] | None = None,
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

        self.start_calls = 0
        self.list_requests: list[ListDeploymentDevicesInput] = []
        self.check_ins: Counter[str] = Counter()
        self.stages_run: dict[str, list[str]] = defaultdict(list)
        self.recorded: dict[str, list[RecordDeviceOutcomeInput]] = defaultdict(list)
        self.finish_calls = 0
        # A device counts as active from its check-in until its outcome is recorded.
        self.active_devices: set[str] = set()
        self.max_active_devices = 0

    @activity.defn(name=START_DEPLOYMENT_ACTIVITY)
    async def start_deployment(self, request: StartDeploymentInput) -> DeploymentPlan:
        self.start_calls += 1
        return self.plan

    @activity.defn(name=LIST_DEPLOYMENT_DEVICES_ACTIVITY)
    async def list_deployment_devices(self, request: ListDeploymentDevicesInput) -> list[str]:
        self.list_requests.append(request)
        start = 0
        if request.after_device_id is not None:
            start = bisect.bisect_right(self.device_ids, request.after_device_id)
        return self.device_ids[start:start + request.limit]

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
        await asyncio.sleep(CHECK_IN_SECONDS)

    @activity.defn(name=RUN_DEVICE_STAGE_ACTIVITY)
    async def run_device_stage(self, request: StageJobInput) -> StageOutcome:
        self.stages_run[request.device_id].append(request.stage)
        if self.failing_stages.get(request.device_id) == request.stage:
            return StageOutcome("failed", exit_code=1, error=f"{request.stage} script exited with status 1")
        return StageOutcome("succeeded", exit_code=0)

    @activity.defn(name=RECORD_DEVICE_OUTCOME_ACTIVITY)
    async def record_device_outcome(self, request: RecordDeviceOutcomeInput) -> None:
        self.recorded[request.device_id].append(request)
        self.active_devices.discard(request.device_id)

    @activity.defn(name=FINISH_DEPLOYMENT_ACTIVITY)
    async def finish_deployment(self, request: FinishDeploymentInput) -> FinishDeploymentResult:
        self.finish_calls += 1
        counts = dict(Counter(outcomes[-1].status for outcomes in self.recorded.values()))
        status = "succeeded" if counts.get("succeeded", 0) == len(self.device_ids) else "failed"
        return FinishDeploymentResult(status, counts)

    def activities(self) -> list:
        return [
            self.start_deployment,
            self.list_deployment_devices,
            self.await_device_check_in,
            self.run_device_stage,
            self.record_device_outcome,
            self.finish_deployment,
        ]


def fleet_device_id(number: int) -> str:
    return f"device-{number:03d}"


def make_worker(client: Client, task_queue: str, fleet: FakeFleet, **options: object) -> Worker:
    return Worker(
        client,
        task_queue=task_queue,
        workflows=[DeploymentWorkflow, DeviceUpdateWorkflow],
        activities=fleet.activities(),
        **options,
    )


async def list_run_ids(client: Client, workflow_id: str, first_run_id: str) -> list[str]:
    """Follow the continue-as-new chain of a workflow from its first run."""

    run_ids = [first_run_id]
    while True:
        history = await client.get_workflow_handle(workflow_id, run_id=run_ids[-1]).fetch_history()
        last_event = history.events[-1]
        if not last_event.HasField("workflow_execution_continued_as_new_event_attributes"):
            return run_ids
        run_ids.append(last_event.workflow_execution_continued_as_new_event_attributes.new_execution_run_id)


async def test_deployment_updates_every_device_within_concurrency_limit(
    workflow_environment: WorkflowEnvironment, task_queue: str
) -> None:
    deployment_id = uuid.uuid4().hex
    fleet = FakeFleet(25)

    async with make_worker(workflow_environment.client, task_queue, fleet):
        result = await workflow_environment.client.execute_workflow(
            DeploymentWorkflow.run,
            DeploymentInput(deployment_id, max_concurrent_devices=4),
            id=deployment_workflow_id(deployment_id),
            task_queue=task_queue,
        )

    assert result == DeploymentResult(deployment_id, "succeeded", {"succeeded": 25})
    assert fleet.start_calls == 1
    assert fleet.finish_calls == 1
    assert fleet.check_ins == Counter({device_id: 1 for device_id in fleet.device_ids})
    assert sorted(fleet.recorded) == fleet.device_ids
    for device_id in fleet.device_ids:
        assert fleet.stages_run[device_id] == STAGES, device_id
        assert [outcome.status for outcome in fleet.recorded[device_id]] == ["succeeded"], device_id
    assert fleet.max_active_devices <= 4
    # The window fills up, so the bound above is not met trivially.
    assert fleet.max_active_devices == 4
    # All 25 ids fit into one page of DEVICE_PAGE_SIZE; the short page ends the listing.
    assert [(request.after_device_id, request.limit) for request in fleet.list_requests] == [
        (None, deployment_module.DEVICE_PAGE_SIZE)
    ]


async def test_deployment_fails_when_some_devices_fail(
    workflow_environment: WorkflowEnvironment, task_queue: str
) -> None:
    deployment_id = uuid.uuid4().hex
    failing_stages = {fleet_device_id(3): "files", fleet_device_id(10): "before", fleet_device_id(17): "after"}
    silent_devices = {fleet_device_id(5), fleet_device_id(20)}
    # A pending activity stops time skipping on the test server, so the silent
    # devices time out in wall time; a short deadline keeps the test fast.
    fleet = FakeFleet(
        25, check_in_deadline_seconds=3, failing_stages=failing_stages, silent_devices=silent_devices
    )

    async with make_worker(workflow_environment.client, task_queue, fleet):
        result = await workflow_environment.client.execute_workflow(
            DeploymentWorkflow.run,
            DeploymentInput(deployment_id, max_concurrent_devices=4),
            id=deployment_workflow_id(deployment_id),
            task_queue=task_queue,
        )

    assert result.status == "failed"
    assert result.outcome_counts == {"succeeded": 20, "failed": 3, "timed_out": 2}
    assert fleet.check_ins == Counter({device_id: 1 for device_id in fleet.device_ids})
    for device_id, stage in failing_stages.items():
        outcomes = fleet.recorded[device_id]
        assert [(outcome.status, outcome.stage) for outcome in outcomes] == [("failed", stage)], device_id
        assert fleet.stages_run[device_id] == STAGES[:STAGES.index(stage) + 1], device_id
    for device_id in silent_devices:
        outcomes = fleet.recorded[device_id]
        assert [(outcome.status, outcome.stage) for outcome in outcomes] == [("timed_out", "check_in")], device_id
        assert fleet.stages_run[device_id] == [], device_id
    assert fleet.max_active_devices <= 4


async def test_deployment_counts_failed_device_workflow_as_failed_device(
    workflow_environment: WorkflowEnvironment, task_queue: str
) -> None:
    deployment_id = uuid.uuid4().hex
    broken_device = fleet_device_id(2)
    fleet = FakeFleet(6, broken_devices={broken_device})

    async with make_worker(workflow_environment.client, task_queue, fleet):
        handle = await workflow_environment.client.start_workflow(
            DeploymentWorkflow.run,
            DeploymentInput(deployment_id, max_concurrent_devices=4),
            id=deployment_workflow_id(deployment_id),
            task_queue=task_queue,
        )
        result = await handle.result()
        workflow_counts = await handle.query(DeploymentWorkflow.outcome_counts)

    assert result.status == "failed"
    assert workflow_counts == {"succeeded": 5, "failed": 1, "running": 0}
    # NOTE: the failed device workflow never reached record_device_outcome, so
    # finish_deployment, which reads the recorded outcomes, does not count it.
    assert broken_device not in fleet.recorded
    assert result.outcome_counts == {"succeeded": 5}


@pytest.mark.parametrize(
    ("device_count", "expected_runs"),
    [
        # One full page of 3 and a short page of 2: no continue-as-new.
        (5, 1),
        # Runs of 6, 6 and 0 children; the third run only reads an empty page.
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
    # not see the patched constants. Passing the deployment module through
    # makes the sandbox use the patched module object that this test changed.
    runner = SandboxedWorkflowRunner(
        restrictions=SandboxRestrictions.default.with_passthrough_modules("microupdates.workflows.deployment")
    )
    deployment_id = uuid.uuid4().hex
    fleet = FakeFleet(device_count)

    async with make_worker(workflow_environment.client, task_queue, fleet, workflow_runner=runner):
        handle = await workflow_environment.client.start_workflow(
            DeploymentWorkflow.run,
            DeploymentInput(deployment_id, max_concurrent_devices=2),
            id=deployment_workflow_id(deployment_id),
            task_queue=task_queue,
        )
        result = await handle.result()
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
