"""Ending the queued jobs of an aborted deployment or device, without their devices.

Used by the API when an operator aborts, and by the worker when the
deployment workflow itself is cancelled. Each queued job's activity is failed
with the abort error through its task token; the devices are not contacted.
"""

from __future__ import annotations

import asyncio
import logging

from temporalio.client import AsyncActivityHandle, Client
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from microupdates.db import jobs as job_store
from microupdates.db.models import StageJob
from microupdates.db.session import Database
from microupdates.protocol.device_api import UPDATE_STAGES
from microupdates.workflows.contracts import ABORTED_ERROR_TYPE

logger = logging.getLogger(__name__)

ABORT_SWEEP_PAGE_SIZE = 200
# Stages that an abort ends without contacting the device; compensations always run.
ABORTABLE_STAGES = (job_store.CHECK_IN_STAGE,) + UPDATE_STAGES


async def fail_job_aborted(database: Database, handle: AsyncActivityHandle, row: StageJob) -> None:
    """End a job's activity with the abort error; a job whose activity already ended is only expired."""

    error = ApplicationError(
        f"the {row.stage} stage of device {row.device_id} was aborted by the operator",
        type=ABORTED_ERROR_TYPE,
        non_retryable=True,
    )
    try:
        await handle.fail(error)
    except RPCError as rpc_error:
        if rpc_error.status != RPCStatusCode.NOT_FOUND:
            raise
    await asyncio.to_thread(_expire, database, row.id)
    logger.info("Job %d (%s of deployment %s) on device %s ended by abort", row.id, row.stage,
                row.deployment_id, row.device_id,
                extra={"deployment_id": row.deployment_id, "device_id": row.device_id, "job_id": row.id})


async def end_queued_jobs(database: Database, client: Client, deployment_id: str, device_id: str | None) -> int:
    """End every queued update job of an aborted deployment (or one device of it); return how many."""

    ended = 0
    while True:
        rows = await asyncio.to_thread(_read_jobs_to_abort, database, deployment_id, device_id)
        if not rows:
            return ended
        for row in rows:
            await fail_job_aborted(database, client.get_async_activity_handle(task_token=row.task_token), row)
            ended += 1


def _read_jobs_to_abort(database: Database, deployment_id: str, device_id: str | None) -> list[StageJob]:
    with database.session() as session:
        rows = job_store.queued_jobs_to_abort(session, deployment_id, device_id, ABORTABLE_STAGES,
                                              ABORT_SWEEP_PAGE_SIZE)
        for row in rows:
            session.expunge(row)
        return rows


def _expire(database: Database, job_id: int) -> None:
    with database.session() as session:
        job_store.expire_job(session, job_id)
