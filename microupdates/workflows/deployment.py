"""A deployment: freeze the targets, update every device through a child workflow, record the result.

Children run in a sliding window of at most `max_concurrent_devices`, so the
pending-child limit of an execution (2,000 by default) is never approached.
Device ids come from an activity one page at a time. After a bounded number
of children, or when Temporal suggests it, the workflow waits for its running
children and continues as new, so its history stays small for any fleet size.

The rollout runs in phases (one when the deployment has no plan). Each phase
updates the devices assigned to it when the targets were frozen. Before the
next phase starts, the phase's success rate must meet its gate and its soak
time must pass, unless the operator promotes it. The operator's pause, resume
and promote are workflow updates, so the caller gets the workflow's answer.
A failure threshold stops the whole rollout. The phase state travels in the
workflow input across continue-as-new and is written to the database for the
API. It contains counts per phase, never device ids.
"""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributePair, TypedSearchAttributes
from temporalio.exceptions import ChildWorkflowError, WorkflowAlreadyStartedError
from temporalio.workflow import ParentClosePolicy

with workflow.unsafe.imports_passed_through():
    from microupdates import search_attributes
    from microupdates.workflows.contracts import (
        ABORT_SIGNAL,
        DEPLOYMENT_WORKFLOW,
        DEVICE_SUCCEEDED,
        FAILED_DEVICE_STATUSES,
        PAUSE_UPDATE,
        PHASE_BLOCKED,
        PHASE_FAILED,
        PHASE_PASSED,
        PHASE_PENDING,
        PHASE_PROMOTED,
        PHASE_RUNNING,
        PHASE_SOAKING,
        PHASE_STOPPED,
        PROMOTE_UPDATE,
        RECORD_ROLLOUT_STATE_ACTIVITY,
        RESUME_UPDATE,
        STOP_DEPLOYMENT_ACTIVITY,
        PhaseProgress,
        PhaseSettings,
        RecordRolloutStateInput,
        RolloutControlInput,
        RolloutControlResult,
        RolloutProgress,
        RolloutSettings,
        StopDeploymentInput,
        MARK_UNSTARTED_DEVICES_ABORTED_ACTIVITY,
        REQUEST_DEPLOYMENT_ABORT_ACTIVITY,
        DevicePage,
        MarkUnstartedDevicesAbortedInput,
        RequestDeploymentAbortInput,
        FINISH_DEPLOYMENT_ACTIVITY,
        LIST_DEPLOYMENT_DEVICES_ACTIVITY,
        START_DEPLOYMENT_ACTIVITY,
        DeploymentInput,
        DeploymentPlan,
        DeploymentResult,
        DeviceUpdateInput,
        DeviceUpdateResult,
        FinishDeploymentInput,
        FinishDeploymentResult,
        ListDeploymentDevicesInput,
        StartDeploymentInput,
        device_workflow_id,
    )
    from microupdates.workflows.device_update import DeviceUpdateWorkflow

DATABASE_ACTIVITY_TIMEOUT = timedelta(seconds=120)
DATABASE_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30))
# Marks executions that start each page's children without waiting for each start.
CONCURRENT_CHILD_STARTS_PATCH = "concurrent-child-starts"
DEVICE_PAGE_SIZE = 500
# Each child adds about 10 events to this history (initiated, started,
# completed, plus its share of the page activities); 2,000 children keep a run
# near 20,000 events, below the 51,200-event limit.
MAX_CHILDREN_PER_RUN = 2000


@workflow.defn(name=DEPLOYMENT_WORKFLOW)
class DeploymentWorkflow:
    def __init__(self) -> None:
        self._deployment_id = ""
        self._running = 0
        self._outcome_counts: dict[str, int] = {}
        self._aborted = False
        self._cancelled = False
        self._last_started: str | None = None
        self._settings: RolloutSettings | None = None
        # Phase state is written to the database only when the start activity sent rollout settings.
        self._records_progress = False
        self._progress = RolloutProgress()
        self._stop_task: asyncio.Task | None = None

    @workflow.run
    async def run(self, deployment: DeploymentInput) -> DeploymentResult:
        self._deployment_id = deployment.deployment_id
        self._outcome_counts = dict(deployment.outcome_counts)
        self._aborted = self._aborted or deployment.aborted
        self._last_started = deployment.last_started_device_id
        if deployment.progress is not None:
            self._progress = deployment.progress
        plan = deployment.plan
        try:
            plan = plan or await self._start(deployment.deployment_id)
            self._load_settings(plan)
            more_devices = await self._run_phases(deployment, plan)
        except asyncio.CancelledError:
            more_devices = await self._abort_after_cancel(deployment.deployment_id)

        if self._aborted:
            if self._stop_task is not None:
                await self._stop_task
            # Every child has ended, so a device still pending never got one: it ends aborted without contact.
            await workflow.execute_activity(
                MARK_UNSTARTED_DEVICES_ABORTED_ACTIVITY,
                MarkUnstartedDevicesAbortedInput(
                    deployment.deployment_id, None, self._progress.stop_reason or "aborted before the device started"
                ),
                start_to_close_timeout=DATABASE_ACTIVITY_TIMEOUT,
                retry_policy=DATABASE_RETRY,
            )
            for phase in self._progress.phases:
                if phase.state not in (PHASE_PASSED, PHASE_PROMOTED, PHASE_FAILED):
                    phase.state = PHASE_STOPPED
            await self._record_progress()
        elif more_devices:
            await workflow.wait_condition(workflow.all_handlers_finished)
            workflow.continue_as_new(
                DeploymentInput(
                    deployment_id=deployment.deployment_id,
                    max_concurrent_devices=deployment.max_concurrent_devices,
                    plan=plan,
                    last_started_device_id=self._last_started,
                    outcome_counts=self._outcome_counts,
                    aborted=self._aborted,
                    progress=self._progress,
                )
            )

        finished: FinishDeploymentResult = await workflow.execute_activity(
            FINISH_DEPLOYMENT_ACTIVITY,
            FinishDeploymentInput(deployment.deployment_id),
            result_type=FinishDeploymentResult,
            start_to_close_timeout=DATABASE_ACTIVITY_TIMEOUT,
            retry_policy=DATABASE_RETRY,
        )
        workflow.logger.info(
            "Deployment %s finished %s: %s", deployment.deployment_id, finished.status, finished.outcome_counts
        )
        workflow.upsert_search_attributes([search_attributes.STATUS.value_set(finished.status)])
        await workflow.wait_condition(workflow.all_handlers_finished)
        if self._cancelled:
            raise asyncio.CancelledError()
        return DeploymentResult(deployment.deployment_id, finished.status, finished.outcome_counts)

    @workflow.query
    def outcome_counts(self) -> dict[str, int]:
        return dict(self._outcome_counts, running=self._running)

    @workflow.query
    def rollout_progress(self) -> RolloutProgress:
        return self._progress

    @workflow.signal(name=ABORT_SIGNAL)
    def abort(self) -> None:
        """Stop starting devices. Running devices learn of the abort from the API at their next report."""

        self._aborted = True

    @workflow.update(name=PAUSE_UPDATE)
    async def pause(self, request: RolloutControlInput) -> RolloutControlResult:
        """Start no further device until resumed; running devices go on."""

        if self._progress.paused:
            return self._control_result(False, "The deployment is already paused.")
        self._progress.paused = True
        await self._record_progress()
        workflow.logger.info("Deployment %s paused", self._deployment_id)
        return self._control_result(True, "Paused: no further device starts until resume.")

    @workflow.update(name=RESUME_UPDATE)
    async def resume(self, request: RolloutControlInput) -> RolloutControlResult:
        if not self._progress.paused:
            return self._control_result(False, "The deployment is not paused.")
        self._progress.paused = False
        await self._record_progress()
        workflow.logger.info("Deployment %s resumed", self._deployment_id)
        return self._control_result(True, "Resumed: devices start again.")

    @workflow.update(name=PROMOTE_UPDATE)
    async def promote(self, request: RolloutControlInput) -> RolloutControlResult:
        """Skip the gate and soak time of the current phase, now or as soon as its devices have finished."""

        index = self._progress.phase_index
        phase = self._progress.phases[index]
        if phase.promoted:
            return self._control_result(False, f"Phase {index + 1} is already promoted.")
        if phase.state in (PHASE_BLOCKED, PHASE_SOAKING):
            message = f"Promoted phase {index + 1}: phase {index + 2} starts now."
        else:
            message = f"Promoted phase {index + 1}: phase {index + 2} starts as soon as its devices have finished."
        if self._progress.paused:
            message += " The deployment is paused, so no device starts until resume."
        workflow.logger.info("Deployment %s: phase %d promoted in state %s", self._deployment_id, index + 1, phase.state)
        phase.promoted = True
        await self._record_progress()
        # The main loop may have moved on to the next phase during the write; answer for the promoted one.
        return self._control_result(True, message, index)

    @pause.validator
    def validate_pause(self, request: RolloutControlInput) -> None:
        self._validate_control(request)

    @resume.validator
    def validate_resume(self, request: RolloutControlInput) -> None:
        self._validate_control(request)

    @promote.validator
    def validate_promote(self, request: RolloutControlInput) -> None:
        self._validate_control(request)
        index = self._progress.phase_index
        if index + 1 >= len(self._progress.phases):
            raise ValueError(f"Phase {index + 1} is the last phase, so there is no next phase to promote to.")

    def _validate_control(self, request: RolloutControlInput) -> None:
        """Reject a request the workflow cannot act on; a rejected update leaves no trace in the history."""

        if not self._progress.phases:
            raise ValueError("The deployment is still resolving its targets; try again in a few seconds.")
        if self._aborted:
            raise ValueError("The deployment is being aborted or stopped, so it takes no further rollout commands.")
        current = self._progress.phase_index
        if current >= len(self._progress.phases):
            raise ValueError("Every phase has finished and the deployment is ending, so there is nothing to change.")
        if request.phase is not None and request.phase != current + 1:
            raise ValueError(
                f"Phase {request.phase} is not the current phase; phase {current + 1} is. "
                "Read the deployment again and repeat the request for the current phase."
            )

    def _control_result(self, accepted: bool, message: str, index: int | None = None) -> RolloutControlResult:
        if index is None:
            index = self._progress.phase_index
        return RolloutControlResult(
            accepted=accepted,
            message=message,
            phase=index + 1,
            phase_state=self._progress.phases[index].state,
            paused=self._progress.paused,
        )

    async def _abort_after_cancel(self, deployment_id: str) -> bool:
        """Handle a Temporal cancel (for example from the Web UI) like an operator's abort.

        The abort is recorded in the database, which ends queued jobs and
        reaches running devices through their progress reports, so no cancel
        request goes to each child. Returns False: no devices remain to start.
        """

        workflow.logger.info("Deployment %s was cancelled; aborting it", deployment_id)
        self._cancelled = True
        self._aborted = True
        await workflow.execute_activity(
            REQUEST_DEPLOYMENT_ABORT_ACTIVITY,
            RequestDeploymentAbortInput(deployment_id),
            start_to_close_timeout=DATABASE_ACTIVITY_TIMEOUT,
            retry_policy=DATABASE_RETRY,
        )
        await workflow.wait_condition(lambda: self._running == 0)
        return False

    async def _start(self, deployment_id: str) -> DeploymentPlan:
        return await workflow.execute_activity(
            START_DEPLOYMENT_ACTIVITY,
            StartDeploymentInput(deployment_id),
            result_type=DeploymentPlan,
            start_to_close_timeout=DATABASE_ACTIVITY_TIMEOUT,
            retry_policy=DATABASE_RETRY,
            summary=f"freeze the targets of deployment {deployment_id}",
        )

    def _load_settings(self, plan: DeploymentPlan) -> None:
        self._records_progress = plan.rollout is not None
        self._settings = plan.rollout or RolloutSettings(phases=[PhaseSettings("all devices", plan.device_count)])
        if not self._progress.phases:
            self._progress.phases = [PhaseProgress() for _ in self._settings.phases]

    async def _run_phases(self, deployment: DeploymentInput, plan: DeploymentPlan) -> bool:
        """Run the phases from the current one on; return whether devices remain for the next run."""

        child_plan = dataclasses.replace(plan, rollout=None)
        while self._progress.phase_index < len(self._progress.phases) and not self._aborted:
            index = self._progress.phase_index
            phase = self._progress.phases[index]
            if phase.state == PHASE_PENDING:
                phase.state = PHASE_RUNNING
                await self._record_progress()
                workflow.logger.info("Deployment %s: phase %d starts", self._deployment_id, index + 1)

            more_devices = await self._update_devices(deployment, child_plan, index)
            if more_devices:
                return True
            if self._aborted:
                break
            await self._close_phase(index)
            if self._aborted:
                break
            self._progress.phase_index += 1
            self._last_started = None

        await workflow.wait_condition(lambda: self._running == 0)
        return False

    async def _close_phase(self, index: int) -> None:
        """Evaluate the phase's gate, then its soak time, waiting for the operator where the gate fails."""

        settings = self._settings.phases[index]
        phase = self._progress.phases[index]
        # Aborted devices, and any other status that is neither success nor failure, count on neither side.
        rate = 100.0 * phase.succeeded / phase.finished if phase.finished else 100.0
        gate_passed = rate >= settings.min_success_rate
        phase.gate = (
            f"{'passed' if gate_passed else 'failed'}: {phase.succeeded} of {phase.finished} finished devices succeeded "
            f"({rate:.0f}%), {settings.min_success_rate:g}% needed"
        )
        is_last = index + 1 == len(self._progress.phases)
        if is_last:
            phase.state = PHASE_PASSED if gate_passed else PHASE_FAILED
            await self._record_progress()
            return

        if not gate_passed and not phase.promoted:
            phase.state = PHASE_BLOCKED
            await self._record_progress()
            workflow.logger.info("Deployment %s: gate of phase %d %s", self._deployment_id, index + 1, phase.gate)
            hold = self._settings.max_hold_seconds
            if not await self._wait_for(lambda: phase.promoted or self._aborted, hold):
                await self._stop(
                    f"stopped: the gate of phase {index + 1} failed ({phase.gate}) "
                    f"and nobody promoted it within {hold} s"
                )
                return
            if self._aborted:
                return

        if settings.soak_seconds and not phase.promoted:
            phase.state = PHASE_SOAKING
            phase.soak_until = (workflow.now() + timedelta(seconds=settings.soak_seconds)).isoformat()
            await self._record_progress()
            await self._wait_for(lambda: phase.promoted or self._aborted, settings.soak_seconds)
            if self._aborted:
                return

        phase.state = PHASE_PROMOTED if phase.promoted else PHASE_PASSED
        phase.soak_until = None
        await self._record_progress()

    async def _wait_for(self, condition, timeout_seconds: float) -> bool:
        """Wait until the condition holds; return False when the timeout passed first."""

        try:
            await workflow.wait_condition(condition, timeout=timedelta(seconds=timeout_seconds))
        except asyncio.TimeoutError:
            return False
        return True

    async def _update_devices(self, deployment: DeploymentInput, plan: DeploymentPlan, phase: int) -> bool:
        """Start the phase's children page by page; return whether devices remain for the next run."""

        started_this_run = 0
        while not self._aborted:
            page: DevicePage = await workflow.execute_activity(
                LIST_DEPLOYMENT_DEVICES_ACTIVITY,
                ListDeploymentDevicesInput(
                    deployment.deployment_id, self._last_started, DEVICE_PAGE_SIZE,
                    phase if self._records_progress else None,
                ),
                result_type=DevicePage,
                start_to_close_timeout=DATABASE_ACTIVITY_TIMEOUT,
                retry_policy=DATABASE_RETRY,
            )
            # The database flag covers an abort whose signal was lost.
            self._aborted = self._aborted or page.abort_requested
            if not page.device_ids:
                break

            for device_id in page.device_ids:
                await self._wait_for_start_slot(deployment.max_concurrent_devices)
                if self._aborted:
                    break
                started = self._start_device(deployment.deployment_id, device_id, plan, phase)
                if not workflow.patched(CONCURRENT_CHILD_STARTS_PATCH):
                    # Executions begun by an older worker started one child per workflow task; replay keeps that.
                    await started.wait()
                self._last_started = device_id
                started_this_run += 1

            if len(page.device_ids) < DEVICE_PAGE_SIZE:
                break
            if started_this_run >= MAX_CHILDREN_PER_RUN or workflow.info().is_continue_as_new_suggested():
                await workflow.wait_condition(lambda: self._running == 0)
                return True

        await workflow.wait_condition(lambda: self._running == 0)
        return False

    async def _wait_for_start_slot(self, max_concurrent_devices: int) -> None:
        """Wait until the deployment is not paused, a window slot is free and the start rate allows a start."""

        while not self._aborted:
            if self._progress.paused:
                hold = self._settings.max_hold_seconds
                if not await self._wait_for(lambda: not self._progress.paused or self._aborted, hold):
                    await self._stop(f"stopped: paused for longer than {hold} s")
                    return
            await workflow.wait_condition(
                lambda: self._running < max_concurrent_devices or self._aborted or self._progress.paused
            )
            if not self._progress.paused:
                break

        rate = self._settings.max_start_rate_per_second
        last_start_at = self._progress.last_start_at
        if rate and last_start_at is not None and not self._aborted:
            next_start = datetime.fromisoformat(last_start_at) + timedelta(seconds=1 / rate)
            delay = (next_start - workflow.now()).total_seconds()
            if delay > 0:
                await workflow.sleep(delay)
        self._progress.last_start_at = workflow.now().isoformat()

    def _start_device(self, deployment_id: str, device_id: str, plan: DeploymentPlan, phase: int) -> asyncio.Event:
        """Take a window slot for the device and run its child workflow in a task of its own.

        The loop that calls this does not wait for the child to start, so the
        starts of many devices go to the server in one workflow task instead
        of one round trip each. The returned event is set once the start has
        been accepted or rejected by the server.
        """

        self._running += 1
        self._progress.phases[phase].started += 1
        started = asyncio.Event()
        # Tasks on the workflow's own event loop are deterministic.
        asyncio.create_task(self._run_device(deployment_id, device_id, plan, phase, started))
        return started

    async def _run_device(
        self, deployment_id: str, device_id: str, plan: DeploymentPlan, phase: int, started: asyncio.Event
    ) -> None:
        try:
            handle = await workflow.start_child_workflow(
                DeviceUpdateWorkflow.run,
                DeviceUpdateInput(deployment_id, device_id, plan),
                id=device_workflow_id(deployment_id, device_id),
                # Reached only when this workflow is terminated: a cancel is handled as an abort first.
                parent_close_policy=ParentClosePolicy.REQUEST_CANCEL,
                static_summary=f"update {plan.update_version} on device {device_id}",
                search_attributes=TypedSearchAttributes([
                    SearchAttributePair(search_attributes.DEPLOYMENT_ID, deployment_id),
                    SearchAttributePair(search_attributes.DEVICE_ID, device_id),
                    SearchAttributePair(search_attributes.UPDATE_VERSION, plan.update_version),
                    SearchAttributePair(search_attributes.TARGET_GROUPS, plan.target_groups),
                    SearchAttributePair(search_attributes.STATUS, "in_progress"),
                ]),
                static_details=f"deployment {deployment_id}, stages: {', '.join(plan.stages)}",
            )
            started.set()
            result: DeviceUpdateResult = await handle
            status = result.status
        except WorkflowAlreadyStartedError:
            # Another execution has the device's workflow id, so this deployment cannot update the device.
            workflow.logger.warning("Device workflow for %s was already started; counting the device failed",
                                    device_id)
            status = "failed"
        except ChildWorkflowError as error:
            # A device workflow that fails outright is counted as a failed device, never fatal to the deployment.
            workflow.logger.warning("Device workflow for %s failed: %s", device_id, error)
            status = "failed"
        finally:
            started.set()
        self._outcome_counts[status] = self._outcome_counts.get(status, 0) + 1
        progress = self._progress.phases[phase]
        if status == DEVICE_SUCCEEDED:
            progress.succeeded += 1
        elif status in FAILED_DEVICE_STATUSES:
            progress.failed += 1
        progress.finished = progress.succeeded + progress.failed
        self._running -= 1

        reason = failure_threshold_reason(self._settings, self._outcome_counts)
        if reason is not None and not self._aborted:
            # Set before the task first runs, so the start loop starts no further device meanwhile.
            self._aborted = True
            self._stop_task = asyncio.create_task(self._stop(reason))

    async def _stop(self, reason: str) -> None:
        """Stop the rollout: devices not started never start, running ones are aborted, and the reason is shown."""

        workflow.logger.info("Deployment %s %s", self._deployment_id, reason)
        self._aborted = True
        self._progress.stop_reason = reason
        await workflow.execute_activity(
            STOP_DEPLOYMENT_ACTIVITY,
            StopDeploymentInput(self._deployment_id, reason),
            start_to_close_timeout=DATABASE_ACTIVITY_TIMEOUT,
            retry_policy=DATABASE_RETRY,
        )

    async def _record_progress(self) -> None:
        if not self._records_progress:
            return
        self._progress.revision += 1
        await workflow.execute_activity(
            RECORD_ROLLOUT_STATE_ACTIVITY,
            RecordRolloutStateInput(self._deployment_id, self._progress),
            start_to_close_timeout=DATABASE_ACTIVITY_TIMEOUT,
            retry_policy=DATABASE_RETRY,
        )


def failure_threshold_reason(settings: RolloutSettings | None, counts: dict[str, int]) -> str | None:
    """Return why the rollout must stop when its failure threshold is exceeded, else None.

    Finished devices are those that succeeded or failed; aborted devices count
    as neither. The threshold is evaluated once `min_finished` devices finished.
    """

    if settings is None or (settings.max_failures is None and settings.max_failures_percent is None):
        return None
    failed = sum(counts.get(status, 0) for status in FAILED_DEVICE_STATUSES)
    finished = failed + counts.get(DEVICE_SUCCEEDED, 0)
    if finished < settings.min_finished or finished == 0:
        return None
    if settings.max_failures is not None and failed > settings.max_failures:
        threshold = f"{settings.max_failures} device{'' if settings.max_failures == 1 else 's'}"
    elif settings.max_failures_percent is not None and failed * 100 > settings.max_failures_percent * finished:
        threshold = f"{settings.max_failures_percent:g}%"
    else:
        return None
    return f"stopped: {failed} of {finished} finished devices failed, threshold {threshold}"
