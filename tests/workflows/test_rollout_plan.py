"""Rollout control of DeploymentWorkflow on the time-skipping test server: phases, gates, soak, pause, resume,
promote, failure threshold and start rate.

The activities are the in-memory fakes of test_deployment_workflow, extended
with the phase of each device, the phase-state writes and the stop activity.
This module runs its own time-skipping test server: the server skips time
only while no activity is pending anywhere on it, and an activity left
pending by another test module would stop it. Tests that wait on a timer
advance server time with `WorkflowEnvironment.sleep()` once the workflow
waits, to one second before the timer fires; the last second passes in wall
time. A timer that fires inside the sleep schedules activities, which hold
the clock, and the sleep call then fails with "Timeout expired".
"""

from __future__ import annotations

import asyncio
import bisect
import uuid
from collections import Counter
from datetime import timedelta

import pytest
import pytest_asyncio
from temporalio import activity
from temporalio.client import WorkflowHandle, WorkflowUpdateFailedError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from microupdates.workflows import deployment as deployment_module
from microupdates.workflows.contracts import (
    LIST_DEPLOYMENT_DEVICES_ACTIVITY,
    FINISH_DEPLOYMENT_ACTIVITY,
    PAUSE_UPDATE,
    PROMOTE_UPDATE,
    RECORD_ROLLOUT_STATE_ACTIVITY,
    RESUME_UPDATE,
    STOP_DEPLOYMENT_ACTIVITY,
    AWAIT_DEVICE_CHECK_IN_ACTIVITY,
    DeploymentInput,
    DeploymentResult,
    DevicePage,
    FinishDeploymentInput,
    FinishDeploymentResult,
    ListDeploymentDevicesInput,
    PhaseSettings,
    RecordRolloutStateInput,
    RolloutControlInput,
    RolloutControlResult,
    RolloutSettings,
    StageJobInput,
    StopDeploymentInput,
    deployment_workflow_id,
)
from microupdates.workflows.deployment import DeploymentWorkflow, failure_threshold_reason
from microupdates.search_attributes import ensure_search_attributes
from tests.workflows.conftest import TEST_SERVER_PATH
from tests.workflows.test_deployment_workflow import (
    RESULT_TIMEOUT_SECONDS,
    FakeFleet,
    fleet_device_id,
    list_run_ids,
    make_worker,
)

# Server time that tests leave to pass in wall time at the end of a timer.
WALL_SECONDS = 1


@pytest_asyncio.fixture(scope="module")
async def workflow_environment():
    """A time-skipping test server for this module only, so no other module's pending activity stops its clock."""

    environment = await WorkflowEnvironment.start_time_skipping(test_server_existing_path=str(TEST_SERVER_PATH))
    await ensure_search_attributes(environment.client)
    try:
        yield environment
    finally:
        await environment.shutdown()


class PhasedFleet(FakeFleet):
    """FakeFleet with a rollout plan: `phase_sizes` devices per phase, in device-id order."""

    def __init__(self, phase_sizes: list[int], phases: list[PhaseSettings] | None = None, **options) -> None:
        super().__init__(sum(phase_sizes), **options)
        self.phase_of: dict[str, int] = {}
        numbers = iter(self.device_ids)
        for index, size in enumerate(phase_sizes):
            for _ in range(size):
                self.phase_of[next(numbers)] = index
        phases = phases or [PhaseSettings(f"phase {index + 1}", size) for index, size in enumerate(phase_sizes)]
        self.plan.rollout = RolloutSettings(phases=phases)
        self.states: list[RecordRolloutStateInput] = []
        self.stops: list[StopDeploymentInput] = []
        self.check_in_order: list[str] = []
        self.check_in_times: dict[str, float] = {}

    @property
    def settings(self) -> RolloutSettings:
        return self.plan.rollout

    @activity.defn(name=LIST_DEPLOYMENT_DEVICES_ACTIVITY)
    async def list_deployment_devices(self, request: ListDeploymentDevicesInput) -> DevicePage:
        self.list_requests.append(request)
        ids = [device_id for device_id in self.device_ids if self.phase_of[device_id] == request.phase]
        start = 0 if request.after_device_id is None else bisect.bisect_right(ids, request.after_device_id)
        return DevicePage(ids[start:start + request.limit], self.abort_requested)

    @activity.defn(name=AWAIT_DEVICE_CHECK_IN_ACTIVITY)
    async def await_device_check_in(self, request: StageJobInput) -> None:
        self.check_in_order.append(request.device_id)
        self.check_in_times[request.device_id] = activity.info().started_time.timestamp()
        await FakeFleet.await_device_check_in(self, request)

    @activity.defn(name=RECORD_ROLLOUT_STATE_ACTIVITY)
    async def record_rollout_state(self, request: RecordRolloutStateInput) -> None:
        self.states.append(request)

    @activity.defn(name=STOP_DEPLOYMENT_ACTIVITY)
    async def stop_deployment(self, request: StopDeploymentInput) -> int:
        self.stops.append(request)
        self.abort_requested = True
        return 0

    @activity.defn(name=FINISH_DEPLOYMENT_ACTIVITY)
    async def finish_deployment(self, request: FinishDeploymentInput) -> FinishDeploymentResult:
        result = await FakeFleet.finish_deployment(self, request)
        if self.stops:
            result.status = "stopped"
        return result

    def activities(self) -> list:
        replaced = {self.list_deployment_devices.__name__, self.await_device_check_in.__name__,
                    self.finish_deployment.__name__}
        kept = [function for function in super().activities() if function.__name__ not in replaced]
        return kept + [self.list_deployment_devices, self.await_device_check_in, self.record_rollout_state,
                       self.stop_deployment, self.finish_deployment]

    def phase_states(self) -> list[str]:
        return [phase.state for phase in self.states[-1].progress.phases]

    def devices_of(self, phase: int) -> list[str]:
        return [device_id for device_id in self.device_ids if self.phase_of[device_id] == phase]


async def start(
    environment: WorkflowEnvironment, task_queue: str, max_concurrent_devices: int = 10
) -> WorkflowHandle[DeploymentWorkflow, DeploymentResult]:
    deployment_id = uuid.uuid4().hex
    return await environment.client.start_workflow(
        DeploymentWorkflow.run,
        DeploymentInput(deployment_id, max_concurrent_devices=max_concurrent_devices),
        id=deployment_workflow_id(deployment_id),
        task_queue=task_queue,
    )


async def result_of(handle: WorkflowHandle) -> DeploymentResult:
    return await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_SECONDS)


async def wait_for_state(fleet: PhasedFleet, phase: int, state: str) -> None:
    async def poll() -> None:
        while not fleet.states or fleet.states[-1].progress.phases[phase].state != state:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), RESULT_TIMEOUT_SECONDS)


async def control(handle: WorkflowHandle, name: str, phase: int | None = None) -> RolloutControlResult:
    return await handle.execute_update(name, RolloutControlInput(phase), result_type=RolloutControlResult)


async def test_phases_run_in_order_after_passed_gates(workflow_environment, task_queue):
    fleet = PhasedFleet([2, 3, 4])

    async with make_worker(workflow_environment.client, task_queue, fleet):
        result = await result_of(await start(workflow_environment, task_queue))

    assert result.status == "succeeded"
    assert result.outcome_counts == {"succeeded": 9}
    assert fleet.phase_states() == ["passed", "passed", "passed"]
    # Every device of a phase checks in before any device of the next phase.
    phases_in_order = [fleet.phase_of[device_id] for device_id in fleet.check_in_order]
    assert phases_in_order == sorted(phases_in_order)
    assert [request.phase for request in fleet.list_requests] == [0, 1, 2]
    assert fleet.states[-1].progress.phases[1].gate == "passed: 3 of 3 finished devices succeeded (100%), 100% needed"
    revisions = [state.progress.revision for state in fleet.states]
    assert revisions == sorted(revisions)


async def test_failed_gate_blocks_until_promoted(workflow_environment, task_queue):
    fleet = PhasedFleet([2, 3], failing_stages={fleet_device_id(1): "before"})

    async with make_worker(workflow_environment.client, task_queue, fleet):
        handle = await start(workflow_environment, task_queue)
        await wait_for_state(fleet, 0, "blocked")
        checked_in_while_blocked = dict(fleet.check_ins)
        answer = await control(handle, PROMOTE_UPDATE, phase=1)
        result = await result_of(handle)

    assert set(checked_in_while_blocked) == set(fleet.devices_of(0))
    assert fleet.states[-1].progress.phases[0].gate == "failed: 1 of 2 finished devices succeeded (50%), 100% needed"
    assert answer.accepted is True
    assert answer.message == "Promoted phase 1: phase 2 starts now."
    assert result.status == "failed"
    assert fleet.phase_states() == ["promoted", "passed"]
    assert fleet.check_ins == Counter({device_id: 1 for device_id in fleet.device_ids})


async def test_gate_passes_at_min_success_rate(workflow_environment, task_queue):
    phases = [PhaseSettings("canary", 4, min_success_rate=75), PhaseSettings("rest", 2)]
    fleet = PhasedFleet([4, 2], phases=phases, failing_stages={fleet_device_id(2): "before"})

    async with make_worker(workflow_environment.client, task_queue, fleet):
        result = await result_of(await start(workflow_environment, task_queue))

    assert result.outcome_counts == {"succeeded": 5, "failed": 1}
    assert fleet.phase_states() == ["passed", "passed"]
    assert fleet.states[-1].progress.phases[0].gate.startswith("passed: 3 of 4 finished devices succeeded (75%)")


async def test_unpromoted_failed_gate_stops_after_hold_time(workflow_environment, task_queue):
    fleet = PhasedFleet([1, 2], failing_stages={fleet_device_id(1): "after"})
    fleet.settings.max_hold_seconds = 3600

    async with make_worker(workflow_environment.client, task_queue, fleet):
        handle = await start(workflow_environment, task_queue)
        await wait_for_state(fleet, 0, "blocked")
        await workflow_environment.sleep(timedelta(seconds=3600 - WALL_SECONDS))
        result = await result_of(handle)

    assert result.status == "stopped"
    assert [stop.reason for stop in fleet.stops] == [
        "stopped: the gate of phase 1 failed (failed: 0 of 1 finished devices succeeded (0%), 100% needed) "
        "and nobody promoted it within 3600 s"
    ]
    assert fleet.phase_states() == ["stopped", "stopped"]
    assert set(fleet.check_ins) == {fleet_device_id(1)}
    assert [request.error for request in fleet.mark_aborted_requests] == [fleet.stops[0].reason]
    for device_id in fleet.devices_of(1):
        assert fleet.device_status(device_id) == "aborted", device_id


async def test_soak_time_passes_before_next_phase(workflow_environment, task_queue):
    phases = [PhaseSettings("canary", 1, soak_seconds=6 * 3600), PhaseSettings("rest", 1)]
    fleet = PhasedFleet([1, 1], phases=phases)

    async with make_worker(workflow_environment.client, task_queue, fleet):
        handle = await start(workflow_environment, task_queue)
        await wait_for_state(fleet, 0, "soaking")
        await asyncio.sleep(0.5)
        held_back = set(fleet.check_ins)
        await workflow_environment.sleep(timedelta(hours=6, seconds=-WALL_SECONDS))
        result = await result_of(handle)

    assert held_back == {fleet_device_id(1)}
    soaking = [state.progress.phases[0] for state in fleet.states if state.progress.phases[0].state == "soaking"]
    assert result.status == "succeeded"
    assert len(soaking) == 1
    assert soaking[0].soak_until is not None
    gap = fleet.check_in_times[fleet_device_id(2)] - fleet.check_in_times[fleet_device_id(1)]
    assert gap >= 6 * 3600
    assert fleet.phase_states() == ["passed", "passed"]


async def test_promote_skips_soak_time(workflow_environment, task_queue):
    phases = [PhaseSettings("canary", 1, soak_seconds=6 * 3600), PhaseSettings("rest", 1)]
    fleet = PhasedFleet([1, 1], phases=phases)

    async with make_worker(workflow_environment.client, task_queue, fleet):
        with workflow_environment.auto_time_skipping_disabled():
            handle = await start(workflow_environment, task_queue)
            await wait_for_state(fleet, 0, "soaking")
            answer = await control(handle, PROMOTE_UPDATE)
            result = await result_of(handle)

    gap = fleet.check_in_times[fleet_device_id(2)] - fleet.check_in_times[fleet_device_id(1)]
    assert answer.accepted is True
    assert result.status == "succeeded"
    assert gap < 3600
    assert fleet.phase_states() == ["promoted", "passed"]


async def test_pause_holds_starts_until_resume(workflow_environment, task_queue):
    first = fleet_device_id(1)
    fleet = PhasedFleet([5], blocked_devices={first})

    async with make_worker(workflow_environment.client, task_queue, fleet):
        handle = await start(workflow_environment, task_queue, max_concurrent_devices=1)
        while not fleet.check_ins:
            await asyncio.sleep(0.01)
        paused = await control(handle, PAUSE_UPDATE)
        paused_again = await control(handle, PAUSE_UPDATE)
        fleet.release_check_ins.set()
        # The first device finishes; the paused deployment starts no other.
        while fleet.device_status(first) == "pending":
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)
        checked_in_while_paused = set(fleet.check_ins)
        paused_state = fleet.states[-1].progress.paused
        resumed = await control(handle, RESUME_UPDATE)
        result = await result_of(handle)

    assert paused.accepted is True
    assert paused.paused is True
    assert paused_again.accepted is False
    assert paused_again.message == "The deployment is already paused."
    assert checked_in_while_paused == {first}
    assert paused_state is True
    assert resumed.accepted is True
    assert resumed.paused is False
    assert result.status == "succeeded"
    assert result.outcome_counts == {"succeeded": 5}


async def test_paused_deployment_stops_after_hold_time(workflow_environment, task_queue):
    first = fleet_device_id(1)
    fleet = PhasedFleet([3], blocked_devices={first})
    fleet.settings.max_hold_seconds = 7200

    async with make_worker(workflow_environment.client, task_queue, fleet):
        handle = await start(workflow_environment, task_queue, max_concurrent_devices=1)
        while not fleet.check_ins:
            await asyncio.sleep(0.01)
        await control(handle, PAUSE_UPDATE)
        fleet.release_check_ins.set()
        while fleet.device_status(first) == "pending":
            await asyncio.sleep(0.01)
        await workflow_environment.sleep(timedelta(seconds=7200 - WALL_SECONDS))
        result = await result_of(handle)

    assert result.status == "stopped"
    assert [stop.reason for stop in fleet.stops] == ["stopped: paused for longer than 7200 s"]
    assert result.outcome_counts == {"succeeded": 1, "aborted": 2}


async def test_control_updates_are_rejected_when_invalid(workflow_environment, task_queue):
    fleet = PhasedFleet([1, 1], blocked_devices={fleet_device_id(1)})

    async with make_worker(workflow_environment.client, task_queue, fleet):
        handle = await start(workflow_environment, task_queue)
        while not fleet.check_ins:
            await asyncio.sleep(0.01)
        with pytest.raises(WorkflowUpdateFailedError) as wrong_phase:
            await control(handle, PROMOTE_UPDATE, phase=2)
        not_paused = await control(handle, RESUME_UPDATE)
        fleet.release_check_ins.set()
        await wait_for_state(fleet, 1, "running")
        with pytest.raises(WorkflowUpdateFailedError) as last_phase:
            await control(handle, PROMOTE_UPDATE)
        result = await result_of(handle)

    assert "Phase 2 is not the current phase; phase 1 is." in str(wrong_phase.value.cause)
    assert not_paused.accepted is False
    assert not_paused.message == "The deployment is not paused."
    assert "Phase 2 is the last phase" in str(last_phase.value.cause)
    assert result.status == "succeeded"


async def test_failure_threshold_stops_rollout(workflow_environment, task_queue):
    failing = {fleet_device_id(number): "before" for number in (1, 2, 3)}
    fleet = PhasedFleet([10], failing_stages=failing)
    fleet.settings.max_failures_percent = 20
    fleet.settings.min_finished = 3

    async with make_worker(workflow_environment.client, task_queue, fleet):
        result = await result_of(await start(workflow_environment, task_queue, max_concurrent_devices=1))

    reason = "stopped: 3 of 3 finished devices failed, threshold 20%"
    assert result.status == "stopped"
    assert [stop.reason for stop in fleet.stops] == [reason]
    assert set(fleet.check_ins) == set(failing)
    assert result.outcome_counts == {"failed": 3, "aborted": 7}
    assert [request.error for request in fleet.mark_aborted_requests] == [reason]
    assert fleet.states[-1].progress.stop_reason == reason


async def run_with_start_rate(environment, task_queue, fleet: PhasedFleet, **worker_options) -> list[int]:
    """Run a deployment of four devices at one start per minute; return the check-ins seen before each timer."""

    fleet.settings.max_start_rate_per_second = 1 / 60
    async with make_worker(environment.client, task_queue, fleet, **worker_options):
        handle = await start(environment, task_queue)
        started_before_timer = []
        for count in range(1, 4):
            while len(fleet.check_ins) < count:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)
            started_before_timer.append(len(fleet.check_ins))
            await environment.sleep(timedelta(seconds=60 - WALL_SECONDS))
        result = await result_of(handle)
    assert result.status == "succeeded"
    return started_before_timer


def assert_starts_a_minute_apart(fleet: PhasedFleet) -> None:
    times = [fleet.check_in_times[device_id] for device_id in fleet.device_ids]
    for earlier, later in zip(times, times[1:]):
        assert later - earlier >= 59.9


async def test_start_rate_spaces_device_starts(workflow_environment, task_queue):
    fleet = PhasedFleet([4])

    started_before_timer = await run_with_start_rate(workflow_environment, task_queue, fleet)

    assert started_before_timer == [1, 2, 3]
    assert_starts_a_minute_apart(fleet)


async def test_start_rate_holds_across_continue_as_new(workflow_environment, task_queue, monkeypatch):
    monkeypatch.setattr(deployment_module, "MAX_CHILDREN_PER_RUN", 1)
    monkeypatch.setattr(deployment_module, "DEVICE_PAGE_SIZE", 1)
    runner = SandboxedWorkflowRunner(restrictions=SandboxRestrictions.default.with_passthrough_modules("microupdates"))
    fleet = PhasedFleet([4])

    started_before_timer = await run_with_start_rate(workflow_environment, task_queue, fleet, workflow_runner=runner)

    assert started_before_timer == [1, 2, 3]
    assert_starts_a_minute_apart(fleet)


async def test_phases_survive_continue_as_new(workflow_environment, task_queue, monkeypatch):
    monkeypatch.setattr(deployment_module, "MAX_CHILDREN_PER_RUN", 2)
    monkeypatch.setattr(deployment_module, "DEVICE_PAGE_SIZE", 2)
    runner = SandboxedWorkflowRunner(restrictions=SandboxRestrictions.default.with_passthrough_modules("microupdates"))
    fleet = PhasedFleet([3, 3], failing_stages={fleet_device_id(5): "before"})

    async with make_worker(workflow_environment.client, task_queue, fleet, workflow_runner=runner):
        handle = await start(workflow_environment, task_queue, max_concurrent_devices=2)
        result = await result_of(handle)
        run_ids = await list_run_ids(workflow_environment.client, handle.id, handle.first_execution_run_id)
        final = await handle.query(DeploymentWorkflow.rollout_progress)

    assert len(run_ids) >= 3
    assert result.outcome_counts == {"succeeded": 5, "failed": 1}
    assert fleet.check_ins == Counter({device_id: 1 for device_id in fleet.device_ids})
    assert [phase.state for phase in final.phases] == ["passed", "failed"]
    assert [(phase.started, phase.succeeded, phase.failed) for phase in final.phases] == [(3, 3, 0), (3, 2, 1)]


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        ({"succeeded": 4, "failed": 1}, None),
        ({"succeeded": 3, "rolled_back": 2}, "stopped: 2 of 5 finished devices failed, threshold 1 device"),
        ({"failed": 1}, None),
        ({"timed_out": 2, "aborted": 9}, "stopped: 2 of 2 finished devices failed, threshold 1 device"),
    ],
)
def test_failure_threshold_by_count(counts, expected):
    settings = RolloutSettings(phases=[], max_failures=1, min_finished=1)

    assert failure_threshold_reason(settings, counts) == expected


def test_failure_threshold_waits_for_min_finished():
    settings = RolloutSettings(phases=[], max_failures_percent=10, min_finished=5)

    assert failure_threshold_reason(settings, {"failed": 4}) is None
    assert failure_threshold_reason(settings, {"failed": 4, "succeeded": 1}) == (
        "stopped: 4 of 5 finished devices failed, threshold 10%"
    )
