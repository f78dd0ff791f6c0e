"""Stage activities that devices complete: each queues a job and completes asynchronously.

The API hands the job to the device at its next check-in and completes the
activity with the device's report through an async activity handle. Device
progress reports heartbeat the activity, so a device that goes silent is
caught by the heartbeat timeout.
"""

from __future__ import annotations

import asyncio

from temporalio import activity
from temporalio.exceptions import ApplicationError

from microupdates.db import deployments as deployment_store
from microupdates.db import jobs as job_store
from microupdates.db import devices as device_store
from microupdates.db.session import Database
from microupdates.device_requirements import incompatibility
from microupdates.protocol.device_api import COMPENSATION_STAGES
from microupdates.workflows.contracts import (
    ABORTED_ERROR_TYPE,
    AWAIT_DEVICE_CHECK_IN_ACTIVITY,
    RUN_DEVICE_STAGE_ACTIVITY,
    CheckInOutcome,
    StageJobInput,
    StageOutcome,
)


class StageActivities:
    def __init__(self, database: Database) -> None:
        self.database = database

    @activity.defn(name=AWAIT_DEVICE_CHECK_IN_ACTIVITY)
    async def await_device_check_in(self, request: StageJobInput) -> CheckInOutcome:
        """Return at once when the device's stored facts make it incompatible; else wait for its check-in.

        The API completes the wait with the facts the device sends at that check-in.
        """

        known = await asyncio.to_thread(self._stored_package_managers, request.device_id)
        if incompatibility(request.required_package_managers, known) is not None:
            return CheckInOutcome(known)
        await self._queue(request)
        activity.raise_complete_async()

    @activity.defn(name=RUN_DEVICE_STAGE_ACTIVITY)
    async def run_device_stage(self, request: StageJobInput) -> StageOutcome:
        await self._queue(request)
        activity.raise_complete_async()

    async def _queue(self, request: StageJobInput) -> None:
        """Queue the job, or fail at once when the operator has aborted the device's update.

        The abort flag is read after the job is committed. The API sets the flag
        before it fails the queued jobs, so either this check or the API's
        sweep finds the job, and no job waits for a device after an abort.
        """

        info = activity.info()
        job_id = await asyncio.to_thread(self._insert_job, request, info)
        activity.logger.info(
            "Queued job %d: stage %s for device %s of deployment %s",
            job_id, request.stage, request.device_id, request.deployment_id,
        )

        if request.stage in COMPENSATION_STAGES:
            return
        if await asyncio.to_thread(self._abort_requested, request, job_id):
            raise ApplicationError(
                f"the {request.stage} stage of device {request.device_id} was aborted by the operator",
                type=ABORTED_ERROR_TYPE,
                non_retryable=True,
            )

    def _stored_package_managers(self, device_id: str) -> list[str] | None:
        with self.database.session() as session:
            return device_store.stored_package_managers(session, device_id)

    def _abort_requested(self, request: StageJobInput, job_id: int) -> bool:
        with self.database.session() as session:
            if not deployment_store.is_abort_requested(session, request.deployment_id, request.device_id):
                return False
            job_store.expire_job(session, job_id)
            return True

    def _insert_job(self, request: StageJobInput, info: activity.Info) -> int:
        with self.database.session() as session:
            job = job_store.queue_stage_job(
                session,
                deployment_id=request.deployment_id,
                device_id=request.device_id,
                stage=request.stage,
                workflow_id=info.workflow_id,
                activity_id=info.activity_id,
                task_token=info.task_token,
                # Stage activities run once each (no Temporal retries); a retried stage is a new activity.
                attempt=request.attempt,
            )
            return job.id

