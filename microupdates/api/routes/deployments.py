"""Operator routes for deployments: deploy an update, list recent ones, open one, open one device's result."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, status
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.service import RPCError

from microupdates import search_attributes

from microupdates.api.deps import State
from microupdates.api.responses import error_responses
from microupdates.api.schemas import (
    AbortResult,
    DeploymentCreate,
    DeploymentCreated,
    DeploymentDetail,
    DeploymentDevicePublic,
    DeploymentSummary,
    DeviceResultPublic,
    StageResultPublic,
)
from microupdates.db import deployments as deployment_store
from microupdates.db import jobs as job_store
from microupdates.db.models import Deployment, DeploymentDevice, Update
from microupdates.protocol.recipe import TargetSelection
from microupdates.workflows.contracts import (
    ABORT_SIGNAL,
    DEPLOYMENT_WORKFLOW,
    DeploymentInput,
    deployment_workflow_id,
)

logger = logging.getLogger(__name__)

router = APIRouter(tags=["deployments"])

MAX_DEVICES_PER_PAGE = 1000


@router.post(
    "/deployments",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=DeploymentCreated,
    responses=error_responses(404, 503),
)
async def create_deployment(body: DeploymentCreate, state: State) -> DeploymentCreated:
    """Start a deployment and return at once; it runs as a Temporal workflow."""

    def insert() -> tuple[str, str, TargetSelection]:
        with state.database.session() as session:
            recipe = deployment_store.load_recipe(session, body.update_id)
            targets = body.targets or recipe.targets
            deployment = deployment_store.create_deployment(session, body.update_id, targets, body.timeouts)
            return deployment.id, recipe.version, targets

    deployment_id, version, targets = await asyncio.to_thread(insert)
    workflow_id = deployment_workflow_id(deployment_id)
    try:
        await state.temporal.start_workflow(
            DEPLOYMENT_WORKFLOW,
            DeploymentInput(deployment_id=deployment_id),
            id=workflow_id,
            task_queue=state.settings.task_queue,
            static_summary=f"deployment {deployment_id} of update {body.update_id} (version {version})",
            search_attributes=TypedSearchAttributes([
                SearchAttributePair(search_attributes.DEPLOYMENT_ID, deployment_id),
                SearchAttributePair(search_attributes.UPDATE_VERSION, version),
                SearchAttributePair(search_attributes.TARGET_GROUPS, targets.groups),
                SearchAttributePair(search_attributes.STATUS, "in_progress"),
            ]),
        )
    except RPCError as error:
        reason = str(error).rstrip(".")
        message = f"Temporal did not accept deployment {deployment_id}: {reason}. Check that the Temporal server runs."
        logger.error(message)

        def mark_failed() -> None:
            with state.database.session() as session:
                deployment_store.mark_deployment_not_started(session, deployment_id, message)

        await asyncio.to_thread(mark_failed)
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, message) from error

    logger.info("Deployment %s of update %s started as workflow %s", deployment_id, body.update_id, workflow_id)
    return DeploymentCreated(id=deployment_id, workflow_id=workflow_id, status="pending")


@router.post("/deployments/{deployment_id}/abort", response_model=AbortResult, responses=error_responses(404))
async def abort_deployment(deployment_id: str, state: State) -> AbortResult:
    """Abort a deployment: devices not started never start; running ones stop at their next report."""

    return await abort(state, deployment_id, None)


@router.post(
    "/deployments/{deployment_id}/devices/{device_id}/abort", response_model=AbortResult, responses=error_responses(404)
)
async def abort_device(deployment_id: str, device_id: str, state: State) -> AbortResult:
    """Abort one device's update within a deployment."""

    return await abort(state, deployment_id, device_id)


async def abort(state: State, deployment_id: str, device_id: str | None) -> AbortResult:
    def flag() -> bool:
        with state.database.session() as session:
            return deployment_store.request_abort(session, deployment_id, device_id)

    accepted = await asyncio.to_thread(flag)
    if accepted and device_id is None:
        handle = state.temporal.get_workflow_handle(deployment_workflow_id(deployment_id))
        try:
            await handle.signal(ABORT_SIGNAL)
        except RPCError as error:
            # The workflow also reads the flag before each page of devices, so a lost signal only delays it.
            logger.warning("Abort signal to deployment %s failed: %s", deployment_id, error)

    jobs_ended = await state.device_jobs.abort_queued_jobs(deployment_id, device_id) if accepted else 0
    logger.info("Abort of deployment %s (device %s): accepted=%s, %d queued jobs ended",
                deployment_id, device_id, accepted, jobs_ended)
    return AbortResult(deployment_id=deployment_id, device_id=device_id, accepted=accepted, jobs_ended=jobs_ended)


@router.get("/deployments", response_model=list[DeploymentSummary])
def list_deployments(state: State, limit: Annotated[int, Query(ge=1, le=500)] = 20) -> list[DeploymentSummary]:
    """Recent deployments, newest first, with the number of devices in each status."""

    with state.database.session() as session:
        rows = deployment_store.list_recent_deployments(session, limit)
        return [summarize(deployment, update, counts) for deployment, update, counts in rows]


@router.get("/deployments/{deployment_id}", response_model=DeploymentDetail, responses=error_responses(404))
def read_deployment(
    deployment_id: str,
    state: State,
    limit: Annotated[int, Query(ge=1, le=MAX_DEVICES_PER_PAGE)] = MAX_DEVICES_PER_PAGE,
    after: Annotated[str | None, Query(description="Return devices whose id sorts after this one.")] = None,
) -> DeploymentDetail:
    with state.database.session() as session:
        deployment = deployment_store.load_deployment(session, deployment_id)
        update = deployment_store.load_update(session, deployment.update_id)
        counts = deployment_store.count_device_statuses(session, deployment_id)
        devices = deployment_store.list_deployment_devices(session, deployment_id, limit, after)
        summary = summarize(deployment, update, counts)
        return DeploymentDetail(
            **summary.model_dump(),
            workflow_id=deployment_workflow_id(deployment_id),
            targets=TargetSelection.model_validate(deployment.targets),
            devices=[device_public(row) for row in devices],
        )


@router.get(
    "/deployments/{deployment_id}/devices/{device_id}",
    response_model=DeviceResultPublic,
    responses=error_responses(404),
)
def read_device_result(deployment_id: str, device_id: str, state: State) -> DeviceResultPublic:
    """Return one device's result: each stage's status, exit code, duration and bounded output."""

    with state.database.session() as session:
        row = deployment_store.load_deployment_device(session, deployment_id, device_id)
        jobs = job_store.list_device_jobs(session, deployment_id, device_id)
        stages = [stage_public(job) for job in jobs if job.stage != job_store.CHECK_IN_STAGE]
        return DeviceResultPublic(**device_public(row).model_dump(), deployment_id=deployment_id, stages=stages)


def summarize(deployment: Deployment, update: Update, counts: dict[str, int]) -> DeploymentSummary:
    return DeploymentSummary(
        id=deployment.id,
        update_id=deployment.update_id,
        update_version=update.version,
        status=deployment.status,
        device_count=deployment.device_count,
        device_status_counts=counts,
        created_at=deployment.created_at,
        started_at=deployment.started_at,
        finished_at=deployment.finished_at,
        error=deployment.error,
        abort_requested=deployment.abort_requested_at is not None,
    )


def device_public(row: DeploymentDevice) -> DeploymentDevicePublic:
    return DeploymentDevicePublic(
        device_id=row.device_id,
        status=row.status,
        stage=row.stage,
        error=row.error,
        rollback_error=row.rollback_error,
        abort_requested=row.abort_requested_at is not None,
        started_at=row.started_at,
        finished_at=row.finished_at,
    )


def stage_public(job) -> StageResultPublic:
    report = job.report or {}
    return StageResultPublic(
        stage=job.stage,
        state=job.state,
        status=report.get("status"),
        exit_code=report.get("exit_code"),
        duration_seconds=report.get("duration_seconds"),
        error=report.get("error"),
        queued_at=job.created_at,
        picked_up_at=job.picked_up_at,
        reported_at=job.reported_at,
        steps=report.get("steps", []),
    )
