"""A deployment: freeze the targets, update every device through a child workflow, record the result.

Children run in a sliding window of at most `max_concurrent_devices`, so the
pending-child limit of an execution (2,000 by default) is never approached.
Device ids come from an activity one page at a time. After a bounded number
of children, or when Temporal suggests it, the workflow waits for its running
children and continues as new, so its history stays small for any fleet size.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributePair, TypedSearchAttributes
from temporalio.exceptions import ChildWorkflowError
from temporalio.workflow import ParentClosePolicy

with workflow.unsafe.imports_passed_through():
    from microupdates import search_attributes
    from microupdates.workflows.contracts import (
        ABORT_SIGNAL,
        DEPLOYMENT_WORKFLOW,
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
DEVICE_PAGE_SIZE = 500
# Each child adds about 10 events to this history (initiated, started,
# completed, plus its share of the page activities); 2,000 children keep a run
# near 20,000 events, below the 51,200-event limit.
MAX_CHILDREN_PER_RUN = 2000


@workflow.defn(name=DEPLOYMENT_WORKFLOW)
class DeploymentWorkflow:
    def __init__(self) -> None:
        self._running = 0
        self._outcome_counts: dict[str, int] = {}
        self._aborted = False
        self._cancelled = False
        self._last_started: str | None = None

    @workflow.run
    async def run(self, deployment: DeploymentInput) -> DeploymentResult:
        self._outcome_counts = dict(deployment.outcome_counts)
        self._aborted = self._aborted or deployment.aborted
        self._last_started = deployment.last_started_device_id
        plan = deployment.plan
        try:
            plan = plan or await self._start(deployment.deployment_id)
            more_devices = await self._update_devices(deployment, plan)
        except asyncio.CancelledError:
            more_devices = await self._abort_after_cancel(deployment.deployment_id)

        if self._aborted:
            # Devices after the last started one never get a child: they end aborted without contact.
            await workflow.execute_activity(
                MARK_UNSTARTED_DEVICES_ABORTED_ACTIVITY,
                MarkUnstartedDevicesAbortedInput(deployment.deployment_id, self._last_started),
                start_to_close_timeout=DATABASE_ACTIVITY_TIMEOUT,
                retry_policy=DATABASE_RETRY,
            )
        elif more_devices:
            workflow.continue_as_new(
                DeploymentInput(
                    deployment_id=deployment.deployment_id,
                    max_concurrent_devices=deployment.max_concurrent_devices,
                    plan=plan,
                    last_started_device_id=self._last_started,
                    outcome_counts=self._outcome_counts,
                    aborted=self._aborted,
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
        if self._cancelled:
            raise asyncio.CancelledError()
        return DeploymentResult(deployment.deployment_id, finished.status, finished.outcome_counts)

    @workflow.query
    def outcome_counts(self) -> dict[str, int]:
        return dict(self._outcome_counts, running=self._running)

    @workflow.signal(name=ABORT_SIGNAL)
    def abort(self) -> None:
        """Stop starting devices. Running devices learn of the abort from the API at their next report."""

        self._aborted = True

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

    async def _update_devices(self, deployment: DeploymentInput, plan: DeploymentPlan) -> bool:
        """Start children page by page; return whether devices remain for the next run."""

        started_this_run = 0
        while not self._aborted:
            page: DevicePage = await workflow.execute_activity(
                LIST_DEPLOYMENT_DEVICES_ACTIVITY,
                ListDeploymentDevicesInput(deployment.deployment_id, self._last_started, DEVICE_PAGE_SIZE),
                result_type=DevicePage,
                start_to_close_timeout=DATABASE_ACTIVITY_TIMEOUT,
                retry_policy=DATABASE_RETRY,
            )
            # The database flag covers an abort whose signal was lost.
            self._aborted = self._aborted or page.abort_requested
            if not page.device_ids:
                break

            for device_id in page.device_ids:
                await workflow.wait_condition(
                    lambda: self._running < deployment.max_concurrent_devices or self._aborted
                )
                if self._aborted:
                    break
                await self._start_device(deployment.deployment_id, device_id, plan)
                self._last_started = device_id
                started_this_run += 1

            if len(page.device_ids) < DEVICE_PAGE_SIZE:
                break
            if started_this_run >= MAX_CHILDREN_PER_RUN or workflow.info().is_continue_as_new_suggested():
                await workflow.wait_condition(lambda: self._running == 0)
                return True

        await workflow.wait_condition(lambda: self._running == 0)
        return False

    async def _start_device(self, deployment_id: str, device_id: str, plan: DeploymentPlan) -> None:
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
        self._running += 1
        # Tasks on the workflow's own event loop are deterministic.
        asyncio.create_task(self._collect(handle, device_id))

    async def _collect(self, handle: workflow.ChildWorkflowHandle, device_id: str) -> None:
        try:
            result: DeviceUpdateResult = await handle
            status = result.status
        except ChildWorkflowError as error:
            # A device workflow that fails outright is counted as a failed device, never fatal to the deployment.
            workflow.logger.warning("Device workflow for %s failed: %s", device_id, error)
            status = "failed"
        self._outcome_counts[status] = self._outcome_counts.get(status, 0) + 1
        self._running -= 1
