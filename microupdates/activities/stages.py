"""Stage activities that devices complete: each queues a job and completes asynchronously.

The API hands the job to the device at its next check-in and completes the
activity with the device's report through an async activity handle. Device
progress reports heartbeat the activity, so a device that goes silent is
caught by the heartbeat timeout.
"""

from __future__ import annotations

import asyncio

from temporalio import activity

from microupdates.db import jobs as job_store
from microupdates.db.session import Database
from microupdates.workflows.contracts import (
    AWAIT_DEVICE_CHECK_IN_ACTIVITY,
    RUN_DEVICE_STAGE_ACTIVITY,
    StageJobInput,
    StageOutcome,
)


class StageActivities:
    def __init__(self, database: Database) -> None:
        self.database = database

    @activity.defn(name=AWAIT_DEVICE_CHECK_IN_ACTIVITY)
    async def await_device_check_in(self, request: StageJobInput) -> None:
        await self._queue(request)
        activity.raise_complete_async()

    @activity.defn(name=RUN_DEVICE_STAGE_ACTIVITY)
    async def run_device_stage(self, request: StageJobInput) -> StageOutcome:
        await self._queue(request)
        activity.raise_complete_async()

    async def _queue(self, request: StageJobInput) -> None:
        info = activity.info()

        def write() -> int:
            with self.database.session() as session:
                job = job_store.queue_stage_job(
                    session,
                    deployment_id=request.deployment_id,
                    device_id=request.device_id,
                    stage=request.stage,
                    workflow_id=info.workflow_id,
                    activity_id=info.activity_id,
                    task_token=info.task_token,
                    attempt=info.attempt,
                )
                return job.id

        job_id = await asyncio.to_thread(write)
        activity.logger.info(
            "Queued job %d: stage %s for device %s of deployment %s",
            job_id, request.stage, request.device_id, request.deployment_id,
        )
